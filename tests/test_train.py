import pytest
import torch
from safetensors.torch import save_file

from lora_helpers import train as train_module
from lora_helpers.data import create_dataloader
from lora_helpers.model import GPTModel, gpt_config
from lora_helpers.train import (
    CheckpointError,
    cosine_schedule,
    evaluate,
    load_checkpoint,
    read_checkpoint_metadata,
    read_resume_state,
    save_checkpoint,
    train,
)


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


def test_cosine_schedule_warms_up_then_decays():
    f = cosine_schedule(max_steps=100, warmup_steps=10, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 100))


def test_training_lowers_the_loss_and_saves_the_best(tmp_path):
    torch.manual_seed(0)
    model = GPTModel(gpt_config("scratch-tiny", vocab_size=50, context_length=16))
    ids = torch.arange(2000) % 50  # a perfectly predictable sequence
    train_loader = create_dataloader(ids, batch_size=8, context_length=16)
    val_loader = create_dataloader(ids, batch_size=8, context_length=16, shuffle=False)
    device = torch.device("cpu")
    before = evaluate(model, val_loader, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ckpt = tmp_path / "best.safetensors"
    history = train(
        model,
        train_loader,
        val_loader,
        optimizer,
        device,
        max_steps=40,
        eval_every=10,
        checkpoint_path=ckpt,
    )
    assert history.steps == [10, 20, 30, 40]
    assert history.best_val_loss == min(history.val_loss) < before / 4
    best, meta = load_checkpoint(ckpt)
    assert meta["step"] == history.best_step
    assert evaluate(best, val_loader, device) == pytest.approx(history.best_val_loss, abs=1e-5)


def lm_batches(n: int, lengths: tuple[int, ...], seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """``n`` next-token batches of a predictable sequence, cycling through several lengths."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(n):
        start = torch.randint(0, 50, (4, 1), generator=g)
        ids = (start + torch.arange(lengths[i % len(lengths)] + 1)) % 50
        batches.append((ids[:, :-1], ids[:, 1:]))
    return batches


def test_no_progress_bar_when_asked(capsys):
    torch.manual_seed(0)
    model = GPTModel(gpt_config("scratch-tiny", vocab_size=50, context_length=16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = lm_batches(4, (8,))
    cpu = torch.device("cpu")
    train(model, batches, batches, optimizer, cpu, max_steps=4, eval_every=2, progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_cuda_graphs_train_like_eager_steps_across_batch_shapes():
    cuda, runs = torch.device("cuda"), []
    batches = lm_batches(12, (8, 12, 16))  # three shapes: three graphs
    for graphs in (False, True):
        torch.manual_seed(0)
        model = GPTModel(gpt_config("scratch-tiny", vocab_size=50, context_length=16)).to(cuda)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
        history = train(model, batches, batches[:3], optimizer, cuda, 24, 6, cuda_graphs=graphs)
        runs.append((history, [p.detach().float().cpu() for p in model.parameters()]))
    (eager, eager_params), (graphed, graphed_params) = runs
    assert graphed.train_loss == pytest.approx(eager.train_loss, rel=1e-2)
    assert graphed.val_loss == pytest.approx(eager.val_loss, rel=1e-2)
    assert graphed.val_loss[-1] < graphed.val_loss[0]
    for a, b in zip(eager_params, graphed_params, strict=True):  # a lost step would move ~3e-3
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3)


def test_evaluate_weighs_each_batch_by_its_targets():
    """A short last batch counts as many targets as it holds, not as much as a full batch."""
    torch.manual_seed(0)
    model = GPTModel(gpt_config("scratch-tiny", vocab_size=50, context_length=16))
    batches = lm_batches(3, (8,))
    batches[-1] = tuple(t[:1] for t in batches[-1])  # 4 + 4 + 1 sequences
    cpu = torch.device("cpu")
    whole = (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    expected = evaluate(model, [whole], cpu)
    assert evaluate(model, batches, cpu) == pytest.approx(expected, rel=1e-5)
    per_batch_mean = sum(evaluate(model, [b], cpu) for b in batches) / len(batches)
    assert per_batch_mean != pytest.approx(expected, rel=1e-3)  # what the old average gave


def interrupted_run(resume, monkeypatch, stop_at: int):
    """Train 4 steps with a resume file every 2 steps; Ctrl-C at the start of ``stop_at``."""
    step, calls = train_module.optimizer_step, []

    def interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    monkeypatch.setattr(train_module, "optimizer_step", interrupt)
    try:
        return run_four_steps(resume)
    finally:
        monkeypatch.setattr(train_module, "optimizer_step", step)


def run_four_steps(resume) -> GPTModel:
    torch.manual_seed(0)
    model = GPTModel(gpt_config("scratch-tiny", vocab_size=50, context_length=16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches, cpu = lm_batches(4, (8,)), torch.device("cpu")
    train(model, batches, batches, optimizer, cpu, 4, 2, resume_path=resume, progress=False)
    return model


def test_a_resume_file_with_a_flipped_byte_is_refused(tmp_path, monkeypatch):
    resume = tmp_path / "run.resume.pt"
    with pytest.raises(KeyboardInterrupt):
        interrupted_run(resume, monkeypatch, stop_at=3)
    data = bytearray(resume.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the saved tensors
    resume.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="run.resume.pt is corrupt: .* Delete it to restart"):
        run_four_steps(resume)
    assert resume.read_bytes() == data  # left for the user to look at or delete


def test_a_resume_file_saved_before_checksums_still_resumes(tmp_path, monkeypatch):
    expected = run_four_steps(None).state_dict()
    resume = tmp_path / "run.resume.pt"
    with pytest.raises(KeyboardInterrupt):
        interrupted_run(resume, monkeypatch, stop_at=3)
    torch.save(read_resume_state(resume), resume)  # the file as it was written before
    state = run_four_steps(resume).state_dict()
    assert all(torch.equal(state[k], v) for k, v in expected.items())


def test_a_completed_run_marks_its_checkpoint_finished(tmp_path):
    torch.manual_seed(0)
    model = GPTModel(gpt_config("scratch-tiny", vocab_size=50, context_length=16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches, path = lm_batches(4, (8,)), tmp_path / "best.safetensors"
    train(model, batches, batches, optimizer, torch.device("cpu"), 4, 2, checkpoint_path=path)
    meta = read_checkpoint_metadata(path)
    assert meta["finished"] is True and meta["step"] in (2, 4)
