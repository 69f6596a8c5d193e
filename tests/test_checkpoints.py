"""Checkpoints (safetensors with their config) and the resume state's pieces."""

import pytest
import torch
from safetensors.torch import save_file

from lora_helpers.checkpoints import (
    Batches,
    CheckpointError,
    Saving,
    load_checkpoint,
    read_checkpoint_metadata,
    save_checkpoint,
)
from lora_helpers.model import GPTModel, gpt_config


def test_checkpoint_round_trip_gives_identical_logits(tiny_model, tmp_path):
    path = save_checkpoint(tmp_path / "ckpt.safetensors", tiny_model, step=7, val_loss=1.5)
    loaded, meta = load_checkpoint(path)
    loaded.eval()
    idx = torch.randint(0, 1000, (2, 16))
    assert torch.equal(loaded(idx), tiny_model(idx))
    assert meta == {"step": 7, "val_loss": 1.5}
    assert loaded.out_head.weight is loaded.tok_emb.weight  # tying survives the round trip
    assert read_checkpoint_metadata(path)["config"]["emb_dim"] == 64


def test_loading_into_another_architecture_names_the_difference(tiny_model, tmp_path):
    path = save_checkpoint(tmp_path / "ckpt.safetensors", tiny_model)
    other = GPTModel(gpt_config("scratch-tiny", vocab_size=1000, n_layers=3))
    with pytest.raises(CheckpointError, match="n_layers: checkpoint 2 vs model 3"):
        load_checkpoint(path, model=other)


def test_foreign_or_missing_files_are_clear_errors(tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a lora_helpers GPT checkpoint"):
        load_checkpoint(foreign)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(garbage)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_missing_tensor_is_an_error(tiny_model, tmp_path):
    path = save_checkpoint(tmp_path / "ckpt.safetensors", tiny_model)
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    del tensors["final_norm.scale"]
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="missing \\['final_norm.scale'\\]"):
        load_checkpoint(path)


def test_batches_restore_a_position_to_the_same_next_batch():
    loader = torch.utils.data.DataLoader(
        list(range(10)), batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(1)
    )
    batches = Batches(loader)
    for _ in range(5):  # into the second epoch (3 batches per epoch)
        next(batches)
    position, expected = batches.position(), [next(batches).tolist() for _ in range(4)]
    again = Batches(loader)
    again.restore(position)
    assert [next(again).tolist() for _ in range(4)] == expected


def test_saving_resumes_on_its_own_schedule(tmp_path):
    saving = Saving(resume_path=tmp_path / "run.resume.pt", save_every=3)
    assert [d for d in range(1, 10) if saving.resume_due(d, 9, 2)] == [3, 6]  # never the last
    assert not Saving().resume_due(2, 9, 2) and not saving.can_resume()
    assert Saving(resume_path=tmp_path / "r.pt").resume_due(4, 9, 2)  # default: each evaluation
    assert saving.identity(9, 2) != Saving(checkpoint_metadata={"lr": 1}).identity(9, 2)
