"""Hugging Face PEFT LoRA on ``transformers``' GPT-2 classifier holding our base's weights: the
``peft-lora`` baseline of ``benchmarks/finetune_speed.py``."""

from __future__ import annotations

import warnings

import torch

from benchmarks.levers import ALPHA, RANK
from lora_helpers.gpt2 import to_transformers
from lora_helpers.model import GPTModel


def peft_available() -> bool:
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def peft_lora_model(base: GPTModel, head: torch.nn.Linear) -> torch.nn.Module:
    """transformers' GPT-2 classifier holding ``base``'s weights and ``head``'s initial weight,
    with PEFT LoRA on every linear layer of the blocks."""
    from peft import LoraConfig, get_peft_model  # optional: the test requirements

    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    hf_model = to_transformers(base, num_labels=2)
    with torch.no_grad():
        hf_model.score.weight.copy_(head.weight)
    lora = LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        target_modules=["c_attn", "c_proj", "c_fc"],  # c_proj: attn.c_proj and mlp.c_proj
        lora_dropout=0.0,
        fan_in_fan_out=True,  # GPT-2's Conv1D layers store their weights transposed
        modules_to_save=["score"],
        task_type="SEQ_CLS",
    )
    return get_peft_model(hf_model, lora)


def peft_logits(model: torch.nn.Module, input_ids: torch.Tensor, lengths: torch.Tensor):
    """transformers pools at the last token that is not ``pad_token_id``; it gets the mask too."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    attention_mask = (positions < lengths.to(input_ids.device)[:, None]).long()
    return model(input_ids=input_ids, attention_mask=attention_mask).logits
