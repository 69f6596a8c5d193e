"""Training loop, evaluation and checkpoints (safetensors + the config that built the model)."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .device import capabilities
from .fast import GraphedStep, autocast_for, lm_autocast, optimizer_step
from .model import GPTConfig, GPTModel
from .settings import display_path

CHECKPOINT_FORMAT = "lora_helpers.gpt.v1"
RESUME_FORMAT = "lora_helpers.resume.v1"
# A resume file starts with this, 64 hex digits (the sha256 of the rest) and a newline, then
# holds torch.save's bytes; files written before the checksum hold torch.save's bytes alone.
RESUME_HEADER = b"lora_helpers.resume sha256="
LossFn = Callable[[torch.nn.Module, tuple[torch.Tensor, ...], torch.device], torch.Tensor]


class CheckpointError(RuntimeError):
    """A checkpoint is not ours, or does not fit the model it is loaded into."""


def lm_loss(
    model: torch.nn.Module, batch: tuple[torch.Tensor, ...], device: torch.device
) -> torch.Tensor:
    """Next-token cross-entropy, averaged over every position of the batch (in bf16 on a CPU
    with bf16 in hardware: ``fast.lm_autocast``)."""
    inputs, targets = (t.to(device, non_blocking=True) for t in batch)
    with lm_autocast(device):
        logits = model(inputs)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module,
    loader: Iterable,
    device: torch.device,
    loss_fn: LossFn = lm_loss,
    max_batches: int | None = None,
    autocast: bool = True,
) -> float:
    """Mean loss per target over (at most ``max_batches`` of) ``loader``, in eval mode: each
    batch's mean loss weighs as many targets as it has (``batch[-1]``: B×T next tokens, or B
    labels), so a short last batch counts no more than its messages. ``autocast``: as in
    ``train``."""
    was_training = model.training
    model.eval()
    total, targets = torch.zeros((), device=device), 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        with autocast_for(device) if autocast else nullcontext():
            loss = loss_fn(model, batch, device)
        total += loss.float() * batch[-1].numel()
        targets += batch[-1].numel()
    model.train(was_training)
    if not targets:
        raise ValueError("The evaluation loader is empty: use more data or a smaller batch size.")
    return total.item() / targets


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
    cuda_graphs: bool = True,
    autocast: bool = True,
    progress: bool = True,
    resume_path: str | Path | None = None,
    save_every: int | None = None,
) -> History:
    """Train for ``max_steps`` optimizer steps, cycling through ``train_loader``.

    Every ``eval_every`` steps (and at the end) the validation loss is measured; when it is the
    best so far and ``checkpoint_path`` is given, the model is saved there (with the step, the
    validation loss and ``checkpoint_metadata``), and marked ``finished`` once the run completes
    (``mark_finished``). ``eval_metrics(model)``, if given, is called at each evaluation too
    (e.g. to measure accuracy) and its results go to ``history.metrics``; it must not iterate
    ``train_loader``, whose shuffle would then change the later epochs' batches (use a loader
    of the same data that does not shuffle, as ``finetune.by_length``).

    On a CUDA GPU with ``cuda_graphs``, each step's forward and backward pass is captured once
    per batch shape and replayed (``GraphedStep``): the same math, without the GPU waiting for
    Python to launch every small kernel. Batches of few shapes (e.g. lengths padded to a
    multiple of 16) make the most of it. With ``autocast`` the forward passes run in bf16 where
    the device has it (``fast.autocast_for``). ``cuda_graphs=False, autocast=False`` and a
    plain optimizer switch the speed-ups off (the benchmark's naive baseline). ``progress``
    draws a progress bar.

    With ``resume_path``, everything needed to continue (model, optimizer, step, RNG states,
    data position, history) is saved there atomically every ``save_every`` steps (default:
    ``eval_every``); a run started again with the same arguments continues from it to the
    same final weights, and the file is deleted once the run completes. Exact for a train
    loader that is not shuffled or draws its shuffle from a ``generator`` of its own or of its
    batch sampler (the language-model and message loaders do).

    Under ``torchrun``, pass the model wrapped in DistributedDataParallel and each rank's shard
    of the batches (``lora_helpers.distributed``): rank 0 alone evaluates, calls
    ``eval_metrics``, writes checkpoints (of the unwrapped model) and fills the history (its
    training loss is that of rank 0's shards).
    """
    history = History()
    ddp = isinstance(model, DistributedDataParallel)
    core = model.module if ddp else model  # what is evaluated and saved
    main = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    running, n_running = torch.zeros((), device=device), 0  # on the device: no sync per step
    graphed = cuda_graphs and capabilities(device).cuda_graphs and not ddp
    batches = Batches(train_loader)
    identity = json.dumps(
        {"max_steps": max_steps, "eval_every": eval_every, "metadata": checkpoint_metadata},
        sort_keys=True,
        default=str,
    )
    first_step = 0
    if resume_path is not None and Path(resume_path).exists():
        first_step, history, running_sum, n_running = load_resume_state(
            resume_path, identity, model, optimizer, batches
        )
        running = torch.tensor(running_sum, device=device)
        print(f"Resuming from {display_path(resume_path)} at step {first_step} of {max_steps}.")

    def loss_and_grad(batch: list[torch.Tensor]) -> torch.Tensor:
        with autocast_for(device, not graphed) if autocast else nullcontext():  # capture: no cache
            loss = loss_fn(model, batch, device)
        loss.backward()
        return loss.detach()

    trainable = [p for p in model.parameters() if p.requires_grad]
    graphed_step = GraphedStep(loss_and_grad, trainable) if graphed else None
    start = time.perf_counter() - history.seconds
    model.train()
    steps = tqdm(
        range(first_step, max_steps),
        desc="training",
        initial=first_step,
        total=max_steps,
        disable=not progress or not main,
    )
    for step in steps:
        if lr_schedule is not None:
            for group, base_lr in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = base_lr * lr_schedule(step)
        batch = [t.to(device, non_blocking=True) for t in next(batches)]
        loss = optimizer_step(optimizer, loss_and_grad, batch, trainable, grad_clip, graphed_step)
        running += loss.float()
        n_running += 1

        if main and ((step + 1) % eval_every == 0 or step + 1 == max_steps):
            val_loss = evaluate(core, val_loader, device, loss_fn, eval_batches, autocast)
            history.steps.append(step + 1)
            history.train_loss.append(running.item() / n_running)
            history.val_loss.append(val_loss)
            if eval_metrics is not None:
                history.metrics.append(eval_metrics(core))
                model.train()
            running, n_running = torch.zeros((), device=device), 0
            if val_loss < history.best_val_loss:
                history.best_val_loss, history.best_step = val_loss, step + 1
                if checkpoint_path is not None:
                    save_checkpoint(
                        checkpoint_path,
                        core,
                        step=step + 1,
                        val_loss=val_loss,
                        **(checkpoint_metadata or {}),
                    )
            steps.set_postfix(train=f"{history.train_loss[-1]:.3f}", val=f"{val_loss:.3f}")
        done = step + 1
        resumable = resume_path is not None and main and done < max_steps
        if resumable and done % (save_every or eval_every) == 0:
            history.seconds = time.perf_counter() - start
            save_resume_state(
                resume_path, identity, done, model, optimizer, batches, history, running,
                n_running,
            )  # fmt: skip
    history.seconds = time.perf_counter() - start
    if checkpoint_path is not None and main and history.best_step >= 0:
        mark_finished(checkpoint_path)  # before the resume file goes: the run's last trace
    if resume_path is not None:
        Path(resume_path).unlink(missing_ok=True)  # the run is complete: nothing to resume
    return history


class Batches:
    """Batches forever, a new epoch (a new shuffle) whenever one ends, knowing its position:
    the loader generator's state at the current epoch's start and the batches drawn since."""

    def __init__(self, loader: Iterable):
        self.loader = loader
        # The generator the shuffle draws from: the loader's own, or its batch sampler's (the
        # message loaders shuffle in data.LengthBucketSampler).
        sampler = getattr(loader, "batch_sampler", None)
        self.generator: torch.Generator | None = getattr(loader, "generator", None) or getattr(
            sampler, "generator", None
        )
        self.epoch_start: torch.Tensor | None = None
        self.in_epoch = 0
        self.iterator = None

    def __next__(self):
        if self.iterator is None:
            self.epoch_start = None if self.generator is None else self.generator.get_state()
            self.iterator, self.in_epoch = iter(self.loader), 0
        try:
            batch = next(self.iterator)
        except StopIteration:
            if self.in_epoch == 0:
                raise ValueError("The training loader is empty: use more data.") from None
            self.iterator = None
            return next(self)
        self.in_epoch += 1
        return batch

    def position(self) -> dict:
        """Where the next batch comes from, as ``restore`` takes it."""
        return {"epoch_start": self.epoch_start, "in_epoch": self.in_epoch}

    def restore(self, position: dict) -> None:
        """Go back to a saved position: replay the epoch's shuffle, skip the batches drawn."""
        if position["epoch_start"] is not None:
            self.generator.set_state(position["epoch_start"])
        self.iterator, self.in_epoch = None, 0
        if position["in_epoch"]:
            next(self)  # starts the epoch (the same shuffle), draws one batch
        while self.in_epoch < position["in_epoch"]:
            next(self)


# --- resuming --------------------------------------------------------------------------------


def save_resume_state(
    path: str | Path,
    identity: str,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Batches,
    history: History,
    running: torch.Tensor,
    n_running: int,
) -> None:
    """Write what ``train`` needs to continue after ``step``, atomically (temporary file, then
    rename): an interrupted save leaves the previous resume file intact."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    state = {
        "format": RESUME_FORMAT,
        "identity": identity,
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": {"cpu": torch.get_rng_state(), "cuda": cuda},
        "data": batches.position(),
        "history": asdict(history),
        "running": [running.item(), n_running],
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getbuffer()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(RESUME_HEADER + hashlib.sha256(payload).hexdigest().encode() + b"\n")
        f.write(payload)
    os.replace(tmp, path)


def read_resume_state(path: str | Path) -> dict:
    """What a resume file holds, its checksum verified: CheckpointError, naming the file, for
    a damaged one."""
    data = Path(path).read_bytes()
    if data.startswith(RESUME_HEADER):
        header, _, data = data.partition(b"\n")
        expected = header.removeprefix(RESUME_HEADER).decode(errors="replace")
        if (actual := hashlib.sha256(data).hexdigest()) != expected:
            raise CheckpointError(
                f"{display_path(path)} is corrupt: its sha256 is {actual[:12]}…, it records "
                f"{expected[:12]}… (a changed or truncated file). Delete it to restart the run "
                "from its first step."
            )
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)  # no code
    except Exception as err:  # a damaged file: pickle, zip or torch errors
        raise CheckpointError(
            f"{path} is not a readable resume checkpoint ({err}). Delete it to start over."
        ) from err
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        raise CheckpointError(f"{path} is not a resume checkpoint ({RESUME_FORMAT}).")
    return state


def load_resume_state(
    path: str | Path,
    identity: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Batches,
) -> tuple[int, History, float, int]:
    """Restore a resume file into ``model``, ``optimizer``, the RNGs and ``batches``; returns
    (step, history, running loss sum, its count). Refuses a damaged file or one of another run."""
    state = read_resume_state(path)
    if state["identity"] != identity:
        raise CheckpointError(
            f"{path} was saved by another run (another recipe or step count): resuming it would "
            f"mix two runs. Saved: {state['identity']}; now: {identity}. Delete it to start "
            "over, or run again with the recipe it was saved with."
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    batches.restore(state["data"])
    torch.set_rng_state(state["rng"]["cpu"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    running_sum, n_running = state["running"]
    return state["step"], History(**state["history"]), running_sum, n_running


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


def mark_finished(path: str | Path) -> None:
    """Record in a checkpoint's metadata that its run completed (``finished: true``),
    atomically: a checkpoint without it may be the best so far of an interrupted run."""
    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() | {"finished": json.dumps(True)}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(load_file(str(path)), str(tmp), metadata=metadata)
    os.replace(tmp, path)


def read_checkpoint_metadata(path: str | Path) -> dict:
    """The config and metadata stored in a checkpoint, without loading its weights."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No checkpoint at {path}.")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({err}): it is truncated or damaged. "
            "Copy it again, or delete it and train again."
        ) from err
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
