"""lora_helpers.lora_model: LoRA over a whole model: targets, applying, freezing, merging,
the factors' state dict, and appendix E's replace_linear_with_lora."""

import warnings

import pytest
import torch
from torch import nn

from lora_helpers.lora import LoRAConfig, LoRALayer
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


@pytest.mark.parametrize(("rank", "expected"), [(8, 1_333_264), (16, 2_666_528)])
def test_the_seeds_recipe_reproduces_its_trainable_count_on_gpt2_124m(rank, expected):
    """rasbt's appendix E: freeze GPT-2 124M, new Linear(768, 2) head, LoRA on every Linear."""
    with torch.device("meta"):  # shapes only: no memory, no time
        model = GPTModel(gpt_config("gpt2-124M"))
        model.out_head = nn.Linear(768, 2)
    model.requires_grad_(False)
    with pytest.warns(UserWarning, match="in_features=768, out_features=2"):
        replace_linear_with_lora(model, rank, rank)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


def test_our_recommended_targets_need_no_warning():
    model = GPTModel(gpt_config("scratch-tiny", vocab_size=100))
    model.out_head = nn.Linear(64, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_lora(model, LoRAConfig(rank=16, alpha=16, targets="blocks"), also_train=["out_head"])


@pytest.mark.parametrize(
    ("kwargs", "shown"),
    [({"init": "olora"}, "init='olora'"), ({"dropout": 0.1}, "init='default', dropout=0.1")],
)
def test_lora_on_the_embedding_refuses_other_inits_and_dropout(kwargs, shown):
    torch.manual_seed(0)
    model = GPTModel(gpt_config("scratch-tiny", vocab_size=1000, tie_weights=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    message = f"LoRA on an embedding takes init='default' and dropout=0 \\(got {shown}"
    with pytest.raises(ValueError, match=message):
        apply_lora(model, LoRAConfig(rank=2, alpha=2, targets=["tok_emb", "blocks"], **kwargs))
    assert not lora_layers(model)  # nothing wrapped: all or nothing
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
