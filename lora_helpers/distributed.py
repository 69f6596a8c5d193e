"""Data-parallel fine-tuning with torch.distributed (notebook 10).

One process per device (launched by ``torchrun``), each holding a whole copy of the model and
its own slice of every batch. After each backward pass, DistributedDataParallel (DDP) averages
the gradients of the trainable parameters across processes with an all-reduce, so every copy
takes the same optimizer step. With LoRA, that all-reduce carries only the adapters and the
head. Gloo runs it between CPU processes, NCCL between GPUs.

    torchrun --standalone --nproc_per_node 2 -m lora_helpers.distributed --out runs/r16
    python -m lora_helpers.distributed --out runs/r16   # one process (default: lora-r16)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import redirect_stdout
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler

from .adapter_files import save_adapter
from .data import message_loaders, sms_spam_split
from .device import get_device
from .finetune import (
    VARIANTS,
    finetune,
    finetune_recipe,
    predict,
    prepare_variant,
    shrink_split,
    trainable_state_dict,
)
from .model import at_positions
from .params import count_parameters
from .pretrain import load_base_model
from .tokenizer import get_tokenizer


def rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the number of processes (0 and 1 without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> torch.device:
    """Join the process group that ``torchrun`` describes in the environment (NCCL with one GPU
    per process, else gloo on CPUs) and return this rank's device; alone, the best device."""
    if "LOCAL_RANK" not in os.environ:
        return get_device()
    local_rank = int(os.environ["LOCAL_RANK"])
    if int(os.environ["LOCAL_WORLD_SIZE"]) <= torch.cuda.device_count():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    get_device(verbose=dist.get_rank() == 0)  # one device report, from rank 0
    return device


class ShardedBatchSampler(Sampler[list[int]]):
    """Rank ``rank``'s share of every batch of ``batch_sampler``: every ``world_size``-th
    message, starting at its rank. Every rank draws the same batches (the same seeded
    generator, so a new shuffle each epoch, the same one everywhere; only training draws from
    it, rank 0's evaluation reads the messages in order), so N ranks on a batch of B see
    exactly the messages one process would. B must be divisible by N: with equal shards,
    DDP's average of the ranks' mean-loss gradients is the gradient of the whole batch's mean.
    """

    def __init__(self, batch_sampler: Sampler[list[int]], rank: int, world_size: int):
        batch_size = getattr(batch_sampler, "batch_size", None)
        if batch_size is not None and batch_size % world_size:
            raise ValueError(
                f"Batch size {batch_size} is not divisible by {world_size} processes: "
                "shards of unequal size would weight the messages unequally."
            )
        self.batch_sampler, self.rank, self.world_size = batch_sampler, rank, world_size

    @property
    def generator(self) -> torch.Generator:
        """The wrapped sampler's generator (reseeding it reseeds every rank alike)."""
        return self.batch_sampler.generator

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batch_sampler:
            if len(batch) % self.world_size:
                raise ValueError(
                    f"A batch of {len(batch)} cannot be split evenly over {self.world_size} "
                    "processes: use drop_last or a batch size divisible by the process count."
                )
            yield batch[self.rank :: self.world_size]


def shard_loader(loader: DataLoader, rank: int, world_size: int) -> DataLoader:
    """``loader`` (built with a batch sampler) yielding only rank ``rank``'s share of each batch."""
    sampler = ShardedBatchSampler(loader.batch_sampler, rank, world_size)
    return DataLoader(loader.dataset, batch_sampler=sampler, collate_fn=loader.collate_fn)


def wrap(model: nn.Module, device: torch.device) -> DistributedDataParallel:
    """``model`` in DDP: its trainable parameters (only those) are averaged after each backward.
    The buffers (attention masks) are constants, so they are not re-broadcast each step."""
    device_ids = [device.index] if device.type == "cuda" else None
    with warnings.catch_warnings():  # newer torch renames the flag; torch 2.2 knows only this
        warnings.simplefilter("ignore", FutureWarning)
        return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


def ddp_classification_loss(
    model: nn.Module, batch: tuple[torch.Tensor, ...], device: torch.device
) -> torch.Tensor:
    """``finetune.classification_loss`` computed through ``model(...)``: DDP prepares its
    gradient all-reduce in ``forward``. The 2-class head runs at every position (cheap), then
    each message's last real token is read, which gives the same logits."""
    input_ids, lengths, labels = (t.to(device, non_blocking=True) for t in batch)
    logits = model(input_ids)
    last = at_positions(logits, lengths - 1)
    return F.cross_entropy(last.float(), labels)


@dataclass
class AllReduceMeter:
    """What DDP's all-reduces carried: bytes of gradients and number of buckets."""

    bytes: int = 0
    buckets: int = 0


def measure_allreduce(ddp: DistributedDataParallel) -> AllReduceMeter:
    """Count every gradient byte ``ddp`` all-reduces from now on (it still averages as usual)."""
    meter = AllReduceMeter()

    def hook(state, bucket):  # no annotations: DDP checks them against its own types
        state.bytes += bucket.buffer().numel() * bucket.buffer().element_size()
        state.buckets += 1
        return default_hooks.allreduce_hook(None, bucket)

    ddp.register_comm_hook(meter, hook)
    return meter


def gradient_bytes(model: nn.Module) -> int:
    """Bytes of the trainable parameters' gradients: what one step must all-reduce."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lora_helpers.distributed",
        description="Fine-tune the spam classifier on the from-scratch base, alone or under "
        "torchrun (one process per GPU, or gloo processes on a CPU). Rank 0 prints one JSON "
        "result line and saves the trained weights.",
    )
    parser.add_argument("--variant", choices=VARIANTS, default="lora-r16")
    parser.add_argument("--epochs", type=int, help="default: the recipe's (quick mode: 1)")
    parser.add_argument("--batch-size", type=int, help="global batch, split over the processes")
    parser.add_argument("--max-messages", type=int, help="use the first N messages of each split")
    parser.add_argument("--out", type=Path, required=True, help="folder for the trained weights")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Fine-tune one variant with data parallelism; returns (rank 0: prints) the result."""
    args = parse_args(argv)
    device = init_distributed()
    rank, world_size = rank_and_world_size()
    given = dict(epochs=args.epochs, batch_size=args.batch_size, max_messages=args.max_messages)
    recipe = replace(finetune_recipe(), **{k: v for k, v in given.items() if v is not None})
    with redirect_stdout(sys.stdout if rank == 0 else None):  # one log, from rank 0
        if rank != 0:
            dist.barrier()  # rank 0 pretrains the base first if it is missing
        base = load_base_model(device).cpu()
        if rank == 0 and world_size > 1:
            dist.barrier()
    split = shrink_split(sms_spam_split(), recipe.max_messages)
    max_length = base.cfg.context_length
    loaders = message_loaders(split, get_tokenizer(), recipe.batch_size, max_length, device)
    loaders["train"] = shard_loader(loaders["train"], rank, world_size)
    model = prepare_variant(base, args.variant, recipe).to(device)
    torch.manual_seed(recipe.seed + rank)  # the same initial weights, each rank its own dropout
    trained, meter = model, None
    if world_size > 1:
        trained = wrap(model, device)
        meter = measure_allreduce(trained)
    lr = recipe.learning_rate(args.variant)
    history = finetune(trained, loaders, device, recipe, lr, ddp_classification_loss)
    result = {}
    if rank == 0:
        predictions, truth = predict(model, loaders["test"], device)
        steps = history.steps[-1]
        result = {
            "variant": args.variant,
            "world_size": world_size,
            "backend": dist.get_backend() if world_size > 1 else None,
            "global_batch": recipe.batch_size,
            "steps": steps,
            "seconds": round(history.seconds, 2),
            "val_loss": history.val_loss[-1],
            "val_acc": history.metrics[-1]["val_acc"],
            "test_acc": (predictions == truth).float().mean().item(),
            "trainable_params": count_parameters(model, trainable_only=True),
            "gradient_bytes": gradient_bytes(model),
            "allreduce_bytes_per_step": meter.bytes // steps if meter else 0,
            "buckets_per_step": meter.buckets / steps if meter else 0,
        }
        save_weights(model, args.variant, args.out)
        print(json.dumps(result))
    if world_size > 1:
        dist.destroy_process_group()
    return result


def save_weights(model: nn.Module, variant: str, out: Path) -> Path:
    """LoRA: the adapter (factors and head) with ``save_adapter``; other variants: their
    trainable tensors as ``trainable.safetensors``."""
    if variant.startswith("lora"):
        return save_adapter(model, out, modules_to_save=["out_head"])
    out.mkdir(parents=True, exist_ok=True)
    save_file(trainable_state_dict(model), str(out / "trainable.safetensors"))
    return out


if __name__ == "__main__":
    main()
