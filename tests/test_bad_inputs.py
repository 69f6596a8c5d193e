"""Rows 1-32 of the table "Bad inputs and what you see" (tests/README.md) are tests here (later
rows name their tests, in the test file of their module): a wrong input is refused with a
message that names what is wrong and what to do, and changes nothing."""

import dataclasses
import inspect
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import warnings
from hashlib import sha256
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lora_helpers import adapter_files as af
from lora_helpers import adapters as ad
from lora_helpers import checkpoints, downloads, finetune, gpt2, pretrain, train
from lora_helpers.checkpoints import CheckpointError
from lora_helpers.data import MessageDataset, pad_collate
from lora_helpers.downloads import sha256_of
from lora_helpers.lora import LinearWithLoRA, LoRAConfig
from lora_helpers.lora_model import apply_lora, lora_layers, replace_linear_with_lora
from lora_helpers.model import GPTConfig, GPTModel, gpt_config
from lora_helpers.tokenizer import get_tokenizer

# --- ranks -----------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [4, np.int64(4), np.int32(4), torch.tensor(4)])
def test_any_integral_rank_is_accepted(rank):
    layer = LinearWithLoRA(nn.Linear(16, 8), LoRAConfig(rank, alpha=4))
    assert layer.lora.rank == 4 and type(layer.lora.rank) is int
    assert layer.lora.A.shape == (16, 4)


@pytest.mark.parametrize(
    "rank", [4.0, np.float32(4), torch.tensor(4.0), torch.tensor([4]), 0, True]
)
def test_a_non_integral_or_non_positive_rank_is_refused(rank):
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        LinearWithLoRA(nn.Linear(16, 8), LoRAConfig(rank, alpha=4))


def test_a_rank_above_min_in_out_is_allowed_with_a_warning():
    with pytest.warns(UserWarning, match="rank=16 is larger than min.*without compressing"):
        layer = LinearWithLoRA(nn.Linear(768, 2), LoRAConfig(rank=16, alpha=16))
    assert layer.lora.B.shape == (16, 2)


@pytest.mark.parametrize(("rank", "expected"), [(8, 1_333_264), (16, 2_666_528)])
def test_the_seeds_recipe_reproduces_its_trainable_count_on_gpt2_124m(rank, expected):
    """rasbt's appendix E: freeze GPT-2 124M, new Linear(768, 2) head, LoRA on every Linear."""
    with torch.device("meta"):  # shapes only: no memory, no time
        model = GPTModel(gpt_config("gpt2-124M"))
        model.out_head = nn.Linear(768, 2)
    model.requires_grad_(False)
    with pytest.warns(UserWarning, match="in_features=768, out_features=2"):
        replace_linear_with_lora(model, rank, rank)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


def test_olora_refuses_a_rank_above_min_in_out():
    with pytest.raises(ValueError, match="use rank <= 2 with OLoRA"):
        LinearWithLoRA(nn.Linear(768, 2), LoRAConfig(rank=16, alpha=16, init="olora"))


def test_our_recommended_targets_need_no_warning():
    model = GPTModel(gpt_config("scratch-tiny", vocab_size=100))
    model.out_head = nn.Linear(64, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_lora(model, LoRAConfig(rank=16, alpha=16, targets="blocks"), also_train=["out_head"])


# --- adapter files: all or nothing -----------------------------------------------------------


def tiny_base() -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(gpt_config("scratch-tiny", vocab_size=100)).eval()


@pytest.fixture
def saved_spam(tmp_path):
    """A 'spam' adapter (LoRA on the blocks + a 2-class head) saved from the tiny base."""
    model = tiny_base()
    ad.add_adapter(
        model, "spam", LoRAConfig(rank=2, alpha=2), modules_to_save={"out_head": nn.Linear(64, 2)}
    )
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora.B.normal_()
    return af.save_adapter(model, tmp_path / "spam")


@pytest.fixture
def carrier():
    """The base, already carrying an active 'chat' adapter: loading must not disturb it."""
    model = tiny_base()
    ad.add_adapter(model, "chat", LoRAConfig(rank=2, alpha=2, targets="attention"))
    return model


def state(model: nn.Module) -> dict:
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "trainable": {n: p.requires_grad for n, p in model.named_parameters()},
        "adapters": ad.adapter_names(model),
        "active": ad.active_adapter(model),
        "modules": [n for n, _ in model.named_modules()],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = state(model)
    assert after["adapters"] == before["adapters"] and after["active"] == before["active"]
    assert after["modules"] == before["modules"] and after["trainable"] == before["trainable"]
    assert after["params"].keys() == before["params"].keys()
    assert all(torch.equal(after["params"][n], p) for n, p in before["params"].items())


def edit_config(directory, **changes):
    path = directory / af.CONFIG_FILE
    config = json.loads(path.read_text()) | changes
    path.write_text(json.dumps({k: v for k, v in config.items() if v is not DROP}))


DROP = object()


def truncate(directory):
    path = directory / af.WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[:100])


def flip_last_byte(directory):  # the end of the file is tensor data, not the header
    path = directory / af.WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def record_checksum(directory):
    """Record the checksum of the files as they now are: a consistent adapter that does not
    fit, rather than a corrupt or hand-edited one."""
    config = json.loads((directory / af.CONFIG_FILE).read_text())
    edit_config(directory, sha256=af.adapter_sha256(directory / af.WEIGHTS_FILE, config))


def resave(directory, edit):
    """Rewrite the tensors with ``edit`` applied, and record the checksum."""
    path = directory / af.WEIGHTS_FILE
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))
    record_checksum(directory)


BAD_ADAPTERS = {
    "truncated tensors": (truncate, "adapter.safetensors or its adapter_config.json changed"),
    "flipped byte": (flip_last_byte, "adapter.safetensors or .* changed after .*: their sha256"),
    "truncated, no checksum (older adapter)": (
        lambda d: (truncate(d), edit_config(d, sha256=DROP)),
        "adapter.safetensors is not a readable safetensors file",
    ),
    "tensors missing": (
        lambda d: (d / af.WEIGHTS_FILE).unlink(),
        "adapter.safetensors is missing: .* holds the adapter's config but not its tensors",
    ),
    "config missing": (
        lambda d: (d / af.CONFIG_FILE).unlink(),
        "adapter_config.json is missing",
    ),
    "invalid JSON": (
        lambda d: (d / af.CONFIG_FILE).write_text("{not json"),
        "adapter_config.json is not valid JSON",
    ),
    "rank missing": (lambda d: edit_config(d, rank=DROP), "malformed: 'rank' is missing"),
    "rank of wrong type": (lambda d: edit_config(d, rank="2"), "'rank' must be an integer"),
    "rank zero": (lambda d: edit_config(d, rank=0), "rank must be a positive integer, got 0"),
    "targets missing": (lambda d: edit_config(d, targets=DROP), "'targets' is missing"),
    "unknown scaling": (lambda d: edit_config(d, scaling_rule="x"), "scaling must be one of"),
    "bad checksum field": (
        lambda d: edit_config(d, sha256="abc"),
        "'sha256' must be 64 hex digits",
    ),
    "wrong shape": (
        lambda d: resave(d, lambda t: t.update({"out_head.bias": torch.zeros(3)})),
        r"out_head.bias has shape \(3,\), the model expects \(2,\)",
    ),
    "wrong dtype": (
        lambda d: resave(d, lambda t: t.update({"out_head.bias": torch.zeros(2, dtype=int)})),
        "out_head.bias has dtype torch.int64, expected a floating-point tensor",
    ),
    "tensor missing": (
        lambda d: resave(d, lambda t: t.pop("trf_blocks.0.ff.fc1.lora.B")),
        r"missing \['trf_blocks.0.ff.fc1.lora.B'\]",
    ),
    "another base": (
        lambda d: (
            edit_config(d, base={"architecture": {}, "fingerprint": "0"}),
            record_checksum(d),
        ),
        "trained on another architecture",
    ),
}


@pytest.mark.parametrize("case", BAD_ADAPTERS)
def test_a_bad_adapter_is_refused_and_leaves_the_model_as_it_was(
    case, saved_spam, carrier, tmp_path
):
    good = tmp_path / "good"
    shutil.copytree(saved_spam, good)
    damage, message = BAD_ADAPTERS[case]
    damage(saved_spam)
    before = state(carrier)
    with pytest.raises(af.AdapterLoadError, match=message) as err:
        af.load_adapter(carrier, saved_spam, name="spam")
    assert str(saved_spam) in str(err.value)  # names the file or folder
    assert_unchanged(carrier, before)
    af.load_adapter(carrier, good, name="spam")  # a good copy loads afterwards
    assert ad.adapter_names(carrier) == ["chat", "spam"]


def test_the_saved_config_records_a_sha256_of_the_tensors_and_its_fields(saved_spam):
    config = json.loads((saved_spam / af.CONFIG_FILE).read_text())
    assert config["sha256"] == af.adapter_sha256(saved_spam / af.WEIGHTS_FILE, config)
    fields = {k: v for k, v in config.items() if k != "sha256"}
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    digest = sha256(f"{sha256_of(saved_spam / af.WEIGHTS_FILE)}\n{text}".encode()).hexdigest()
    assert config["sha256"] == digest


# --- messages --------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_classify_refuses_an_empty_message(text):
    model = finetune.add_classification_head(tiny_base())
    with pytest.raises(ValueError, match="empty or whitespace-only message"):
        finetune.classify(model, text, get_tokenizer(), torch.device("cpu"))


def test_the_batch_builders_refuse_an_empty_message():
    messages = [("ham", "hello"), ("spam", " "), ("ham", "")]
    with pytest.raises(ValueError, match=r"Messages \[1, 2\] are empty or whitespace-only"):
        MessageDataset(messages, get_tokenizer(), max_length=16)
    with pytest.raises(ValueError, match=r"Rows \[1\] of the batch have no tokens"):
        pad_collate([([1, 2], 0), ([], 1)])


# --- downloads -------------------------------------------------------------------------------


@pytest.fixture
def hanging_server():
    """An address on 127.0.0.1 that accepts connections (the kernel completes them) but never
    answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield f"http://127.0.0.1:{server.getsockname()[1]}/file.txt"


class Trickle(BaseHTTPRequestHandler):
    """Answers at once, then sends one byte every 0.1 s: never stalls, never finishes."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        for _ in range(1000):
            self.wfile.write(b"x")
            self.wfile.flush()
            time.sleep(0.1)

    def log_message(self, *args):
        pass


@pytest.fixture
def trickle_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/file.txt"
    server.shutdown()
    server.server_close()


def demo_resource(monkeypatch, tmp_path, urls) -> None:
    monkeypatch.setenv("LORA_DATA_DIR", str(tmp_path / "data"))
    resource = downloads.Resource(path="demo/file.txt", sha256="0" * 64, urls=tuple(urls))
    monkeypatch.setitem(downloads.RESOURCES, "demo", resource)


def test_a_server_that_never_answers_fails_over_then_gives_a_clear_error(
    monkeypatch, tmp_path, hanging_server
):
    backup = hanging_server.replace("file.txt", "backup.txt")
    demo_resource(monkeypatch, tmp_path, [hanging_server, backup])
    with pytest.raises(downloads.DownloadError, match="Could not download 'demo'") as err:
        downloads.fetch("demo", timeout=0.2)
    lines = str(err.value).splitlines()
    assert any(hanging_server in line and "timed out" in line for line in lines)
    assert any(backup in line and "timed out" in line for line in lines)  # the backup was tried
    assert "LORA_DATA_DIR" in str(err.value)


def test_a_download_that_never_ends_is_cut_at_its_deadline(monkeypatch, tmp_path, trickle_server):
    demo_resource(monkeypatch, tmp_path, [trickle_server])
    with pytest.raises(downloads.DownloadError, match="longer than its deadline of 0.5 s"):
        downloads.fetch("demo", timeout=1.0, deadline=0.5)
    assert list((tmp_path / "data" / "demo").iterdir()) == []  # no partial file left


def test_the_default_timeouts_fail_over_within_20_seconds():
    """Two addresses that never answer cost 2 x timeout; the resources with most addresses."""
    timeout = inspect.signature(downloads.fetch).parameters["timeout"].default
    assert max(len(r.urls) for r in downloads.RESOURCES.values()) * timeout <= 20


# --- GPT-2 weights ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gpt2_folder(tmp_path_factory):
    """A tiny GPT-2 saved by transformers: model.safetensors next to its config.json."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=100, n_positions=64, n_embd=64, n_layer=2, n_head=2, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("gpt2")
    transformers.GPT2LMHeadModel(config).save_pretrained(folder, safe_serialization=True)
    return folder


GPT2_TINY = dict(vocab_size=100, context_length=64, emb_dim=64, n_heads=2, n_layers=2)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("n_heads", 4, "n_head: config.json 2 vs model 4"),  # same shapes: would load silently
        ("n_layers", 3, "n_layer: config.json 2 vs model 3"),
        ("context_length", 32, "n_positions: config.json 64 vs model 32"),
        ("tie_weights", False, "tie_word_embeddings: config.json True vs model False"),
    ],
)
def test_gpt2_weights_whose_config_json_differs_from_the_preset_are_refused(
    tiny_gpt2_folder, field, value, message
):
    cfg = GPTConfig(**(GPT2_TINY | {field: value}), qkv_bias=True)
    model = GPTModel(cfg)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match=f"describes another architecture.*{message}"):
        gpt2.load_gpt2_weights(model, tiny_gpt2_folder / "model.safetensors")
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


def test_gpt2_weights_with_a_matching_config_json_load(tiny_gpt2_folder):
    model = GPTModel(GPTConfig(**GPT2_TINY, qkv_bias=True))
    gpt2.load_gpt2_weights(model, tiny_gpt2_folder / "model.safetensors")


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
    step, calls = train.optimizer_step, []

    def interrupted(*args, **kwargs):  # Ctrl-C during step 4
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    monkeypatch.setattr(train, "optimizer_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pretrain_tiny(RESUMABLE)
    monkeypatch.setattr(train, "optimizer_step", step)
    resume = pretrain.resume_checkpoint_path(RESUMABLE)
    saved = resume.read_bytes()
    other = dataclasses.replace(RESUMABLE, lr=1e-3)
    with pytest.raises(CheckpointError, match="saved by another run .* Delete it to start over"):
        pretrain_tiny(other)
    assert resume.read_bytes() == saved  # left as it was: the first recipe can still resume


@pytest.mark.parametrize(
    ("kwargs", "shown"),
    [({"init": "olora"}, "init='olora'"), ({"dropout": 0.1}, "init='default', dropout=0.1")],
)
def test_lora_on_the_embedding_refuses_other_inits_and_dropout(kwargs, shown):
    torch.manual_seed(0)
    model = GPTModel(gpt_config("scratch-tiny", vocab_size=1000, tie_weights=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    message = f"LoRA on an embedding takes init='default' and dropout=0 \\(got {shown}"
    with pytest.raises(ValueError, match=message):
        apply_lora(model, LoRAConfig(rank=2, alpha=2, targets=["tok_emb", "blocks"], **kwargs))
    assert not lora_layers(model)  # nothing wrapped: all or nothing
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# --- the table in tests/README.md -------------------------------------------------------------


def test_the_bad_inputs_table_counts_its_rows_and_names_tests_that_exist():
    root = Path(__file__).parents[1]
    section = (root / "tests" / "README.md").read_text().split("## Bad inputs and what you see")[1]
    section = section.split("\n## ")[0]
    rows = re.findall(r"^\| (\d+) \|", section, flags=re.M)
    assert rows == [str(i) for i in range(1, len(rows) + 1)]
    assert f"**{len(rows)} rows**" in section
    named = re.findall(r"`(tests/test_\w+\.py)::(test_\w+)`", section)
    missing = [f"{f}::{t}" for f, t in named if f"def {t}(" not in (root / f).read_text()]
    assert named and not missing
