import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from lora_helpers.lora import (
    EmbeddingWithLoRA,
    LinearWithLoRA,
    LoRAConfig,
    LoRALayer,
    LoRAWrapper,
    lora_scaling,
)
from lora_helpers.lora_model import (
    LoRAAlreadyAppliedError,
    apply_lora,
    freeze_except_lora,
    is_lora_parameter,
    lora_layers,
    lora_state_dict,
    merge_lora,
    replace_linear_with_lora,
    unmerge_lora,
)
from lora_helpers.model import GPTModel, gpt_config
from lora_helpers.params import count_parameters, lora_parameter_count


def untied_tiny(seed=0) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(gpt_config("scratch-tiny", vocab_size=1000, tie_weights=False)).eval()


IDX = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))


def one_step(model: nn.Module) -> None:
    """One AdamW step on a next-token loss: makes every B non-zero."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    logits = model(IDX[:, :-1])
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), IDX[:, 1:].flatten())
    loss.backward()
    optimizer.step()


def test_seed_layer_and_replace_wraps_every_linear(tiny_model):
    layer = LoRALayer(6, 4, LoRAConfig(rank=2, alpha=4))
    assert layer.A.shape == (6, 2) and layer.B.shape == (2, 4)
    assert torch.equal(layer.B, torch.zeros(2, 4))
    base = untied_tiny()
    expected = base(IDX)
    n_linear = sum(isinstance(m, nn.Linear) for m in base.modules())
    replace_linear_with_lora(base, rank=2, alpha=2)
    assert len(lora_layers(base)) == n_linear == 2 * 6 + 1
    assert torch.equal(base(IDX), expected)


def test_default_init_gives_exactly_the_base_logits():
    base = untied_tiny()
    expected = base(IDX)
    apply_lora(base, LoRAConfig(rank=4, alpha=8, targets=["blocks", "head"]))
    assert torch.equal(base(IDX), expected)


def test_olora_init_keeps_the_output_within_tolerance():
    base = untied_tiny()
    expected = base(IDX)
    apply_lora(base, LoRAConfig(rank=4, alpha=8, targets="blocks", init="olora"))
    layer = base.trf_blocks[0].att.W_query
    assert not torch.equal(layer.lora.B, torch.zeros_like(layer.lora.B))  # factors from QR
    torch.testing.assert_close(base(IDX), expected, rtol=0, atol=1e-5)


def test_olora_factors_come_from_the_qr_of_the_weight():
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    original = linear.weight.detach().clone()
    layer = LinearWithLoRA(linear, LoRAConfig(rank=3, alpha=3, init="olora"))
    q, r = torch.linalg.qr(original)
    torch.testing.assert_close(layer.lora.A, r[:3].T)
    torch.testing.assert_close(layer.lora.B, q[:, :3].T)
    # the frozen weight is untouched; the adapter subtracts its starting product instead
    assert torch.equal(layer.linear.weight, original)
    torch.testing.assert_close(layer.lora.delta_weight(), torch.zeros_like(original))
    torch.testing.assert_close(layer.merged_weight(), original)


def test_gaussian_init_has_std_one_over_rank():
    torch.manual_seed(0)
    layer = LinearWithLoRA(nn.Linear(512, 512), LoRAConfig(rank=8, alpha=8, init="gaussian"))
    assert layer.lora.A.std().item() == pytest.approx(1 / 8, rel=0.05)
    assert torch.equal(layer.lora.B, torch.zeros_like(layer.lora.B))


def test_default_init_of_a_matches_nn_linear_bound():
    torch.manual_seed(0)
    layer = LoRALayer(1024, 64, LoRAConfig(rank=16, alpha=16))
    bound = 1 / math.sqrt(1024)  # kaiming_uniform(a=√5) over the input dimension
    assert layer.A.abs().max().item() <= bound
    assert layer.A.abs().max().item() > 0.95 * bound


def test_scaling_rules():
    assert lora_scaling(16, 8) == 2.0
    assert lora_scaling(16, 16, "rslora") == 4.0
    assert LoRALayer(8, 8, LoRAConfig(rank=4, alpha=8, scaling="rslora")).scaling == 4.0


def test_after_one_step_merge_unmerge_and_what_changed():
    model = untied_tiny()
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets="blocks"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    one_step(model)
    model.eval()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(is_lora_parameter(k) for k in changed)
    assert all(k in changed for k in before if k.endswith(".B"))  # every B moved off zero
    for name, param in model.named_parameters():
        assert (param.grad is not None) == is_lora_parameter(name), name

    unmerged = model(IDX)
    assert merge_lora(model) == 12
    torch.testing.assert_close(model(IDX), unmerged, rtol=0, atol=1e-5)
    merged_weights = {k: v.clone() for k, v in model.state_dict().items()}
    assert merge_lora(model) == 0  # merging twice is a no-op
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in merged_weights.items())
    assert unmerge_lora(model) == 12
    for key, value in before.items():
        if not is_lora_parameter(key):
            torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=1e-6)
    assert unmerge_lora(model) == 0


def test_merged_layer_is_a_plain_linear_with_the_same_outputs():
    torch.manual_seed(0)
    layer = LinearWithLoRA(nn.Linear(16, 8), LoRAConfig(rank=2, alpha=4))
    nn.init.normal_(layer.lora.B)
    x = torch.randn(5, 16)
    expected = layer(x)
    plain = nn.Linear(16, 8)
    plain.load_state_dict(
        {
            "weight": layer.linear.weight + (4 / 2) * (layer.lora.A @ layer.lora.B).T,
            "bias": layer.linear.bias,
        }
    )
    layer.merge()
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(plain(x), expected, rtol=0, atol=1e-5)


def test_safe_merge_refuses_non_finite_and_changes_nothing():
    model = untied_tiny()
    apply_lora(model, LoRAConfig(rank=2, alpha=2, targets="attention"))
    with torch.no_grad():
        model.trf_blocks[1].att.W_value.lora.B.fill_(float("inf"))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="inf/NaN"):
        merge_lora(model)
    assert not any(layer.merged for layer in lora_layers(model).values())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    with pytest.raises(ValueError, match="inf/NaN"):
        model.trf_blocks[1].att.W_value.merge()


def test_unknown_target_lists_the_layers():
    model = untied_tiny()
    with pytest.raises(ValueError, match="W_query") as info:
        apply_lora(model, LoRAConfig(rank=2, alpha=2, targets="c_attn"))
    assert "c_attn" in str(info.value) and "fc1" in str(info.value)


def test_applying_twice_is_an_error():
    model = untied_tiny()
    apply_lora(model, LoRAConfig(rank=2, alpha=2, targets="attention"))
    with pytest.raises(LoRAAlreadyAppliedError, match="already have LoRA"):
        apply_lora(model, LoRAConfig(rank=2, alpha=2, targets="W_query"))
    apply_lora(model, LoRAConfig(rank=2, alpha=2, targets="fc1"))  # other layers are fine
    assert len(lora_layers(model)) == 10


def test_a_bad_layer_leaves_the_model_unchanged():
    model = untied_tiny()
    model.out_head = nn.Linear(64, 2)  # OLoRA rank 4 fits the blocks' layers, not this head
    with pytest.raises(ValueError, match="use rank <= 2 with OLoRA"):
        apply_lora(model, LoRAConfig(rank=4, alpha=4, targets=["attention", "head"], init="olora"))
    assert not lora_layers(model)  # checked before the first layer is wrapped


def test_tied_head_is_refused(tiny_model):
    with pytest.raises(ValueError, match="tok_emb.weight"):
        apply_lora(tiny_model, LoRAConfig(rank=2, alpha=2, targets="head"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "positive integer"),
        ({"rank": 2.0}, "positive integer"),
        ({"rank": True}, "positive integer"),
        ({"rank": 65, "init": "olora"}, "rank <= 64 with OLoRA"),
        ({"alpha": 0}, "alpha must be a positive"),
        ({"alpha": -1.0}, "alpha must be a positive"),
        ({"alpha": float("inf")}, "finite"),
        ({"scaling": "sqrt"}, "scaling must be one of"),
        ({"dropout": 1.0}, "dropout"),
        ({"init": "pissa"}, "init must be one of"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    args = {"rank": 2, "alpha": 2} | kwargs
    with pytest.raises(ValueError, match=message):
        apply_lora(untied_tiny(), LoRAConfig(targets="attention", **args))


def test_dropout_only_in_training_mode():
    torch.manual_seed(0)
    layer = LinearWithLoRA(nn.Linear(32, 32), LoRAConfig(rank=4, alpha=4, dropout=0.5))
    nn.init.normal_(layer.lora.B)
    x = torch.randn(3, 32)
    layer.train()
    assert not torch.equal(layer(x), layer(x))
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_freeze_except_lora_with_a_trainable_head():
    model = untied_tiny()
    apply_lora(model, LoRAConfig(rank=2, alpha=2, targets="attention"), freeze_base=False)
    assert all(p.requires_grad for p in model.parameters())
    freeze_except_lora(model, also_train=["out_head"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "out_head.weight" in trainable
    assert all(n == "out_head.weight" or is_lora_parameter(n) for n in trainable)
    with pytest.raises(AttributeError):
        freeze_except_lora(model, also_train=["classifier"])


def test_lora_state_dict_holds_only_the_factors():
    model = untied_tiny()
    apply_lora(model, LoRAConfig(rank=2, alpha=2, targets="attention_qv"))
    state = lora_state_dict(model)
    assert len(state) == 2 * 4
    assert state["trf_blocks.0.att.W_query.lora.A"].shape == (64, 2)
    assert state["trf_blocks.0.att.W_query.lora.B"].shape == (2, 64)


def test_embedding_lora_starts_at_the_base_and_adds_a_row_of_a_times_b():
    model = untied_tiny()
    base_logits = model(IDX)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=["tok_emb"]))
    layer = model.tok_emb
    assert isinstance(layer, EmbeddingWithLoRA) and (layer.lora.A == 0).all()
    torch.testing.assert_close(model(IDX), base_logits, rtol=0, atol=0)
    with torch.no_grad():
        layer.lora.A.normal_()
    expected = layer.embedding(IDX) + 2.0 * layer.lora.A[IDX] @ layer.lora.B
    torch.testing.assert_close(layer(IDX), expected)
    trainable = count_parameters(model, trainable_only=True)
    assert trainable == lora_parameter_count(1000, model.cfg.emb_dim, 4) == 1000 * 4 + 4 * 64


def test_embedding_merge_leaves_a_tied_head_on_the_frozen_table():
    torch.manual_seed(0)
    model = GPTModel(gpt_config("scratch-tiny", vocab_size=1000)).eval()  # head tied to tok_emb
    head = model.out_head.weight.detach().clone()
    apply_lora(model, LoRAConfig(rank=4, alpha=4, targets=["blocks", "tok_emb"]))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora.A.normal_(std=0.1)
            layer.lora.B.normal_(std=0.1)
    before = model(IDX)
    assert merge_lora(model) == 13  # 12 linear layers of 2 blocks, and the embedding
    torch.testing.assert_close(model(IDX), before, rtol=0, atol=1e-5)
    assert torch.equal(model.out_head.weight, head)  # the head still reads the frozen table
    assert unmerge_lora(model) == 13
    torch.testing.assert_close(model(IDX), before, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"init": "olora"}, "init='default'"), ({"dropout": 0.1}, "dropout=0")]
)
def test_embedding_lora_refuses_other_inits_and_dropout_changing_nothing(kwargs, message):
    model = untied_tiny()
    with pytest.raises(ValueError, match=message):
        apply_lora(model, LoRAConfig(rank=2, alpha=2, targets=["blocks", "tok_emb"], **kwargs))
    assert not lora_layers(model)


def test_a_config_is_checked_once_when_made_and_passed_whole():
    config = LoRAConfig(rank=np.int64(4), alpha=8, targets=["attention", "fc1"])
    assert type(config.rank) is int and config.targets == ("attention", "fc1")
    assert config.factor == 2.0
    assert LoRAConfig(rank=4, alpha=8, scaling="rslora").factor == 4.0
    for bad, message in [
        ({"rank": 0}, "rank must be a positive integer"),
        ({"alpha": float("inf")}, "alpha must be finite"),
        ({"targets": []}, "targets must name at least one layer"),
        ({"targets": ["attention", ""]}, "targets must name at least one layer"),
    ]:
        with pytest.raises(ValueError, match=message):
            LoRAConfig(**({"rank": 4, "alpha": 4} | bad))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.rank = 8


def test_linear_and_embedding_wrappers_are_siblings_and_lora_layers_returns_both():
    model = GPTModel(gpt_config("scratch-tiny", vocab_size=100))
    apply_lora(model, LoRAConfig(rank=2, alpha=2, targets=["tok_emb", "W_query"]))
    layers = lora_layers(model)
    assert isinstance(layers["tok_emb"], EmbeddingWithLoRA)
    assert not isinstance(layers["tok_emb"], LinearWithLoRA)
    assert all(isinstance(layer, LoRAWrapper) for layer in layers.values())
    assert sum(isinstance(layer, LinearWithLoRA) for layer in layers.values()) == len(layers) - 1
    # the wrapped layers keep their state-dict names: linear.* and embedding.*
    keys = model.state_dict().keys()
    assert "tok_emb.embedding.weight" in keys and "trf_blocks.0.att.W_query.linear.weight" in keys
