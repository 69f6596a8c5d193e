"""The switches that turn the fine-tuning path's speed-ups off: the naive baseline and the lever
study of ``benchmarks/finetune_speed.py``. The library has no such switches: the pieces a lever
swaps are built here and plugged into the library's loop, ``train.train`` (called as
``finetune.finetune`` calls it, without the per-epoch accuracies):

- ``sdpa``: PyTorch's fused attention, or the explicit softmax(QKᵀ/√d)V;
- ``pad_per_batch``: each batch padded to its longest message, or all to the training set's
  (``pad_to_width``);
- ``length_buckets``: batches of similar length (``data.LengthBucketSampler``), or random ones
  (``ShuffledBatches``) — with ``pad_per_batch`` off the batches hold the same messages;
- ``last_token_head``: the class head at the last real token only, or at every position;
- ``last_token_block``: the last block at the last real token only (``hidden_states(ids,
  last)``), or at every position, the head then reading the last token's row;
- ``fused_adamw``: ``fast.adamw``, or plain ``torch.optim.AdamW``;
- ``autocast``, ``cuda_graphs`` (CUDA GPUs only): ``train.train`` uses both wherever the device
  has them; a run with either off trains in ``own_loop``, the same steps and evaluations with
  the same pieces (``fast.GraphedStep``, ``fast.optimizer_step``), each switch its own;
- ``bf16_frozen_base``: ``cast_frozen_base`` (below) (CUDA GPUs with bf16 only; off in ours);
- ``compile``: ``torch.compile`` on the model (off in ours: on our short runs of many batch
  shapes its compilations cost more than they save; the study measures it);
- ``fused_qkv``: each attention layer's frozen q/k/v products in one GEMM over weights
  concatenated once, and their LoRA A factors in one product (``benchmarks.fused_qkv``; off in
  ours, where it has not paid).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, fields, replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler

from benchmarks.fused_qkv import fuse_qkv
from lora_helpers import finetune as ft
from lora_helpers.checkpoints import Batches
from lora_helpers.data import PAD_ID, Message
from lora_helpers.device import capabilities
from lora_helpers.fast import GraphedStep, adamw, optimizer_step
from lora_helpers.lora_model import lora_layers
from lora_helpers.model import GPTModel, MultiHeadAttention, at_positions, eval_mode
from lora_helpers.train import History, LossFn, Schedule, train

RANK = ALPHA = 16
LogitsFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


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
    fused_qkv: bool = False


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


def logits_fn(levers: Levers) -> LogitsFn:
    if not levers.last_token_head:
        return all_positions_logits
    return ft.last_token_logits if levers.last_token_block else every_position_logits


def loss_with(logits: LogitsFn) -> LossFn:
    """``finetune.classification_loss`` with the class logits of ``logits(model, ids, lengths)``."""

    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, ...], device: torch.device):
        input_ids, lengths, labels = batch
        out = logits(model, input_ids.to(device, non_blocking=True), lengths)
        return F.cross_entropy(out.float(), labels.to(device, non_blocking=True))

    return loss_fn


@torch.inference_mode()
def unseen_accuracy(
    model: nn.Module,
    loader: DataLoader,
    split: dict[str, list[Message]],
    device: torch.device,
    logits: LogitsFn,
) -> float:
    """``finetune.accuracy_on_test``'s unseen accuracy, with the class logits of ``logits``."""
    caps, predictions, truth = capabilities(device), [], []
    with eval_mode(model):
        for input_ids, lengths, labels in loader:
            with caps.autocast():
                predictions.append(logits(model, input_ids.to(device), lengths).argmax(-1).cpu())
            truth.append(labels)
    correct = torch.cat(predictions) == torch.cat(truth)
    return correct[ft.unseen_test_mask(split)].float().mean().item()


def set_sdpa(model: torch.nn.Module, on: bool) -> None:
    """Switch every attention layer between the fused kernel and the explicit computation."""
    for module in model.modules():
        if isinstance(module, MultiHeadAttention):
            module.use_sdpa = on


class ShuffledBatches(Sampler[list[int]]):
    """Random batches, a new shuffle each epoch: ``data.LengthBucketSampler``'s draws (the
    messages' order, then the batches') without its pools of similar length."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size = n, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.n // self.batch_size  # the last incomplete batch is dropped

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.n, generator=self.generator).tolist()
        size = self.batch_size
        batches = [order[i : i + size] for i in range(0, len(self) * size, size)]
        for i in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[i]


def pad_to_width(batch: list, collate: Callable, width: int) -> tuple[torch.Tensor, ...]:
    """``collate``'s batch, padded on the right to at least ``width`` tokens."""
    input_ids, lengths, labels = collate(batch)
    padding = max(0, width - input_ids.shape[1])
    return F.pad(input_ids, (0, padding), value=PAD_ID), lengths, labels


def loaders_for(
    loaders: dict[str, DataLoader], levers: Levers, longest: int, seed: int
) -> dict[str, DataLoader]:
    """``loaders`` (``data.message_loaders``) as the levers say: the same batch sampler (so
    the same batches, reseeded before training), every batch padded as a message of ``longest``
    tokens is without ``pad_per_batch``; random batches without ``length_buckets``."""
    if levers.pad_per_batch and levers.length_buckets:
        return loaders
    out = {}
    for name, loader in loaders.items():
        collate = loader.collate_fn
        if not levers.pad_per_batch:
            width = collate([([0] * longest, 0)])[0].shape[1]  # rounded and capped as ours
            collate = partial(pad_to_width, collate=loader.collate_fn, width=width)
        if name == "train":
            sampler = loader.batch_sampler
            if not levers.length_buckets:
                sampler = ShuffledBatches(len(loader.dataset), sampler.batch_size, seed)
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
    """``fit`` with ``levers``' pieces: attention, head, optimizer, precision, CUDA graphs."""
    set_sdpa(model, levers.sdpa)
    if levers.bf16_frozen_base and levers.autocast and capabilities(device).bf16_autocast:
        cast_frozen_base(model)
    if levers.fused_qkv:
        fuse_qkv(model)
    if levers.compile:
        model.compile(dynamic=True)  # in place: the batches come in many lengths
    params = [p for p in model.parameters() if p.requires_grad]
    if levers.fused_adamw:
        optimizer = adamw(params, lr, recipe.weight_decay, device)
    else:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=recipe.weight_decay)
    loss_fn, graphs = loss_with(logits_fn(levers)), levers.cuda_graphs and not levers.compile
    return fit(model, loaders, device, recipe, optimizer, loss_fn, levers.autocast, graphs)


def fit(
    model: nn.Module,
    loaders: dict[str, DataLoader],
    device: torch.device,
    recipe: ft.FinetuneRecipe,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    autocast: bool = True,
    graphs: bool = True,
) -> History:
    """What ``finetune.finetune`` runs, without the accuracies: ``recipe.epochs`` epochs of the
    seeded batches, the validation loss (messages sorted by length) after each; through
    ``train.train``, or ``own_loop`` with ``autocast`` or CUDA ``graphs`` off."""
    steps = len(loaders["train"])
    loaders["train"].batch_sampler.generator.manual_seed(recipe.seed)  # same batches, same order
    args = (model, loaders["train"], ft.by_length(loaders["validation"]), optimizer, device)
    schedule = Schedule(recipe.epochs * steps, steps)
    if autocast and graphs:
        return train(*args, schedule, loss_fn, progress=False)
    return own_loop(*args, schedule, loss_fn, autocast, graphs)


def own_loop(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    schedule: Schedule,
    loss_fn: LossFn,
    autocast: bool,
    graphs: bool,
) -> History:
    """``train.train``'s steps and evaluations (without resuming, checkpoints or DDP), with bf16
    ``autocast`` and CUDA ``graphs`` each used only if asked and the device has it."""
    caps, trainable = capabilities(device), [p for p in model.parameters() if p.requires_grad]
    graphed = graphs and caps.cuda_graphs

    def precision(cache_enabled: bool = True):
        return caps.autocast(cache_enabled=cache_enabled) if autocast else nullcontext()

    def loss_and_grad(batch: list[torch.Tensor]) -> torch.Tensor:
        with precision(cache_enabled=not graphed):  # capture: no cache
            loss = loss_fn(model, batch, device)
        loss.backward()
        return loss.detach()

    graphed_step = GraphedStep(loss_and_grad, trainable) if graphed else None
    batches, history, start = Batches(train_loader), History(), time.perf_counter()
    running, n_running = torch.zeros((), device=device), 0
    model.train()
    for done in range(1, schedule.max_steps + 1):
        batch = [t.to(device, non_blocking=True) for t in next(batches)]
        clip = schedule.grad_clip
        running += optimizer_step(optimizer, loss_and_grad, batch, trainable, clip, graphed_step)
        n_running += 1
        if done % schedule.eval_every == 0 or done == schedule.max_steps:
            total, targets = torch.zeros((), device=device), 0
            with torch.inference_mode(), eval_mode(model):
                for val_batch in val_loader:
                    with precision():
                        total += loss_fn(model, val_batch, device).float() * len(val_batch[-1])
                    targets += len(val_batch[-1])
            history.record(done, running.item() / n_running, total.item() / targets)
            running, n_running = torch.zeros((), device=device), 0
    history.seconds = time.perf_counter() - start
    return history


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
