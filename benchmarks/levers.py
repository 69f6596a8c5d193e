"""The switches that turn the fine-tuning path's speed-ups off: the naive baseline and the lever
study of ``benchmarks/finetune_speed.py``. The library has no such switches; every run here
still trains with ``finetune.finetune`` → ``train.train``, only with other pieces plugged in:

- ``sdpa``: PyTorch's fused attention, or the explicit softmax(QKᵀ/√d)V;
- ``pad_per_batch``: each batch padded to its longest message, or all to the training set's;
- ``length_buckets``: batches of similar length (``data.LengthBucketSampler``), or random ones
  (pools of one batch) — with ``pad_per_batch`` off the batches are the same as ours;
- ``last_token_head``: the class head at the last real token only, or at every position;
- ``last_token_block``: the last block at the last real token only (``hidden_states(ids,
  last)``), or at every position, the head then reading the last token's row;
- ``fused_adamw``: ``fast.adamw``, or plain ``torch.optim.AdamW``;
- ``autocast``, ``cuda_graphs``: ``train.train``'s own switches (CUDA GPUs only);
- ``bf16_frozen_base``: ``cast_frozen_base`` (below) (CUDA GPUs with bf16 only; off in ours);
- ``compile``: ``torch.compile`` on the model (off in ours: on our short runs of many batch
  shapes its compilations cost more than they save; the study measures it).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, fields, replace
from functools import partial

import torch
from torch import nn
from torch.utils.data import DataLoader

from lora_helpers import finetune as ft
from lora_helpers.data import LengthBucketSampler
from lora_helpers.device import capabilities
from lora_helpers.lora import lora_layers
from lora_helpers.model import GPTModel, MultiHeadAttention, at_positions
from lora_helpers.train import History

RANK = ALPHA = 16


@dataclass(frozen=True)
class Levers:
    """Which speed-ups a run uses; the defaults are ours (``finetune.finetune`` as it is)."""

    sdpa: bool = True
    pad_per_batch: bool = True
    length_buckets: bool = True
    last_token_head: bool = True
    last_token_block: bool = True
    fused_adamw: bool = True
    autocast: bool = True
    cuda_graphs: bool = True
    bf16_frozen_base: bool = False
    compile: bool = False


OURS = Levers()
NAIVE = Levers(
    sdpa=False,
    pad_per_batch=False,
    last_token_head=False,
    last_token_block=False,
    fused_adamw=False,
    autocast=False,
    cuda_graphs=False,
)
CUDA_ONLY = ("autocast", "cuda_graphs", "bf16_frozen_base")


def lever_study_levers(device: torch.device) -> dict[str, Levers]:
    """Ours with one lever flipped ("without ..." / "with ..."), for every lever that can
    matter on ``device``."""
    caps = capabilities(device)
    usable = {"autocast": caps.bf16_autocast, "cuda_graphs": caps.cuda_graphs}
    usable["bf16_frozen_base"] = caps.bf16_autocast
    study = {}
    for f in fields(Levers):
        if f.name in CUDA_ONLY and not usable[f.name]:
            continue
        on = getattr(OURS, f.name)
        study[f"{'without' if on else 'with'} {f.name}"] = replace(OURS, **{f.name: not on})
    return study


# --- notebook 05's first LoRA layer, exactly as it shows it ----------------------------------


class LoRALayer(torch.nn.Module):
    def __init__(self, in_dim, out_dim, rank, alpha):
        super().__init__()
        self.A = torch.nn.Parameter(torch.empty(in_dim, rank))
        torch.nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = torch.nn.Parameter(torch.zeros(rank, out_dim))
        self.alpha = alpha

    def forward(self, x):
        return self.alpha * (x @ self.A @ self.B)


class LinearWithLoRA(torch.nn.Module):
    def __init__(self, linear, rank, alpha):
        super().__init__()
        self.linear = linear
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha)

    def forward(self, x):
        return self.linear(x) + self.lora(x)


def replace_linear_with_lora(model, rank, alpha):
    for name, module in model.named_children():
        if isinstance(module, torch.nn.Linear):
            setattr(model, name, LinearWithLoRA(module, rank, alpha))
        else:
            replace_linear_with_lora(module, rank, alpha)


def naive_lora_model(base: GPTModel, seed: int) -> GPTModel:
    """Notebook 05's first layer on every linear layer of the blocks; the new head trains too."""
    torch.manual_seed(seed)  # the same head as prepare_variant gives ours
    model = ft.add_classification_head(copy.deepcopy(base))
    model.requires_grad_(False)
    replace_linear_with_lora(model.trf_blocks, RANK, ALPHA)
    model.out_head.requires_grad_(True)
    return model


# --- the pieces a lever swaps ----------------------------------------------------------------


def all_positions_logits(
    model: GPTModel, input_ids: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """The naive head: class logits at every position, then the last real token's row."""
    logits = model(input_ids)
    positions = lengths.to(logits.device) - 1
    return at_positions(logits, positions)


def every_position_logits(
    model: GPTModel, input_ids: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """The class head at the last real token, read from every position's final hidden states
    (the last block computed at every position)."""
    hidden = model.hidden_states(input_ids)
    positions = lengths.to(hidden.device) - 1
    return model.out_head(at_positions(hidden, positions))


def logits_fn(levers: Levers) -> ft.LogitsFn:
    if not levers.last_token_head:
        return all_positions_logits
    return ft.last_token_logits if levers.last_token_block else every_position_logits


def set_sdpa(model: torch.nn.Module, on: bool) -> None:
    """Switch every attention layer between the fused kernel and the explicit computation."""
    for module in model.modules():
        if isinstance(module, MultiHeadAttention):
            module.use_sdpa = on


def loaders_for(
    loaders: dict[str, DataLoader], levers: Levers, longest: int, seed: int
) -> dict[str, DataLoader]:
    """``loaders`` (``data.message_loaders``) as the levers say: the same batch sampler (so
    the same batches, reseeded by ``finetune``), every batch padded to ``longest`` without
    ``pad_per_batch``; random batches (pools of one batch) without ``length_buckets``."""
    if levers.pad_per_batch and levers.length_buckets:
        return loaders
    min_length = 0 if levers.pad_per_batch else longest
    out = {}
    for name, loader in loaders.items():
        collate = partial(loader.collate_fn, min_length=min_length)
        if name == "train":
            sampler = loader.batch_sampler
            if not levers.length_buckets:
                lengths, size = sampler.lengths, sampler.batch_size
                sampler = LengthBucketSampler(lengths, size, pool_batches=1, seed=seed)
            out[name] = DataLoader(loader.dataset, batch_sampler=sampler, collate_fn=collate)
        else:
            out[name] = DataLoader(loader.dataset, loader.batch_size, collate_fn=collate)
    return out


def finetune_with(
    model: torch.nn.Module,
    loaders: dict[str, DataLoader],
    device: torch.device,
    recipe: ft.FinetuneRecipe,
    lr: float,
    levers: Levers,
) -> History:
    """``finetune.finetune`` (without the per-epoch accuracies) with ``levers``' pieces."""
    set_sdpa(model, levers.sdpa)
    if levers.bf16_frozen_base and levers.autocast and capabilities(device).bf16_autocast:
        cast_frozen_base(model)
    if levers.compile:
        model.compile(dynamic=True)  # in place: the batches come in many lengths
    optimizer = None
    if not levers.fused_adamw:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=recipe.weight_decay)
    loss_fn = partial(ft.classification_loss, logits_fn=logits_fn(levers))
    return ft.finetune(
        model,
        loaders,
        device,
        recipe,
        lr,
        loss_fn=loss_fn,
        optimizer=optimizer,
        accuracies=False,
        autocast=levers.autocast,
        cuda_graphs=levers.cuda_graphs and not levers.compile,
        progress=False,
    )


@torch.no_grad()
def cast_frozen_base(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Store the frozen linear layers under LoRA adapters in ``dtype``; returns how many.

    Under bf16 autocast every fp32 weight is rounded to bf16 at each use anyway (and that copy
    is kept for the backward pass); storing the frozen ones that way once gives the same
    numbers without the casts and their memory. Run such a model under bf16 autocast only
    (``capabilities(device).bf16_autocast``: CUDA GPUs), and never merge adapters into it
    afterwards.
    """
    layers = [m.plain for m in lora_layers(model).values() if isinstance(m.plain, nn.Linear)]
    frozen = [linear for linear in layers if not linear.weight.requires_grad]
    for linear in frozen:
        linear.to(dtype)
    return len(frozen)
