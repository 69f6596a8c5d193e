"""Training loop, evaluation and checkpoints (safetensors + the config that built the model)."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .model import GPTConfig, GPTModel

CHECKPOINT_FORMAT = "lora_helpers.gpt.v1"
LossFn = Callable[[torch.nn.Module, tuple[torch.Tensor, ...], torch.device], torch.Tensor]


class CheckpointError(RuntimeError):
    """A checkpoint is not ours, or does not fit the model it is loaded into."""


def lm_loss(
    model: torch.nn.Module, batch: tuple[torch.Tensor, ...], device: torch.device
) -> torch.Tensor:
    """Next-token cross-entropy, averaged over every position of the batch."""
    inputs, targets = (t.to(device, non_blocking=True) for t in batch)
    logits = model(inputs)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def autocast_for(device: torch.device, cache_enabled: bool = True):
    """bf16 autocast on GPUs that support it (faster, half the activation memory), else a no-op.
    (CUDA graph capture needs ``cache_enabled=False``.)"""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache_enabled)
    return nullcontext()


def adamw(params, lr: float, weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; on a CUDA GPU its fused version (one kernel updates every parameter)."""
    fused = True if device.type == "cuda" else None
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: Iterable,
    device: torch.device,
    loss_fn: LossFn = lm_loss,
    max_batches: int | None = None,
) -> float:
    """Mean loss over (at most ``max_batches`` of) ``loader``, in eval mode."""
    was_training = model.training
    model.eval()
    losses = []
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        with autocast_for(device):
            losses.append(loss_fn(model, batch, device).item())
    model.train(was_training)
    if not losses:
        raise ValueError("The evaluation loader is empty: use more data or a smaller batch size.")
    return sum(losses) / len(losses)


def cosine_schedule(max_steps: int, warmup_steps: int, min_ratio: float = 0.1):
    """Learning-rate multiplier: linear warm-up, then cosine decay to ``min_ratio``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@dataclass
class History:
    """What happened during training, for plots and reports."""

    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    learning_rate: list[float] = field(default_factory=list)
    best_val_loss: float = math.inf
    best_step: int = -1
    seconds: float = 0.0
    metrics: list[dict[str, float]] = field(default_factory=list)  # from ``eval_metrics``


def train(
    model: torch.nn.Module,
    train_loader: Iterable,
    val_loader: Iterable,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    max_steps: int,
    eval_every: int,
    eval_batches: int | None = None,
    loss_fn: LossFn = lm_loss,
    grad_clip: float | None = 1.0,
    lr_schedule: Callable[[int], float] | None = None,
    checkpoint_path: str | Path | None = None,
    checkpoint_metadata: dict | None = None,
    eval_metrics: Callable[[torch.nn.Module], dict[str, float]] | None = None,
) -> History:
    """Train for ``max_steps`` optimizer steps, cycling through ``train_loader``.

    Every ``eval_every`` steps (and at the end) the validation loss is measured; when it is the
    best so far and ``checkpoint_path`` is given, the model is saved there (with the step, the
    validation loss and ``checkpoint_metadata``). ``eval_metrics(model)``, if given, is called
    at each evaluation too (e.g. to measure accuracy) and its results go to ``history.metrics``.
    """
    history = History()
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    running, n_running = torch.zeros((), device=device), 0  # on the device: no sync per step
    start = time.perf_counter()
    model.train()
    batches = _cycle(train_loader)
    progress = tqdm(range(max_steps), desc="training")
    for step in progress:
        if lr_schedule is not None:
            for group, base_lr in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = base_lr * lr_schedule(step)
        with autocast_for(device):
            loss = loss_fn(model, next(batches), device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        running += loss.detach().float()
        n_running += 1

        if (step + 1) % eval_every == 0 or step + 1 == max_steps:
            val_loss = evaluate(model, val_loader, device, loss_fn, eval_batches)
            history.steps.append(step + 1)
            history.train_loss.append(running.item() / n_running)
            history.val_loss.append(val_loss)
            history.learning_rate.append(optimizer.param_groups[0]["lr"])
            if eval_metrics is not None:
                history.metrics.append(eval_metrics(model))
                model.train()
            running, n_running = torch.zeros((), device=device), 0
            if val_loss < history.best_val_loss:
                history.best_val_loss, history.best_step = val_loss, step + 1
                if checkpoint_path is not None:
                    save_checkpoint(
                        checkpoint_path,
                        model,
                        step=step + 1,
                        val_loss=val_loss,
                        **(checkpoint_metadata or {}),
                    )
            progress.set_postfix(train=f"{history.train_loss[-1]:.3f}", val=f"{val_loss:.3f}")
    history.seconds = time.perf_counter() - start
    return history


def _cycle(loader: Iterable):
    """Yield batches forever, starting a new epoch (a new shuffle) whenever one ends."""
    while True:
        yield from loader


# --- checkpoints -----------------------------------------------------------------------------


def _expected_keys(model: GPTModel) -> set[str]:
    keys = set(model.state_dict())
    if model.cfg.tie_weights:
        keys.discard("out_head.weight")  # stored once, as tok_emb.weight
    return keys


def save_checkpoint(path: str | Path, model: GPTModel, **metadata) -> Path:
    """Save the weights as safetensors with the model's config (and any JSON-able metadata),
    written atomically so an interrupted save never leaves a broken file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    tensors = {k: state[k].detach().contiguous().cpu() for k in _expected_keys(model)}
    meta = {"format": CHECKPOINT_FORMAT, "config": json.dumps(model.cfg.to_dict())}
    meta |= {key: json.dumps(value) for key, value in metadata.items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def read_checkpoint_metadata(path: str | Path) -> dict:
    """The config and metadata stored in a checkpoint, without loading its weights."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No checkpoint at {path}.")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from err
    if raw.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a lora_helpers GPT checkpoint (format {raw.get('format')!r}, "
            f"expected {CHECKPOINT_FORMAT!r}). Save checkpoints with save_checkpoint()."
        )
    return {key: json.loads(value) for key, value in raw.items() if key != "format"}


def load_checkpoint(
    path: str | Path, model: GPTModel | None = None, device: str | torch.device = "cpu"
) -> tuple[GPTModel, dict]:
    """Load a checkpoint into ``model`` (or a new GPTModel built from the stored config).

    Raises CheckpointError, naming the differences, if the checkpoint's architecture does not
    match ``model``'s or its tensors do not match the model's parameters exactly.
    """
    meta = read_checkpoint_metadata(path)
    stored = GPTConfig(**meta.pop("config"))
    if model is None:
        model = GPTModel(stored)
    else:
        diffs = [
            f"{f.name}: checkpoint {getattr(stored, f.name)} vs model {getattr(model.cfg, f.name)}"
            for f in fields(GPTConfig)
            if f.name != "drop_rate" and getattr(stored, f.name) != getattr(model.cfg, f.name)
        ]
        if diffs:
            raise CheckpointError(
                f"{path} was saved from a different architecture ({'; '.join(diffs)}). "
                "Load it with load_checkpoint(path) to build the matching model."
            )
    tensors = load_file(str(path), device=str(device))
    expected = _expected_keys(model)
    missing, extra = sorted(expected - tensors.keys()), sorted(tensors.keys() - expected)
    if missing or extra:
        raise CheckpointError(f"{path} does not fit the model: missing {missing}, extra {extra}")
    model.load_state_dict(tensors, strict=False)
    return model.to(device), meta
