"""NF4 and double quantization written out (lora_helpers/quant.py), checked against
bitsandbytes (a test requirement, like peft) and against the layers they replace."""

import copy

import pytest
import torch
from torch import nn

from lora_helpers import adapter_config as ac
from lora_helpers import adapter_files as af
from lora_helpers import adapters as ad
from lora_helpers import quant
from lora_helpers.lora import LoRAConfig
from lora_helpers.lora_model import apply_lora, lora_layers, merge_lora
from lora_helpers.model import GPTModel, gpt_config

bnb = pytest.importorskip("bitsandbytes.functional")


def weight(seed: int, shape=(512, 128), outlier: bool = True) -> torch.Tensor:
    torch.manual_seed(seed)
    w = torch.randn(shape) * 0.02
    if outlier:
        w[3, 7] = 0.5
    return w


def test_nf4_code_values_are_bitsandbytes_table_exactly():
    ours = quant.nf4_code()
    assert torch.equal(ours, bnb.get_4bit_type("nf4", device="cpu"))
    assert len(ours) == 16 and ours[0] == -1 and ours[-1] == 1 and (ours == 0).sum() == 1
    assert (ours > 0).sum() == 8 and (ours < 0).sum() == 7


def test_the_dynamic_8_bit_map_is_bitsandbytes_exactly():
    assert torch.equal(quant.dynamic_code(), bnb.create_dynamic_map())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nf4_codes_absmax_and_dequantized_weights_equal_bitsandbytes(seed):
    w = weight(seed)
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    ours = quant.quantize_nf4(w)
    assert torch.equal(ours.packed, packed.flatten())
    assert torch.equal(ours.absmax, state.absmax)
    assert torch.equal(quant.dequantize_nf4(ours), bnb.dequantize_4bit(packed, state))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_double_quantization_matches_bitsandbytes_but_where_it_picks_the_farther_code(seed):
    """The 4-bit codes, the absmax values' mean and their fp32 scales are bitsandbytes'
    exactly. Of the 8-bit absmax codes under 1 % differ: bitsandbytes' CPU kernel finds the
    code by an approximate search and there takes a farther one; ours is the nearest, so our
    absmax values are never further from the true ones, and elsewhere the weights are equal."""
    w = weight(seed, (1024, 512))
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = quant.quantize_nf4(w, double_quant=True)
    assert torch.equal(ours.packed, packed.flatten())
    assert torch.equal(ours.offset, state.offset) and torch.equal(ours.scale, state.state2.absmax)
    differ = ours.absmax.int() != state.absmax.int()
    assert differ.float().mean() < 0.01
    true = quant.quantize_nf4(w).absmax
    code, scale = quant.dynamic_code(), ours.scale.repeat_interleave(quant.SCALE_BLOCK)
    scale = scale[: len(true)]
    ours_abs = code[ours.absmax.long()] * scale + ours.offset
    bnb_abs = code[state.absmax.long()] * scale + ours.offset
    assert ((ours_abs - true).abs() <= (bnb_abs - true).abs()).all()
    deq_ours = quant.dequantize_nf4(ours)
    deq_bnb = bnb.dequantize_4bit(packed, state)
    assert torch.equal(
        deq_ours[~differ.repeat_interleave(64).view(w.shape)],
        deq_bnb[~differ.repeat_interleave(64).view(w.shape)],
    )


def test_bits_per_weight_counted_from_the_stored_bytes():
    w = weight(0, (512, 128))
    assert quant.quantize_nf4(w).bits_per_weight() == 4.5  # 4 + 32/64
    dq = quant.quantize_nf4(w, double_quant=True).bits_per_weight()
    assert dq == pytest.approx(4 + 8 / 64 + 32 * 4 / w.numel() + 32 / w.numel())
    assert dq <= 4.13


def test_pack_and_unpack_are_inverse_with_the_first_code_in_the_high_half():
    indices = torch.tensor([1, 2, 15, 0], dtype=torch.uint8)
    packed = quant.pack_4bit(indices)
    assert packed.tolist() == [0x12, 0xF0]
    assert torch.equal(quant.unpack_4bit(packed), indices)


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (torch.randn(3, 7), ValueError, "21 values, not a positive multiple of the block size 64"),
        (torch.randn(0, 64), ValueError, "not a positive multiple"),
        (torch.ones(2, 64, dtype=torch.int64), TypeError, "Only floating-point weights"),
        ([[0.1] * 64], TypeError, "Only floating-point weights"),
    ],
)
def test_bad_weights_are_refused_saying_what_to_do(bad, error, message):
    with pytest.raises(error, match=message):
        quant.quantize_nf4(bad)


def test_a_zero_block_quantizes_to_zero_without_nan():
    w = torch.zeros(2, 64)
    w[1] = torch.linspace(-1, 1, 64)
    back = quant.dequantize_nf4(quant.quantize_nf4(w))
    assert torch.equal(back[0], torch.zeros(64)) and torch.isfinite(back).all()


def gpt() -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(gpt_config("scratch-tiny", vocab_size=128)).eval()


def block_linears(model: GPTModel) -> list[str]:
    return [n for n, m in model.trf_blocks.named_modules() if isinstance(m, nn.Linear)]


def test_linear4bit_computes_with_its_dequantized_weight_and_keeps_bias_in_fp32():
    linear = nn.Linear(128, 64)
    layer = quant.Linear4bit(linear)
    x = torch.randn(3, 5, 128)
    expected = nn.functional.linear(x, quant.dequantize_nf4(layer.quantized()), linear.bias)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    assert torch.equal(layer.bias, linear.bias) and not layer.bias.requires_grad
    # each weight is within half the widest gap between NF4 values (-1 to -0.70) of its
    # block's absmax (1 % more for the absmax's own 8-bit rounding)
    code = quant.nf4_code()
    half_gap = (code[1:] - code[:-1]).max() / 2
    absmax = quant.quantize_nf4(linear.weight).absmax.repeat_interleave(64).view(64, 128)
    assert ((layer.weight - linear.weight).abs() <= half_gap * absmax * 1.01).all()


def test_lora_on_a_4bit_base_trains_only_the_adapters_and_refuses_to_merge():
    model = gpt()
    names = [f"trf_blocks.{n}" for n in block_linears(model)]
    assert quant.quantize_linears(model, names) == 6 * model.cfg.n_layers
    apply_lora(model, LoRAConfig(rank=4, alpha=4))
    assert all(isinstance(m.plain, quant.Linear4bit) for m in lora_layers(model).values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters." in n for n in trainable)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match="Dequantize the base first"):
        merge_lora(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not any(m.merged for m in lora_layers(model).values())
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora.B.normal_(std=0.1)
        unmerged = model(ids)
        assert quant.dequantize_linears(model) == 6 * model.cfg.n_layers
        torch.testing.assert_close(model(ids), unmerged, rtol=0, atol=1e-5)
        assert merge_lora(model) == 6 * model.cfg.n_layers
        torch.testing.assert_close(model(ids), unmerged, rtol=0, atol=1e-4)


def test_quantize_linears_is_all_or_nothing():
    model = gpt()
    names = [f"trf_blocks.{n}" for n in block_linears(model)] + ["trf_blocks.0.norm1"]
    with pytest.raises(TypeError, match="not an nn.Linear"):
        quant.quantize_linears(model, names)
    assert not any(isinstance(m, quant.Linear4bit) for m in model.modules())


def test_an_adapter_trained_on_the_4bit_base_is_refused_by_the_fp32_base_saying_why(tmp_path):
    fp32 = gpt()
    four_bit = copy.deepcopy(fp32)
    quant.quantize_linears(four_bit, [f"trf_blocks.{n}" for n in block_linears(four_bit)])
    ad.add_adapter(four_bit, "spam", LoRAConfig(rank=2, alpha=2))
    af.save_adapter(four_bit, tmp_path / "spam")
    state = copy.deepcopy(fp32.state_dict())
    with pytest.raises(ac.AdapterMismatchError, match=r"quantized: adapter's base NF4 \(12 linear"):
        af.load_adapter(fp32, tmp_path / "spam")
    assert fp32.state_dict().keys() == state.keys()  # nothing attached
    assert all(torch.equal(v, fp32.state_dict()[k]) for k, v in state.items())
    af.load_adapter(four_bit_base := quant_copy(fp32), tmp_path / "spam", name="again")
    assert ad.active_adapter(four_bit_base) == "again"


def quant_copy(model: GPTModel) -> GPTModel:
    copy_ = copy.deepcopy(model)
    quant.quantize_linears(copy_, [f"trf_blocks.{n}" for n in block_linears(copy_)])
    return copy_
