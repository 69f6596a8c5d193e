"""The fast fine-tuning path: what makes (LoRA) fine-tuning of our classifier fast, lever by lever.

Fine-tuning GPT-2 124M on short messages in batches of 8 asks little arithmetic of a GPU per
step. A naive step is slow because the GPU waits: for Python to launch some two thousand small
kernels one by one, for ``loss.item()`` and blocking copies to drain its queue, for fp32 math,
and for padding tokens nobody reads. Each field of ``Levers`` removes one of those waits;
``benchmarks/finetune_speed.py`` measures what each one is worth. The model is the teaching
model, unchanged: the speed comes from the path around it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .data import LengthBucketSampler, MessageDataset, pad_collate
from .device import has_native_bf16
from .finetune import last_token_logits
from .lora import lora_layers
from .model import MultiHeadAttention
from .train import GraphedStep, adamw, autocast_for, optimizer_step

LogitsFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Levers:
    """How a fine-tuning run is executed. The defaults are our fast path; ``NAIVE`` is the
    usual recipe. The levers change how the model is computed, not what (bf16 rounds the
    arithmetic); all but ``sort_by_length`` (off by default) keep the naive recipe's batches."""

    sdpa: bool = True  # PyTorch's fused attention kernel, not the explicit softmax(QKᵀ/√d)V
    pad_per_batch: bool = True  # pad to the batch's longest message, not the training set's
    pad_multiple: int = 1  # length buckets: round padded lengths up (few shapes, CUDA graphs)
    sort_by_length: bool = False  # batches of similar length, cut from sorted pools of 8 batches
    last_token_head: bool = True  # the head reads the last real token only, not every position
    bf16: bool = True  # bf16 autocast (CUDA only)
    bf16_frozen_base: bool = True  # store frozen LoRA-wrapped weights in bf16 (CUDA, with bf16)
    fused_adamw: bool = True  # one fused kernel updates every parameter (CUDA only)
    sync_free: bool = True  # running loss kept on the device, non-blocking copies: no waits
    cuda_graphs: bool = False  # forward+backward captured once per shape, then replayed (CUDA)
    compile: bool = False  # torch.compile the forward pass

    def __post_init__(self):
        if self.cuda_graphs and self.compile:
            raise ValueError("Use cuda_graphs or compile, not both.")

    def uses_bf16(self, device: torch.device) -> bool:
        return self.bf16 and device.type == "cuda" and has_native_bf16(device)


NAIVE = Levers(
    sdpa=False,
    pad_per_batch=False,
    last_token_head=False,
    bf16=False,
    bf16_frozen_base=False,
    fused_adamw=False,
    sync_free=False,
)
FAST = Levers()
FAST_GRAPHED = Levers(cuda_graphs=True, pad_multiple=16)  # 16: at most 13 shapes for our SMS

# For a lever study: what switching each lever off means (from the fast path, one at a time),
# and the levers left off by default, switched on one at a time.
LEVERS_OFF: dict[str, dict] = {
    "sdpa": {"sdpa": False},
    "per-batch padding": {"pad_per_batch": False, "sort_by_length": False},
    "length-sorted batches": {"sort_by_length": False},
    "head at last token": {"last_token_head": False},
    "bf16 autocast": {"bf16": False, "bf16_frozen_base": False},
    "bf16 frozen base": {"bf16_frozen_base": False},
    "fused AdamW": {"fused_adamw": False},
    "no per-step sync": {"sync_free": False},
    "CUDA graphs": {"cuda_graphs": False, "pad_multiple": 1},
    "torch.compile": {"compile": False},
}
LEVERS_ON: dict[str, dict] = {
    "length-sorted batches": {"sort_by_length": True},
    "CUDA graphs": {"cuda_graphs": True, "pad_multiple": 16, "compile": False},
}
CUDA_ONLY = ("bf16 autocast", "bf16 frozen base", "fused AdamW", "no per-step sync", "CUDA graphs")


def lever_study_levers(levers: Levers, device: torch.device) -> dict[str, Levers]:
    """``levers`` with one lever switched off ("without ...") or on ("with ..."), for every
    lever that matters on ``device``."""
    study = {}
    for prefix, changes, is_on in (("without", LEVERS_OFF, True), ("with", LEVERS_ON, False)):
        for name, change in changes.items():
            lever = next(iter(change))  # the lever's own field comes first
            if bool(getattr(levers, lever)) == is_on and (
                device.type == "cuda" or name not in CUDA_ONLY
            ):
                study[f"{prefix} {name}"] = replace(levers, **change)
    return study


def autocast(levers: Levers, device: torch.device):
    """bf16 autocast when the levers ask for it and the GPU supports it, else a no-op. (Its
    weight cache is off, as CUDA graph capture requires.)"""
    return autocast_for(device, cache_enabled=False) if levers.bf16 else nullcontext()


def classification_loader(
    dataset: MessageDataset,
    batch_size: int,
    levers: Levers,
    train: bool,
    longest: int = 0,
    seed: int = 123,
) -> DataLoader:
    """Batches of ``dataset`` padded as the levers say (``longest``: the length every batch is
    padded to without ``pad_per_batch``). Training batches are shuffled, seeded: every run sees
    the same batches (other ones with ``sort_by_length``); evaluation batches keep their order."""
    min_length = 0 if levers.pad_per_batch else longest
    collate = partial(pad_collate, multiple=levers.pad_multiple, min_length=min_length)
    if train and levers.sort_by_length:
        lengths = [len(ids) for ids in dataset.ids]
        sampler = LengthBucketSampler(lengths, batch_size, pool_batches=8, seed=seed)
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        drop_last=train,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(seed) if train else None,
    )


def all_positions_logits(
    model: nn.Module, input_ids: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """The naive head: class logits at every position, then the last real token's row."""
    logits = model(input_ids)
    return logits[torch.arange(len(lengths), device=logits.device), lengths - 1]


def set_sdpa(model: nn.Module, on: bool) -> None:
    """Switch every attention layer between the fused kernel and the explicit computation."""
    for module in model.modules():
        if isinstance(module, MultiHeadAttention):
            module.use_sdpa = on


@torch.no_grad()
def cast_frozen_base(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Store the frozen linear layers under LoRA adapters in ``dtype``; returns how many.

    Under bf16 autocast every fp32 weight is rounded to bf16 at each use anyway (and that copy
    is kept for the backward pass); storing the frozen ones that way once gives the same
    numbers without the casts and their memory. Run such a model under bf16 autocast only.
    """
    frozen = [m.linear for m in lora_layers(model).values() if not m.linear.weight.requires_grad]
    for linear in frozen:
        linear.to(dtype)
    return len(frozen)


def train_classifier(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    epochs: int,
    lr: float,
    levers: Levers,
    weight_decay: float = 0.01,
    grad_clip: float | None = 1.0,
    logits_fn: LogitsFn | None = None,
) -> list[float]:
    """Fine-tune ``model`` (already on ``device``, its trainable parameters chosen) with AdamW
    for ``epochs`` epochs of ``loader``; returns each epoch's mean training loss.

    ``logits_fn(model, input_ids, lengths)`` gives the class logits (default: our GPT's head at
    the last real token, or at every position without ``levers.last_token_head``).
    """
    set_sdpa(model, levers.sdpa)
    if levers.uses_bf16(device) and levers.bf16_frozen_base:
        cast_frozen_base(model)
    logits_fn = logits_fn or default_logits_fn(levers)
    if levers.compile:
        logits_fn = torch.compile(logits_fn)
    params = [p for p in model.parameters() if p.requires_grad]
    if levers.fused_adamw:
        optimizer = adamw(params, lr, weight_decay, device)
    else:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def loss_and_grad(batch: list[torch.Tensor]) -> torch.Tensor:
        input_ids, lengths, labels = batch
        with autocast(levers, device):
            logits = logits_fn(model, input_ids, lengths)
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        return loss.detach()

    graphed = GraphedStep(loss_and_grad, params) if levers.cuda_graphs else None
    model.train()
    epoch_losses = []
    for _ in range(epochs):
        total = torch.zeros((), device=device) if levers.sync_free else 0.0
        for batch in loader:
            batch = [t.to(device, non_blocking=levers.sync_free) for t in batch]
            loss = optimizer_step(optimizer, loss_and_grad, batch, params, grad_clip, graphed)
            total += loss if levers.sync_free else loss.item()
        epoch_losses.append(total / len(loader))
    return [float(loss) for loss in epoch_losses]  # one sync, at the very end


def default_logits_fn(levers: Levers) -> LogitsFn:
    return last_token_logits if levers.last_token_head else all_positions_logits


@torch.no_grad()
def accuracy_percent(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    levers: Levers,
    logits_fn: LogitsFn | None = None,
) -> float:
    """Share of correctly classified messages of ``loader``, in percent."""
    logits_fn = logits_fn or default_logits_fn(levers)
    model.eval()
    correct = torch.zeros((), device=device, dtype=torch.long)
    for input_ids, lengths, labels in loader:
        with autocast(levers, device):
            logits = logits_fn(model, input_ids.to(device), lengths.to(device))
        correct += (logits.argmax(dim=-1) == labels.to(device)).sum()
    return 100 * correct.item() / len(loader.dataset)
