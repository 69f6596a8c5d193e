"""lora_helpers.adapter_files: an adapter saved to a folder and loaded onto its base: round
trips, what the config records, and all-or-nothing loading of a bad or mismatched adapter."""

import copy
import json
import shutil
from hashlib import sha256

import pytest
import torch
from safetensors.torch import load_file, save_file

# The tiny base and its two adapters: tests/tiny_adapters.py.
from tiny_adapters import IDX, make_base, randomise, with_two_adapters
from torch import nn

from lora_helpers import adapter_config as ac
from lora_helpers import adapter_files as af
from lora_helpers import adapters as ad
from lora_helpers.downloads import sha256_of
from lora_helpers.lora import LoRAConfig
from lora_helpers.lora_model import add_lora, apply_lora, lora_layers, merge_lora
from lora_helpers.model import GPTModel, gpt_config


@pytest.fixture
def base():
    return make_base()


@pytest.fixture
def two_adapters(base):
    return with_two_adapters(base)


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
    path = directory / ac.CONFIG_FILE
    config = json.loads(path.read_text()) | changes
    path.write_text(json.dumps({k: v for k, v in config.items() if v is not DROP}))


DROP = object()


def truncate(directory):
    path = directory / ac.WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[:100])


def flip_last_byte(directory):  # the end of the file is tensor data, not the header
    path = directory / ac.WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def record_checksum(directory):
    """Record the checksum of the files as they now are: a consistent adapter that does not
    fit, rather than a corrupt or hand-edited one."""
    config = json.loads((directory / ac.CONFIG_FILE).read_text())
    edit_config(
        directory,
        sha256=ac.adapter_sha256(directory / ac.WEIGHTS_FILE, config),
    )


def resave(directory, edit):
    """Rewrite the tensors with ``edit`` applied, and record the checksum."""
    path = directory / ac.WEIGHTS_FILE
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))
    record_checksum(directory)


def test_save_and_load_round_trip_gives_identical_outputs(base, two_adapters, tmp_path):
    for name in ("chat", "spam"):
        ad.set_adapter(two_adapters, name)
        expected = two_adapters(IDX)
        af.save_adapter(two_adapters, tmp_path / name)
        fresh = copy.deepcopy(base)
        af.load_adapter(fresh, tmp_path / name, name="loaded")
        torch.testing.assert_close(fresh.eval()(IDX), expected, rtol=0, atol=1e-6)


def test_config_describes_the_adapter_and_its_base(base, two_adapters, tmp_path):
    af.save_adapter(two_adapters, tmp_path / "spam", name="spam")
    config = json.loads((tmp_path / "spam" / ac.CONFIG_FILE).read_text())
    assert (config["rank"], config["alpha"], config["scaling"], config["init"]) == (
        4,
        4,
        1.0,
        "default",
    )
    assert len(config["targets"]) == 12 and config["targets"][0] == "trf_blocks.0.att.W_query"
    assert config["modules_to_save"] == {
        "out_head": {"type": "Linear", "in_features": 64, "out_features": 2, "bias": True}
    }
    assert config["base"]["architecture"]["n_layers"] == 2
    assert config["base"]["fingerprint"] == af.base_fingerprint(base, exclude=["out_head"])
    assert config["library"]["name"] == "lora_helpers"
    assert set(load_file(str(tmp_path / "spam" / ac.WEIGHTS_FILE))) >= {
        "trf_blocks.0.att.W_query.lora.A",
        "trf_blocks.1.ff.fc2.lora.B",
        "out_head.weight",
    }


def test_adapter_trained_as_in_notebook_06_loads_onto_the_plain_base(base, tmp_path):
    model = copy.deepcopy(base)
    model.out_head = nn.Linear(64, 2)  # the classifier head, replaced in place
    apply_lora(model, LoRAConfig(rank=4, alpha=4, targets="blocks"), also_train=["out_head"])
    randomise(model, "default")
    expected = model(IDX)
    af.save_adapter(model, tmp_path / "clf", modules_to_save=["out_head"])
    fresh = copy.deepcopy(base)
    af.load_adapter(fresh, tmp_path / "clf")
    torch.testing.assert_close(fresh(IDX), expected, rtol=0, atol=1e-6)


def test_wrong_base_is_refused_with_what_differs(two_adapters, tmp_path):
    af.save_adapter(two_adapters, tmp_path / "spam", name="spam")
    with pytest.raises(ac.AdapterMismatchError, match="n_layers: adapter's base 2 vs model 3"):
        af.load_adapter(make_base(n_layers=3), tmp_path / "spam")
    other_weights = make_base(seed=1)
    with pytest.raises(ac.AdapterMismatchError, match="weights differ"):
        af.load_adapter(other_weights, tmp_path / "spam")
    assert ad.adapter_names(other_weights) == []  # nothing was added
    config_path = tmp_path / "spam" / ac.CONFIG_FILE
    config = json.loads(config_path.read_text())
    config["targets"].append("trf_blocks.7.att.W_query")
    config_path.write_text(json.dumps(config))
    record_checksum(tmp_path / "spam")  # a consistent adapter of a deeper model
    with pytest.raises(ac.AdapterMismatchError, match="trf_blocks.7.att.W_query"):
        af.load_adapter(make_base(), tmp_path / "spam")


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_missing_or_extra_tensors_are_errors(base, two_adapters, tmp_path, change):
    af.save_adapter(two_adapters, tmp_path / "chat", name="chat")
    path = tmp_path / "chat" / ac.WEIGHTS_FILE
    tensors = load_file(str(path))
    if change == "missing":
        del tensors["trf_blocks.1.att.W_key.lora.B"]
    else:
        tensors["trf_blocks.1.ff.fc1.lora.A"] = torch.zeros(64, 2)
    save_file(tensors, str(path))
    record_checksum(tmp_path / "chat")  # a consistent file from another adapter, not a corrupt one
    fresh = copy.deepcopy(base)
    with pytest.raises(
        ac.AdapterMismatchError, match="W_key.lora.B" if change == "missing" else "fc1"
    ):
        af.load_adapter(fresh, tmp_path / "chat")
    assert ad.adapter_names(fresh) == [] and not lora_layers(fresh)


def test_olora_adapter_round_trip_and_unload(base, tmp_path):
    model = copy.deepcopy(base)
    ad.add_adapter(model, "o", LoRAConfig(rank=4, alpha=8, targets="attention", init="olora"))
    torch.testing.assert_close(model(IDX), base(IDX), rtol=0, atol=1e-5)  # starts unchanged
    randomise(model, "o")
    expected = model(IDX)
    af.save_adapter(model, tmp_path / "o")
    fresh = copy.deepcopy(base)
    af.load_adapter(fresh, tmp_path / "o")
    torch.testing.assert_close(fresh(IDX), expected, rtol=0, atol=1e-6)
    assert torch.equal(ad.unload(fresh)(IDX), base(IDX))


def test_adapter_with_an_embedding_update_round_trips(base, tmp_path):
    model = copy.deepcopy(base)
    model.out_head = nn.Linear(64, 2)
    apply_lora(
        model, LoRAConfig(rank=4, alpha=4, targets=["blocks", "tok_emb"]), also_train=["out_head"]
    )
    with torch.no_grad():
        model.tok_emb.lora.A.normal_(std=0.1)
    randomise(model, "default")
    expected = model(IDX)
    af.save_adapter(model, tmp_path / "clf", modules_to_save=["out_head"])
    fresh = copy.deepcopy(base)  # its head is tied to the table: the update still loads
    af.load_adapter(fresh, tmp_path / "clf")
    torch.testing.assert_close(fresh(IDX), expected, rtol=0, atol=1e-6)
    with ad.disable_adapters(fresh):
        torch.testing.assert_close(fresh(IDX), base(IDX), rtol=0, atol=0)


@pytest.fixture
def merged(base):
    """The base with an untrained adapter 'old' merged in: its weights are still the base's."""
    model = copy.deepcopy(base)
    ad.add_adapter(model, "old", LoRAConfig(rank=2, alpha=2, targets="attention"))
    merge_lora(model)
    return model


def test_a_load_onto_a_merged_model_is_refused_and_changes_nothing(
    base, merged, tmp_path, unchanged
):
    fresh = copy.deepcopy(base)
    ad.add_adapter(fresh, "new", LoRAConfig(rank=2, alpha=2, targets="blocks"))
    af.save_adapter(fresh, tmp_path / "new")
    check = unchanged(merged)
    with pytest.raises(RuntimeError, match="merged into the weights: unmerge_lora"):
        af.load_adapter(merged, tmp_path / "new", name="new")
    check()


def test_a_load_that_fails_half_way_with_any_error_changes_nothing(
    base, two_adapters, tmp_path, monkeypatch, unchanged
):
    af.save_adapter(two_adapters, tmp_path / "spam", name="spam")
    model = copy.deepcopy(base)
    ad.add_adapter(model, "chat", LoRAConfig(rank=2, alpha=4, targets="attention"))
    check = unchanged(model)

    def interrupted(*args):  # after every layer was wrapped: Ctrl-C, or any other error
        raise KeyboardInterrupt

    monkeypatch.setattr(ad, "set_adapter", interrupted)
    with pytest.raises(KeyboardInterrupt):
        af.load_adapter(model, tmp_path / "spam", name="spam")
    check()


def test_a_loaded_adapter_keeps_a_model_in_eval_mode(base, tmp_path):
    model = copy.deepcopy(base)
    ad.add_adapter(model, "drop", LoRAConfig(rank=2, alpha=2, targets="attention", dropout=0.5))
    randomise(model, "drop")
    af.save_adapter(model, tmp_path / "drop")
    fresh = copy.deepcopy(base).eval()
    af.load_adapter(fresh, tmp_path / "drop")
    assert not any(m.training for m in fresh.modules())
    assert torch.equal(fresh(IDX), fresh(IDX))  # no dropout: deterministic


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"alpha": 8}, r"'scaling' is 1.0, but alpha 8, rank 4 and scaling_rule 'standard' give 2"),
        ({"scaling_rule": "rslora"}, r"'scaling' is 1.0, but .* 'rslora' give 2.0"),
        ({"dropout": 0.3}, "adapter_config.json changed after save_adapter.. wrote them"),
        ({"init": "gaussian"}, "changed after save_adapter"),
    ],
)
def test_a_hand_edited_config_is_refused(two_adapters, tmp_path, changes, message):
    af.save_adapter(two_adapters, tmp_path / "spam", name="spam")
    edit_config(tmp_path / "spam", **changes)
    with pytest.raises(ac.AdapterLoadError, match=message):
        af.load_adapter(make_base(), tmp_path / "spam")


def test_an_adapter_saved_before_its_config_had_a_checksum_still_loads(two_adapters, tmp_path):
    """Such a config records the tensor file's sha256 alone (weights_sha256)."""
    ad.set_adapter(two_adapters, "spam")
    expected = two_adapters(IDX)
    folder = af.save_adapter(two_adapters, tmp_path / "spam")
    config = json.loads((folder / ac.CONFIG_FILE).read_text())
    config["weights_sha256"] = sha256_of(folder / ac.WEIGHTS_FILE)
    del config["sha256"]
    (folder / ac.CONFIG_FILE).write_text(json.dumps(config))
    torch.testing.assert_close(af.load_adapter(make_base(), folder)(IDX), expected)
    edit_config(folder, alpha=8)  # no checksum covers it, but the recorded scaling no longer fits
    with pytest.raises(ac.AdapterLoadError, match="'scaling' is 1.0, but alpha 8"):
        af.load_adapter(make_base(), folder)


def test_an_adapter_whose_layers_differ_in_alpha_is_not_saved(base, tmp_path):
    """adapter_config.json records one alpha: such a file would load with the wrong scaling."""
    model = copy.deepcopy(base)
    ad.add_adapter(model, "x", LoRAConfig(rank=2, alpha=4, targets="attention"))
    add_lora(model, ["trf_blocks.1.ff.fc1"], "x", LoRAConfig(rank=2, alpha=16))
    with pytest.raises(ValueError, match=r"trf_blocks.0.att.W_query has \(2, 4, .*\['trf_blocks.1"):
        af.save_adapter(model, tmp_path / "x", name="x")
    assert not (tmp_path / "x").exists()


def test_an_adapter_loaded_onto_a_cast_base_is_refused_saying_why(two_adapters, tmp_path):
    af.save_adapter(two_adapters, tmp_path / "chat", name="chat")
    with pytest.raises(ac.AdapterMismatchError, match=r"holds \['torch.bfloat16'\] weights: cast"):
        af.load_adapter(make_base().to(torch.bfloat16), tmp_path / "chat")


BAD_ADAPTERS = {
    "truncated tensors": (truncate, "adapter.safetensors or its adapter_config.json changed"),
    "flipped byte": (flip_last_byte, "adapter.safetensors or .* changed after .*: their sha256"),
    "truncated, no checksum (older adapter)": (
        lambda d: (truncate(d), edit_config(d, sha256=DROP)),
        "adapter.safetensors is not a readable safetensors file",
    ),
    "tensors missing": (
        lambda d: (d / ac.WEIGHTS_FILE).unlink(),
        "adapter.safetensors is missing: .* holds the adapter's config but not its tensors",
    ),
    "config missing": (
        lambda d: (d / ac.CONFIG_FILE).unlink(),
        "adapter_config.json is missing",
    ),
    "invalid JSON": (
        lambda d: (d / ac.CONFIG_FILE).write_text("{not json"),
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
    with pytest.raises(ac.AdapterLoadError, match=message) as err:
        af.load_adapter(carrier, saved_spam, name="spam")
    assert str(saved_spam) in str(err.value)  # names the file or folder
    assert_unchanged(carrier, before)
    af.load_adapter(carrier, good, name="spam")  # a good copy loads afterwards
    assert ad.adapter_names(carrier) == ["chat", "spam"]


def test_the_saved_config_records_a_sha256_of_the_tensors_and_its_fields(saved_spam):
    config = json.loads((saved_spam / ac.CONFIG_FILE).read_text())
    assert config["sha256"] == ac.adapter_sha256(saved_spam / ac.WEIGHTS_FILE, config)
    fields = {k: v for k, v in config.items() if k != "sha256"}
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    digest = sha256(f"{sha256_of(saved_spam / ac.WEIGHTS_FILE)}\n{text}".encode()).hexdigest()
    assert config["sha256"] == digest
