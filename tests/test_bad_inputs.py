"""Every row of README's table "Bad inputs and what you see" is a test here: a wrong input is
refused with a message that names what is wrong and what to do, and changes nothing."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from lora_helpers.lora import LinearWithLoRA, apply_lora, replace_linear_with_lora
from lora_helpers.model import GPTModel, gpt_config

# --- ranks -----------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [4, np.int64(4), np.int32(4), torch.tensor(4)])
def test_any_integral_rank_is_accepted(rank):
    layer = LinearWithLoRA(nn.Linear(16, 8), rank, alpha=4)
    assert layer.lora.rank == 4 and type(layer.lora.rank) is int
    assert layer.lora.A.shape == (16, 4)


@pytest.mark.parametrize("rank", [4.0, np.float32(4), torch.tensor(4.0), torch.tensor([4]), 0])
def test_a_non_integral_or_non_positive_rank_is_refused(rank):
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        LinearWithLoRA(nn.Linear(16, 8), rank, alpha=4)


def test_a_rank_above_min_in_out_is_allowed_with_a_warning():
    with pytest.warns(UserWarning, match="rank=16 is larger than min.*without compressing"):
        layer = LinearWithLoRA(nn.Linear(768, 2), rank=16, alpha=16)
    assert layer.lora.B.shape == (16, 2)


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
        apply_lora(model, rank=16, alpha=16, targets="blocks", also_train=["out_head"])
