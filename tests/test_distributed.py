"""Data parallelism: two gloo processes on their shards train exactly like one on the batch."""

import socket
from dataclasses import replace
from functools import partial
from unittest import mock

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import distributed as dist
from torch.utils.data import DataLoader

from lora_helpers import distributed as dd
from lora_helpers import finetune as ft
from lora_helpers import train as train_module
from lora_helpers.checkpoints import Saving
from lora_helpers.data import LengthBucketSampler, pad_collate
from lora_helpers.device import capabilities
from lora_helpers.fast import adamw
from lora_helpers.lora import LoRAConfig
from lora_helpers.lora_model import apply_lora
from lora_helpers.model import GPTModel, gpt_config
from lora_helpers.train import History, Schedule, train

CPU = torch.device("cpu")
BATCH, STEPS, EPOCHS = 4, 3, 3


def messages(n: int = 16) -> list[tuple[list[int], int]]:
    """Random token ids of varied lengths (so shards pad differently) with random labels."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 20, (n,), generator=g).tolist()
    return [
        (
            torch.randint(0, 500, (k,), generator=g).tolist(),
            int(torch.randint(0, 2, (), generator=g)),
        )
        for k in lengths
    ]


def loader(batch_size: int = BATCH) -> DataLoader:
    data = messages()
    sampler = LengthBucketSampler([len(ids) for ids, _ in data], batch_size)
    return DataLoader(data, batch_sampler=sampler, collate_fn=partial(pad_collate, pad_id=0))


def lora_classifier() -> GPTModel:
    torch.manual_seed(0)
    model = ft.add_classification_head(GPTModel(gpt_config("scratch-tiny", vocab_size=500)))
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets="blocks"), also_train=["out_head"])
    return model


def fit(model, train_loader, loss_fn, checkpoint_path=None) -> History:
    params = [p for p in model.parameters() if p.requires_grad]
    # In fp32: bf16 autocast (on CPUs with bf16 in hardware) would round far above 1e-5.
    fp32 = replace(capabilities(CPU), bf16_large_products=False)
    with mock.patch.object(train_module, "capabilities", return_value=fp32):
        return train(
            model,
            train_loader,
            loader(),
            adamw(params, lr=1e-3, weight_decay=0.01, device=CPU),
            CPU,
            Schedule(max_steps=STEPS, eval_every=2),
            loss_fn=loss_fn,
            progress=False,
            saving=Saving(checkpoint_path=checkpoint_path),
        )


def two_rank_worker(rank: int, world_size: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    url = f"tcp://127.0.0.1:{port}"
    dist.init_process_group("gloo", init_method=url, rank=rank, world_size=world_size)
    model = lora_classifier()
    ddp = dd.wrap(model, CPU)
    meter = dd.measure_allreduce(ddp)
    shards = dd.shard_loader(loader(), rank, world_size)
    checkpoint = f"{out}.safetensors"  # every rank is given it, rank 0 alone writes it
    history = fit(ddp, shards, dd.ddp_classification_loss, checkpoint)
    weights = ft.trainable_state_dict(model)
    torch.save({"weights": weights, "bytes": meter.bytes, "steps": history.steps}, f"{out}.{rank}")
    dist.destroy_process_group()


def finetune_epochs(model, train_loader, loss_fn) -> History:
    """``finetune`` for EPOCHS epochs, measuring the accuracies after each (rank 0 alone)."""
    recipe = ft.FinetuneRecipe(epochs=EPOCHS, batch_size=BATCH)
    fp32 = replace(capabilities(CPU), bf16_large_products=False)  # as in ``fit``
    with mock.patch.object(train_module, "capabilities", return_value=fp32):
        loaders = {"train": train_loader, "validation": loader()}
        return ft.finetune(model, loaders, CPU, recipe, 1e-3, loss_fn, progress=False)


def epochs_worker(rank: int, world_size: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    url = f"tcp://127.0.0.1:{port}"
    dist.init_process_group("gloo", init_method=url, rank=rank, world_size=world_size)
    model = lora_classifier()
    shards = dd.shard_loader(loader(), rank, world_size)
    history = finetune_epochs(dd.wrap(model, CPU), shards, dd.ddp_classification_loss)
    weights = ft.trainable_state_dict(model)
    torch.save({"weights": weights, "metrics": history.metrics}, f"{out}.{rank}")
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_on_shards_equal_one_process_on_the_whole_batch(tmp_path):
    out = tmp_path / "run"
    mp.spawn(two_rank_worker, args=(2, free_port(), str(out)), nprocs=2)
    two, other = torch.load(f"{out}.0"), torch.load(f"{out}.1")

    alone = lora_classifier()
    fit(alone, loader(), ft.classification_loss)
    one = ft.trainable_state_dict(alone)

    assert one.keys() == two["weights"].keys()
    for name, weight in one.items():
        torch.testing.assert_close(two["weights"][name], weight, atol=1e-5, rtol=0, msg=name)
    for name in one:  # the ranks stay identical
        torch.testing.assert_close(other["weights"][name], two["weights"][name], atol=0, rtol=0)
    # Rank 0 alone evaluated (after steps 2 and 3) and wrote the checkpoint, of the plain model.
    assert two["steps"] == [2, STEPS] and other["steps"] == []
    assert not any(key.startswith("module.") for key in load_file(f"{out}.safetensors"))
    # DDP's buckets hold only the trainable parameters: each step all-reduces their gradients.
    assert two["bytes"] == STEPS * dd.gradient_bytes(alone)
    assert dd.gradient_bytes(alone) < sum(4 * p.numel() for p in alone.parameters()) / 10


def test_two_processes_stay_one_process_over_epochs_with_accuracies_between_them(tmp_path):
    """After each epoch rank 0 alone measures the accuracies; that pass must not draw from the
    generator the ranks shuffle with, or rank 1 would shuffle otherwise from epoch 2 on."""
    out = tmp_path / "run"
    mp.spawn(epochs_worker, args=(2, free_port(), str(out)), nprocs=2)
    two, other = torch.load(f"{out}.0"), torch.load(f"{out}.1")

    alone = lora_classifier()
    history = finetune_epochs(alone, loader(), ft.classification_loss)
    one = ft.trainable_state_dict(alone)

    assert len(history.metrics) == len(two["metrics"]) == EPOCHS and other["metrics"] == []
    for name, weight in one.items():
        torch.testing.assert_close(two["weights"][name], weight, atol=1e-5, rtol=0, msg=name)
        torch.testing.assert_close(other["weights"][name], two["weights"][name], atol=0, rtol=0)
    # Rank 0 measures the training accuracy on every training message, as one process does.
    assert two["metrics"] == history.metrics


def test_shards_partition_every_batch_in_the_same_order():
    whole = list(loader().batch_sampler)
    shards = [list(dd.ShardedBatchSampler(loader().batch_sampler, r, 2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(whole)
    for batch, first, second in zip(whole, *shards, strict=True):
        assert len(first) == len(second) == BATCH // 2
        assert sorted(first + second) == sorted(batch)


def test_sharded_loader_keeps_the_seed_handle_and_rejects_uneven_shards():
    sharded = dd.shard_loader(loader(), rank=1, world_size=2)
    assert sharded.batch_sampler.generator is sharded.batch_sampler.batch_sampler.generator
    with pytest.raises(ValueError, match="not divisible by 3"):
        dd.ShardedBatchSampler(loader().batch_sampler, rank=0, world_size=3)
    ragged = LengthBucketSampler([3] * 9, batch_size=4, drop_last=False)
    with pytest.raises(ValueError, match="cannot be split evenly"):
        list(dd.ShardedBatchSampler(ragged, rank=0, world_size=2))


def test_ddp_loss_equals_the_classification_loss():
    model = lora_classifier().eval()
    batch = next(iter(loader()))
    torch.testing.assert_close(
        dd.ddp_classification_loss(model, batch, CPU), ft.classification_loss(model, batch, CPU)
    )


def test_alone_there_is_one_rank():
    assert dd.rank_and_world_size() == (0, 1)


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        dd.parse_args(["--help"])
    assert exit_info.value.code == 0
    assert "torchrun" in capsys.readouterr().out
