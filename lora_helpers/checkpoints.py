"""Checkpoints (safetensors + the config that built the model) and resuming an interrupted run
(``train.train`` with ``Saving(resume_path=...)``): the files, their checks and what they hold.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .files import atomic_write
from .model import GPTConfig, GPTModel
from .settings import display_path

CHECKPOINT_FORMAT = "lora_helpers.gpt.v1"
RESUME_FORMAT = "lora_helpers.resume.v1"
# A resume file starts with this, 64 hex digits (the sha256 of the rest) and a newline, then
# holds torch.save's bytes; files written before the checksum hold torch.save's bytes alone.
RESUME_HEADER = b"lora_helpers.resume sha256="


class CheckpointError(RuntimeError):
    """A checkpoint is not ours, or does not fit the model it is loaded into."""


@dataclass(frozen=True)
class Saving:
    """What a training run saves: its best model so far (``checkpoint_path``, with
    ``checkpoint_metadata``), and every ``save_every`` steps (default: at every evaluation)
    the state to resume from after an interruption (``resume_path``)."""

    checkpoint_path: str | Path | None = None
    checkpoint_metadata: dict | None = None
    resume_path: str | Path | None = None
    save_every: int | None = None

    def identity(self, max_steps: int, eval_every: int) -> str:
        """What a resume file must have been saved by: the same step counts and metadata."""
        run = {"max_steps": max_steps, "eval_every": eval_every}
        return json.dumps(run | {"metadata": self.checkpoint_metadata}, sort_keys=True, default=str)

    def can_resume(self) -> bool:
        """Whether there is a resume file to continue from."""
        return self.resume_path is not None and Path(self.resume_path).exists()

    def resume_due(self, done: int, max_steps: int, eval_every: int) -> bool:
        """Whether to save the resume state after ``done`` steps (never after the last)."""
        every = self.save_every or eval_every
        return self.resume_path is not None and done < max_steps and done % every == 0

    def save_best(self, model: GPTModel, step: int, val_loss: float) -> None:
        """Save ``model``, the best so far, with its step and validation loss (if asked)."""
        if self.checkpoint_path is not None:
            metadata = self.checkpoint_metadata or {}
            save_checkpoint(self.checkpoint_path, model, step=step, val_loss=val_loss, **metadata)

    def finish(self, mark: bool) -> None:
        """The run is complete: ``mark`` its checkpoint finished, then delete the resume file
        (in that order: the checkpoint's mark is the run's last trace)."""
        if self.checkpoint_path is not None and mark:
            mark_finished(self.checkpoint_path)
        if self.resume_path is not None:
            Path(self.resume_path).unlink(missing_ok=True)


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


# --- resuming---------------------------------------------------------------------------------


def save_resume_state(
    path: str | Path,
    identity: str,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Batches,
    history: dict,
    running: torch.Tensor,
    n_running: int,
) -> None:
    """Write what ``train`` needs to continue after ``step`` (``history``: the run's
    ``History`` as a dict), atomically: an interrupted save leaves the previous file intact."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    state = {
        "format": RESUME_FORMAT,
        "identity": identity,
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": {"cpu": torch.get_rng_state(), "cuda": cuda},
        "data": batches.position(),
        "history": history,
        "running": [running.item(), n_running],
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getbuffer()
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        f.write(RESUME_HEADER + hashlib.sha256(payload).hexdigest().encode() + b"\n")
        f.write(payload)


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
) -> tuple[int, dict, float, int]:
    """Restore a resume file into ``model``, ``optimizer``, the RNGs and ``batches``; returns
    (step, history as a dict, running loss sum, its count). Refuses a damaged file or one of
    another run."""
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
    return state["step"], state["history"], running_sum, n_running


# --- checkpoints -----------------------------------------------------------------------------


def _expected_keys(model: GPTModel) -> set[str]:
    keys = set(model.state_dict())
    if model.cfg.tie_weights:
        keys.discard("out_head.weight")  # stored once, as tok_emb.weight
    return keys


def save_checkpoint(path: str | Path, model: GPTModel, **metadata) -> Path:
    """Save the weights as safetensors with the model's config (and any JSON-able metadata),
    written atomically so an interrupted save never leaves a broken file."""
    state = model.state_dict()
    tensors = {k: state[k].detach().contiguous().cpu() for k in _expected_keys(model)}
    meta = {"format": CHECKPOINT_FORMAT, "config": json.dumps(model.cfg.to_dict())}
    meta |= {key: json.dumps(value) for key, value in metadata.items()}
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


def mark_finished(path: str | Path) -> None:
    """Record in a checkpoint's metadata that its run completed (``finished: true``),
    atomically: a checkpoint without it may be the best so far of an interrupted run."""
    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() | {"finished": json.dumps(True)}
    with atomic_write(path) as tmp:
        save_file(load_file(str(path)), str(tmp), metadata=metadata)


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
