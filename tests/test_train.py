import dataclasses

import pytest
import torch

from lora_helpers import train as train_module
from lora_helpers.checkpoints import (
    CheckpointError,
    Saving,
    load_checkpoint,
    read_checkpoint_metadata,
    read_resume_state,
)
from lora_helpers.data import create_dataloader
from lora_helpers.device import capabilities
from lora_helpers.model import GPTModel, gpt_config
from lora_helpers.train import Schedule, cosine_schedule, evaluate, train


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
        Schedule(max_steps=40, eval_every=10),
        saving=Saving(checkpoint_path=ckpt),
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
    train(
        model, batches, batches, optimizer, cpu, Schedule(max_steps=4, eval_every=2), progress=False
    )
    assert capsys.readouterr().err == ""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_cuda_graphs_train_like_eager_steps_across_batch_shapes(monkeypatch):
    cuda, runs = torch.device("cuda"), []
    batches = lm_batches(12, (8, 12, 16))  # three shapes: three graphs
    eager = dataclasses.replace(capabilities(cuda), cuda_graphs=False)
    for graphs in (False, True):
        if not graphs:  # the same device, told it has no CUDA graphs
            monkeypatch.setattr(train_module, "capabilities", lambda device: eager)
        torch.manual_seed(0)
        model = GPTModel(gpt_config("scratch-tiny", vocab_size=50, context_length=16)).to(cuda)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
        history = train(model, batches, batches[:3], optimizer, cuda, Schedule(24, 6))
        monkeypatch.undo()
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
    saving = Saving(resume_path=resume)
    train(model, batches, batches, optimizer, cpu, Schedule(4, 2), progress=False, saving=saving)
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
    cpu, saving = torch.device("cpu"), Saving(checkpoint_path=path)
    train(model, batches, batches, optimizer, cpu, Schedule(4, 2), saving=saving)
    meta = read_checkpoint_metadata(path)
    assert meta["finished"] is True and meta["step"] in (2, 4)
