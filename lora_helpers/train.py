"""The training loop (the only one: pretraining, every fine-tuning variant, the benchmark),
evaluation and the learning-rate schedule. Checkpoints and resuming: ``lora_helpers.checkpoints``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .checkpoints import Batches, Saving, load_resume_state, save_resume_state
from .device import Capabilities, capabilities
from .fast import GraphedStep, optimizer_step
from .model import eval_mode
from .settings import display_path

LossFn = Callable[[torch.nn.Module, tuple[torch.Tensor, ...], torch.device], torch.Tensor]


def lm_loss(
    model: torch.nn.Module, batch: tuple[torch.Tensor, ...], device: torch.device
) -> torch.Tensor:
    """Next-token cross-entropy, averaged over every position of the batch (the vocabulary
    head's large product in bf16 where the device has it: ``Capabilities.autocast``)."""
    inputs, targets = (t.to(device, non_blocking=True) for t in batch)
    # No weight-cast cache: this may run inside the loop's CUDA graph capture.
    with capabilities(device).autocast(large_products=True, cache_enabled=False):
        logits = model(inputs)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module,
    loader: Iterable,
    device: torch.device,
    loss_fn: LossFn = lm_loss,
    max_batches: int | None = None,
) -> float:
    """Mean loss per target over (at most ``max_batches`` of) ``loader``, in eval mode: each
    batch's mean loss weighs as many targets as it has (``batch[-1]``: B×T next tokens, or B
    labels), so a short last batch counts no more than its messages."""
    caps = capabilities(device)
    total, targets = torch.zeros((), device=device), 0
    with eval_mode(model):
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            with caps.autocast():
                loss = loss_fn(model, batch, device)
            total += loss.float() * batch[-1].numel()
            targets += batch[-1].numel()
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

    def record(self, step: int, train_loss: float, val_loss: float) -> bool:
        """Add one evaluation; True when its validation loss is the best so far."""
        self.steps.append(step)
        self.train_loss.append(train_loss)
        self.val_loss.append(val_loss)
        if val_loss >= self.best_val_loss:
            return False
        self.best_val_loss, self.best_step = val_loss, step
        return True


@dataclass(frozen=True)
class Schedule:
    """How a run goes: ``max_steps`` optimizer steps, the validation loss every ``eval_every``
    steps (and at the end) over at most ``eval_batches`` batches, the learning rate multiplied
    by ``lr_schedule(step)``, the gradients' norm clipped to ``grad_clip``."""

    max_steps: int
    eval_every: int
    eval_batches: int | None = None
    lr_schedule: Callable[[int], float] | None = None
    grad_clip: float | None = 1.0


def train(
    model: torch.nn.Module,
    train_loader: Iterable,
    val_loader: Iterable,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    schedule: Schedule,
    loss_fn: LossFn = lm_loss,
    eval_metrics: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    progress: bool = True,
    saving: Saving | None = None,
) -> History:
    """Train as ``schedule`` says, cycling through ``train_loader``; returns the ``History``.

    At each evaluation ``eval_metrics(model)``, if given, goes to ``history.metrics`` (e.g. the
    accuracy); it must not iterate ``train_loader``, whose shuffle would then change the later
    epochs' batches (``finetune.by_length`` reads the same data without it). ``saving`` keeps
    the best model (``save_checkpoint``, marked ``finished`` once the run completes) and a
    resume file (``lora_helpers.checkpoints``): started again with the same arguments after an
    interruption, the run continues from the file's step to the same final weights (for a
    train loader that is not shuffled or shuffles with its own generator or its batch
    sampler's, as the language-model and message loaders do); the file is deleted at the end.

    Where the device has them (``device.capabilities``), the forward passes run in bf16 and on
    a CUDA GPU each step is captured once per batch shape as a CUDA graph and replayed
    (``fast.GraphedStep``): the same math, without the GPU waiting for Python. Under
    ``torchrun``, pass the model in DistributedDataParallel and each rank's shard of the batches
    (``lora_helpers.distributed``): rank 0 alone evaluates, calls ``eval_metrics``, saves (the
    unwrapped model) and fills the history (with its own shards' training loss).
    """
    caps, saving = capabilities(device), saving or Saving()
    ddp = isinstance(model, DistributedDataParallel)
    core = model.module if ddp else model  # what is evaluated and saved
    main = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    identity = saving.identity(schedule.max_steps, schedule.eval_every)
    batches, history, first_step = Batches(train_loader), History(), 0
    running, n_running = torch.zeros((), device=device), 0  # on the device: no sync per step
    base_lrs = [group["lr"] for group in optimizer.param_groups]  # before a resume changes them
    if saving.can_resume():
        first_step, state, running_sum, n_running = load_resume_state(
            saving.resume_path, identity, model, optimizer, batches
        )
        history, running = History(**state), torch.tensor(running_sum, device=device)
        where = f"{display_path(saving.resume_path)} at step {first_step}"
        print(f"Resuming from {where} of {schedule.max_steps}.")
    trainable = [p for p in model.parameters() if p.requires_grad]
    loss_and_grad, graphed_step = training_step(model, loss_fn, device, caps, trainable, ddp)
    start = time.perf_counter() - history.seconds
    model.train()
    steps = tqdm(
        range(first_step, schedule.max_steps),
        desc="training",
        initial=first_step,
        total=schedule.max_steps,
        disable=not progress or not main,
    )
    for step in steps:
        if schedule.lr_schedule is not None:
            for group, base_lr in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = base_lr * schedule.lr_schedule(step)
        batch = [t.to(device, non_blocking=True) for t in next(batches)]
        grad_clip = schedule.grad_clip
        loss = optimizer_step(optimizer, loss_and_grad, batch, trainable, grad_clip, graphed_step)
        running += loss.float()
        n_running += 1
        done = step + 1
        if main and (done % schedule.eval_every == 0 or done == schedule.max_steps):
            val_loss = evaluate(core, val_loader, device, loss_fn, schedule.eval_batches)
            best = history.record(done, running.item() / n_running, val_loss)
            if eval_metrics is not None:
                history.metrics.append(eval_metrics(core))
            if best:
                saving.save_best(core, done, val_loss)
            running, n_running = torch.zeros((), device=device), 0
            steps.set_postfix(train=f"{history.train_loss[-1]:.3f}", val=f"{val_loss:.3f}")
        if main and saving.resume_due(done, schedule.max_steps, schedule.eval_every):
            history.seconds = time.perf_counter() - start
            state = asdict(history)
            save_resume_state(
                saving.resume_path, identity, done, model, optimizer, batches, state, running,
                n_running,
            )  # fmt: skip
    history.seconds = time.perf_counter() - start
    saving.finish(mark=main and history.best_step >= 0)
    return history


def training_step(
    model: torch.nn.Module,
    loss_fn: LossFn,
    device: torch.device,
    caps: Capabilities,
    trainable: list[torch.nn.Parameter],
    ddp: bool,
) -> tuple[Callable[[list[torch.Tensor]], torch.Tensor], GraphedStep | None]:
    """The step's forward and backward pass (in bf16 where ``caps`` says), and on a CUDA GPU
    outside DDP its replay as CUDA graphs (``GraphedStep``), for ``fast.optimizer_step``."""
    graphed = caps.cuda_graphs and not ddp

    def loss_and_grad(batch: list[torch.Tensor]) -> torch.Tensor:
        with caps.autocast(cache_enabled=not graphed):  # capture: no cache
            loss = loss_fn(model, batch, device)
        loss.backward()
        return loss.detach()

    return loss_and_grad, GraphedStep(loss_and_grad, trainable) if graphed else None
