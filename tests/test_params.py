"""Parameter accounting: counts on real modules (on the meta device: shapes only) against their
closed forms, for the GPT presets and for LoRA on every target group."""

import pytest
import torch
from torch import nn

from lora_helpers.lora import LoRAConfig
from lora_helpers.lora_model import apply_lora, is_lora_parameter, lora_layers
from lora_helpers.model import PRESETS, GPTModel, gpt_config
from lora_helpers.params import (
    count_parameters,
    expected_lora_parameters,
    format_parameter_report,
    gpt_param_count,
    layer_type,
    lora_parameter_count,
    parameter_report,
)


def untied_tiny(seed=0) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(gpt_config("scratch-tiny", vocab_size=1000, tie_weights=False)).eval()


@pytest.mark.parametrize(
    ("preset", "tied", "untied"),
    [
        ("gpt2-124M", 124_439_808, 163_037_184),
        ("gpt2-355M", 354_823_168, 406_286_336),
        ("gpt2-774M", 774_030_080, 838_359_040),
        ("gpt2-1558M", 1_557_611_200, 1_638_022_400),
    ],
)
def test_gpt2_parameter_counts(preset, tied, untied):
    with torch.device("meta"):  # shapes only, no memory
        assert count_parameters(GPTModel(gpt_config(preset))) == tied
        assert count_parameters(GPTModel(gpt_config(preset, tie_weights=False))) == untied
    assert untied - tied == 50257 * gpt_config(preset).emb_dim


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("qkv_bias", [True, False])
def test_closed_form_parameter_count_matches_real_modules(preset, tie, qkv_bias):
    cfg = gpt_config(preset, tie_weights=tie, qkv_bias=qkv_bias)
    with torch.device("meta"):
        assert count_parameters(GPTModel(cfg)) == gpt_param_count(cfg)


def _expected_trainable(model, rank):
    return sum(
        lora_parameter_count(layer.linear.in_features, layer.linear.out_features, rank)
        for layer in lora_layers(model).values()
    )


@pytest.mark.parametrize(
    ("targets", "n_layers"),
    [
        ("attention", 8),
        ("attention_qv", 4),
        ("feed_forward", 4),
        ("blocks", 12),
        ("head", 1),
        (["W_query", "fc2"], 4),
        (r"trf_blocks\.0\..*", 6),
        ("trf_blocks.1.att.W_key", 1),
    ],
)
def test_trainable_counts_equal_the_formula(targets, n_layers):
    model = untied_tiny()
    total = count_parameters(model)
    apply_lora(model, LoRAConfig(rank=4, alpha=4, targets=targets))
    assert len(lora_layers(model)) == n_layers
    trainable = count_parameters(model, trainable_only=True)
    assert trainable == _expected_trainable(model, 4)
    assert count_parameters(model) == total + trainable


def test_gpt2_124m_with_a_two_class_head_counts():
    with torch.device("meta"):
        model = GPTModel(gpt_config("gpt2-124M"))
        model.out_head = nn.Linear(768, 2)
        apply_lora(model, LoRAConfig(rank=16, alpha=16, targets="blocks"), also_train=["out_head"])
    per_block = 16 * (4 * (768 + 768) + (768 + 3072) + (3072 + 768))
    head = 768 * 2 + 2
    assert count_parameters(model, trainable_only=True) == 12 * per_block + head == 2_655_746
    report = parameter_report(model)
    assert report["LoRA"]["trainable"] == 12 * per_block
    assert report["output head"] == {"total": head, "trainable": head}
    assert report["all"]["total"] == count_parameters(model)


@pytest.mark.parametrize("preset", ["scratch-30M", "gpt2-124M", "gpt2-1558M"])
@pytest.mark.parametrize("group", ["attention", "attention_qv", "feed_forward", "blocks", "head"])
@pytest.mark.parametrize("rank", [1, 16, 256])
def test_closed_form_lora_counts_match_real_modules(preset, group, rank):
    with torch.device("meta"):
        model = GPTModel(gpt_config(preset))
        model.out_head = nn.Linear(model.cfg.emb_dim, 512)  # untied, wide enough for rank 256
        apply_lora(model, LoRAConfig(rank=rank, alpha=rank, targets=group))
    lora_params = sum(p.numel() for n, p in model.named_parameters() if is_lora_parameter(n))
    assert lora_params == expected_lora_parameters(model.cfg, rank, group, head_out=512)


def test_every_parameter_has_a_layer_type_and_the_report_adds_up():
    model = untied_tiny()
    apply_lora(model, LoRAConfig(rank=2, alpha=2, targets="attention_qv"))
    kinds = {layer_type(name) for name, _ in model.named_parameters()}
    assert "other" not in kinds and "LoRA" in kinds
    assert layer_type("trf_blocks.0.att.W_query.adapters.default.A") == "LoRA"
    assert layer_type("trf_blocks.0.att.W_query.linear.weight") == "attention"
    report = parameter_report(model)
    assert report["all"] == {
        "total": count_parameters(model),
        "trainable": count_parameters(model, trainable_only=True),
    }
    lines = format_parameter_report(model).splitlines()
    assert lines[0].split() == ["layer", "type", "total", "trainable", "frozen"]
    assert len(lines) == 1 + len(report)
    lora_row = next(line for line in lines if line.startswith("LoRA"))
    n = report["LoRA"]["total"]
    assert lora_row.split()[1:] == [f"{n:,}", f"{n:,}", "0"]
