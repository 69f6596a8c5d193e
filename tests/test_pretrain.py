import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_helpers import checkpoints, pretrain
from lora_helpers import train as train_module
from lora_helpers.checkpoints import CheckpointError, read_checkpoint_metadata, save_checkpoint
from lora_helpers.data import sms_pretraining_texts, sms_spam_split
from lora_helpers.model import GPTModel, gpt_config
from lora_helpers.tokenizer import END_OF_TEXT, get_tokenizer

# A few seconds of pretraining on a tiny model: enough to exercise checkpoints and loading.
TINY_RECIPE = pretrain.PretrainRecipe(
    preset="scratch-tiny",
    dropout=0.0,
    batch_size=4,
    max_steps=6,
    warmup_steps=2,
    eval_every=3,
    max_train_tokens=3_000,
)


def test_sms_corpus_holds_no_validation_or_test_message():
    split = sms_spam_split()
    corpus = pretrain.sms_corpus_text()
    messages = corpus.split(END_OF_TEXT)
    assert messages[-1] == "" and messages[:-1] == sms_pretraining_texts(split)
    held_out = {text for name in ("validation", "test") for _, text in split[name]}
    assert held_out.isdisjoint(messages)


def test_corpora_are_split_without_overlap():
    recipe = pretrain.FULL_RECIPE
    corpora = pretrain.pretraining_corpora(get_tokenizer(), recipe)
    assert set(corpora) == {"shakespeare", "sms"}
    shakespeare, sms = corpora["shakespeare"], corpora["sms"]
    assert len(shakespeare["train"]) == recipe.max_train_tokens  # as much Shakespeare as SMS
    assert len(sms["train"]) <= recipe.max_train_tokens
    whole = pretrain.pretraining_corpora(get_tokenizer(), pretrain.LARGE_RECIPE)["shakespeare"]
    assert len(whole["train"]) + len(whole["val"]) == 338_025
    assert len(whole["val"]) == 338_025 - int(338_025 * 0.9)
    assert torch.equal(shakespeare["train"], whole["train"][: recipe.max_train_tokens])
    assert torch.equal(shakespeare["val"], whole["val"][: len(shakespeare["val"])])


def test_quick_pretraining_saves_a_base_that_later_notebooks_load(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("LORA_ARTIFACTS_DIR", str(tmp_path))
    recipe = TINY_RECIPE
    monkeypatch.setattr(pretrain, "pretrain_recipe", lambda: recipe)
    device = torch.device("cpu")
    model = pretrain.load_base_model(device)  # no checkpoint yet: pretrains first
    assert "pretraining it now" in capsys.readouterr().out
    assert pretrain.base_checkpoint_path().exists()
    again = pretrain.load_base_model(device)  # now simply loaded
    assert "pretraining it now" not in capsys.readouterr().out
    idx = torch.randint(0, 50257, (1, 20))
    model.eval(), again.eval()
    assert torch.equal(model(idx), again(idx))


def test_a_checkpoint_from_another_recipe_is_rebuilt(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("LORA_ARTIFACTS_DIR", str(tmp_path))
    recipe = dataclasses.replace(TINY_RECIPE, max_steps=2, eval_every=2)
    device = torch.device("cpu")
    pretrain.load_base_model(device, recipe)
    capsys.readouterr()
    slower = dataclasses.replace(recipe, lr=recipe.lr / 2)  # same file name, another recipe
    assert pretrain.base_checkpoint_path(slower) == pretrain.base_checkpoint_path(recipe)
    pretrain.load_base_model(device, slower)
    assert "another recipe" in capsys.readouterr().out
    meta = read_checkpoint_metadata(pretrain.base_checkpoint_path(slower))
    assert meta["recipe"]["lr"] == recipe.lr / 2


def test_ablation_bases_have_their_own_checkpoint_and_corpora(monkeypatch):
    monkeypatch.setenv("LORA_QUICK", "0")
    recipe = dataclasses.replace(pretrain.FULL_RECIPE, corpora=("shakespeare",))
    assert pretrain.base_checkpoint_path(recipe).name == "gpt_base_shakespeare.safetensors"
    assert (
        pretrain.base_checkpoint_path(pretrain.FULL_RECIPE).name == "gpt_base_scratch.safetensors"
    )
    short = pretrain.ablation_recipe(("shakespeare",))
    assert short.max_steps == pretrain.FULL_RECIPE.max_steps // 4
    assert dataclasses.replace(short, corpora=recipe.corpora, max_steps=recipe.max_steps) == recipe
    steps = pretrain.FULL_RECIPE.max_steps // 4
    assert (
        pretrain.base_checkpoint_path(short).name
        == f"gpt_base_shakespeare_{steps}steps.safetensors"
    )
    both = pretrain.ablation_recipe(pretrain.FULL_RECIPE.corpora)
    assert pretrain.base_checkpoint_path(both).name == f"gpt_base_scratch_{steps}steps.safetensors"
    large = pretrain.base_checkpoint_path(pretrain.LARGE_RECIPE)
    assert large.name == "gpt_base_scratch-30M.safetensors"
    corpora = pretrain.pretraining_corpora(get_tokenizer(), recipe)
    assert list(corpora) == ["shakespeare"]
    with pytest.raises(ValueError, match="Unknown pretraining corpora"):
        pretrain.pretraining_corpora(
            get_tokenizer(), dataclasses.replace(recipe, corpora=("wiki",))
        )


def test_gpt2_base_offline_falls_back_to_scratch_in_one_line(monkeypatch, tmp_path, capsys):
    from lora_helpers import gpt2
    from lora_helpers.downloads import DownloadError

    def offline(size, timeout=10.0):
        raise DownloadError("no network")

    monkeypatch.setattr(gpt2, "fetch_gpt2", offline)
    sentinel = object()
    monkeypatch.setattr(pretrain, "load_base_model", lambda device: sentinel)
    model, used = pretrain.choose_base("gpt2-124M", torch.device("cpu"))
    assert (model, used) == (sentinel, "scratch")
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "gpt2-124M needs the network" in out
    with pytest.raises(ValueError, match="Unknown base"):
        pretrain.choose_base("gpt3", torch.device("cpu"))


def test_a_run_killed_before_its_first_resume_file_is_pretrained_again(
    monkeypatch, tmp_path, capsys
):
    """Killed between the first best checkpoint (step 3) and the first resume file (also step
    3): the checkpoint is not the finished base, and nothing is left to resume from."""
    monkeypatch.setenv("LORA_ARTIFACTS_DIR", str(tmp_path))
    device = torch.device("cpu")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_resume_state", killed)
    with pytest.raises(KeyboardInterrupt):
        pretrain.load_base_model(device, TINY_RECIPE)
    path = pretrain.base_checkpoint_path(TINY_RECIPE)
    assert read_checkpoint_metadata(path)["step"] == 3
    assert not pretrain.resume_checkpoint_path(TINY_RECIPE).exists()
    monkeypatch.undo()
    monkeypatch.setenv("LORA_ARTIFACTS_DIR", str(tmp_path))
    capsys.readouterr()
    pretrain.load_base_model(device, TINY_RECIPE)
    out = capsys.readouterr().out
    assert "is from a run that did not finish (step 3 of 6" in out and "pretraining again" in out
    assert read_checkpoint_metadata(path)["finished"] is True


@pytest.mark.parametrize(("step", "pretrained"), [(6, False), (3, True)])
def test_a_checkpoint_saved_before_completion_marks_counts_as_finished_at_the_last_step(
    monkeypatch, tmp_path, capsys, step, pretrained
):
    """Its step is the one sign of a completed run it carries: at the last step, nothing came
    after it; before it, it may be an interrupted run's."""
    monkeypatch.setenv("LORA_ARTIFACTS_DIR", str(tmp_path))
    torch.manual_seed(0)
    model = GPTModel(gpt_config(TINY_RECIPE.preset))
    recipe = dataclasses.asdict(TINY_RECIPE)
    path = pretrain.base_checkpoint_path(TINY_RECIPE)
    save_checkpoint(path, model, step=step, val_loss=5.0, recipe=recipe)  # no "finished"
    pretrain.load_base_model(torch.device("cpu"), TINY_RECIPE)
    assert ("did not finish" in capsys.readouterr().out) == pretrained


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"max_steps": 0}, "max_steps must be an integer >= 1, got 0"),
        ({"eval_every": 0}, "eval_every must be an integer >= 1"),
        ({"batch_size": 0}, "batch_size must be"),
        ({"val_fraction": 1.0}, "val_fraction must be between 0 and 1"),
        ({"max_train_tokens": 0}, "max_train_tokens must be None or positive"),
        ({"corpora": ()}, r"corpora must be a non-empty tuple of names, e.g. \('sms',\), got \(\)"),
        ({"corpora": "sms"}, "corpora must be a non-empty tuple of names"),
    ],
)
def test_a_recipe_that_cannot_train_is_refused_when_made(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TINY_RECIPE, **change)


def test_corpora_given_as_a_list_name_the_same_checkpoint():
    listed = dataclasses.replace(pretrain.FULL_RECIPE, corpora=["shakespeare", "sms"])
    assert listed == pretrain.FULL_RECIPE
    assert pretrain.base_checkpoint_path(listed) == pretrain.base_checkpoint_path(
        pretrain.FULL_RECIPE
    )


# --- interrupted pretraining -----------------------------------------------------------------


# Dropout on, so that resuming must restore the random number generators too; 600 tokens
# make 17 windows, 4 batches an epoch, so the run shuffles anew twice in 8 steps.
RESUMABLE = pretrain.PretrainRecipe(
    preset="scratch-tiny",
    dropout=0.1,
    batch_size=4,
    max_steps=8,
    warmup_steps=2,
    eval_every=4,
    max_train_tokens=600,
    corpora=("sms",),
)


PRETRAIN = """
import os, sys, torch
from lora_helpers import checkpoints, pretrain, train
from lora_helpers.model import GPTModel, gpt_config
from lora_helpers.pretrain import PretrainRecipe
from lora_helpers.tokenizer import get_tokenizer
from lora_helpers.checkpoints import CheckpointError

recipe, kill_at = {recipe!r}, {kill_at!r}
if kill_at is not None:  # die at the start of step `kill_at`, as a kill -9 would: no clean-up
    step, calls = train.optimizer_step, []
    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) > kill_at:
            os._exit(9)
        return step(*args, **kwargs)
    train.optimizer_step = dying
torch.manual_seed(recipe.seed)
cfg = gpt_config(recipe.preset, drop_rate=recipe.dropout)
model = GPTModel(cfg)
corpora = pretrain.pretraining_corpora(get_tokenizer(), recipe)
loaders = pretrain.pretraining_loaders(corpora, cfg.context_length, recipe)
pretrain.run_pretraining(model, *loaders, torch.device("cpu"), recipe, save_every=3)
"""


def pretrain_tiny(recipe, kill_at=None) -> GPTModel:
    """Run PRETRAIN here (``kill_at=None``) and return the final model."""
    scope = {}
    exec(PRETRAIN.format(recipe=recipe, kill_at=kill_at), scope)
    return scope["model"]


def test_a_killed_pretraining_run_resumes_to_identical_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_ARTIFACTS_DIR", str(tmp_path / "uninterrupted"))
    expected = pretrain_tiny(RESUMABLE)
    assert not pretrain.resume_checkpoint_path(RESUMABLE).exists()  # deleted when complete

    monkeypatch.setenv("LORA_ARTIFACTS_DIR", str(tmp_path / "killed"))
    env = os.environ | {"PYTHONPATH": str(Path(__file__).parents[1])}
    script = PRETRAIN.format(recipe=RESUMABLE, kill_at=7)  # killed during step 8 of 8
    killed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True)
    assert killed.returncode == 9, killed.stderr.decode()[-2000:]
    resume = pretrain.resume_checkpoint_path(RESUMABLE)
    saved = checkpoints.read_resume_state(resume)
    assert saved["step"] == 6 and saved["data"]["in_epoch"] == 2  # in the 2nd epoch

    resumed = pretrain_tiny(RESUMABLE)  # run again: continues from step 6
    assert not resume.exists()
    state, reference = resumed.state_dict(), expected.state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in reference)


def test_a_resume_file_from_another_recipe_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_ARTIFACTS_DIR", str(tmp_path))
    step, calls = train_module.optimizer_step, []

    def interrupted(*args, **kwargs):  # Ctrl-C during step 4
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    monkeypatch.setattr(train_module, "optimizer_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pretrain_tiny(RESUMABLE)
    monkeypatch.setattr(train_module, "optimizer_step", step)
    resume = pretrain.resume_checkpoint_path(RESUMABLE)
    saved = resume.read_bytes()
    other = dataclasses.replace(RESUMABLE, lr=1e-3)
    with pytest.raises(CheckpointError, match="saved by another run .* Delete it to start over"):
        pretrain_tiny(other)
    assert resume.read_bytes() == saved  # left as it was: the first recipe can still resume
