"""lora_helpers.lora: the LoRA layers, their configuration, initialisations and scaling."""

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
from lora_helpers.lora_model import apply_lora, lora_layers
from lora_helpers.model import GPTModel, gpt_config
from lora_helpers.params import count_parameters, lora_parameter_count


def untied_tiny(seed=0) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(gpt_config("scratch-tiny", vocab_size=1000, tie_weights=False)).eval()


IDX = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))


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


@pytest.mark.parametrize("rank", [4, np.int64(4), np.int32(4), torch.tensor(4)])
def test_any_integral_rank_is_accepted(rank):
    layer = LinearWithLoRA(nn.Linear(16, 8), LoRAConfig(rank, alpha=4))
    assert layer.lora.rank == 4 and type(layer.lora.rank) is int
    assert layer.lora.A.shape == (16, 4)


@pytest.mark.parametrize(
    "rank", [4.0, np.float32(4), torch.tensor(4.0), torch.tensor([4]), 0, True]
)
def test_a_non_integral_or_non_positive_rank_is_refused(rank):
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        LinearWithLoRA(nn.Linear(16, 8), LoRAConfig(rank, alpha=4))


def test_a_rank_above_min_in_out_is_allowed_with_a_warning():
    with pytest.warns(UserWarning, match="rank=16 is larger than min.*without compressing"):
        layer = LinearWithLoRA(nn.Linear(768, 2), LoRAConfig(rank=16, alpha=16))
    assert layer.lora.B.shape == (16, 2)


def test_olora_refuses_a_rank_above_min_in_out():
    with pytest.raises(ValueError, match="use rank <= 2 with OLoRA"):
        LinearWithLoRA(nn.Linear(768, 2), LoRAConfig(rank=16, alpha=16, init="olora"))
