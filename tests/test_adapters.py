import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lora_helpers import adapter_files as af
from lora_helpers import adapters as ad
from lora_helpers.downloads import sha256_of
from lora_helpers.lora import LinearWithLoRA, LoRAConfig
from lora_helpers.lora_model import add_lora, apply_lora, lora_layers, merge_lora
from lora_helpers.model import GPTModel, gpt_config

IDX = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(1))


def make_base(seed=0, **overrides) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(gpt_config("scratch-tiny", vocab_size=1000, **overrides)).eval()


def randomise(model, name):
    """Stand-in for training: give adapter `name` (and the modules it owns) random values."""
    torch.manual_seed(hash(name) % 1000)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            if name in layer.adapters:
                layer.adapters[name].B.normal_(std=0.1)
        for module in model.modules():
            if isinstance(module, ad.PerAdapterModule) and name in module.versions:
                for p in module.versions[name].parameters():
                    p.normal_(std=0.1)


@pytest.fixture
def base():
    return make_base()


@pytest.fixture
def two_adapters(base):
    """'chat': rank 2 on attention, vocabulary head; 'spam': rank 4 on all blocks + 2-class head."""
    model = copy.deepcopy(base)
    ad.add_adapter(model, "chat", LoRAConfig(rank=2, alpha=4, targets="attention"))
    randomise(model, "chat")
    ad.add_adapter(
        model,
        "spam",
        LoRAConfig(rank=4, alpha=4, targets="blocks"),
        modules_to_save={"out_head": nn.Linear(64, 2)},
    )
    randomise(model, "spam")
    return model.eval()


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
    config = json.loads((tmp_path / "spam" / af.CONFIG_FILE).read_text())
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
    assert set(load_file(str(tmp_path / "spam" / af.WEIGHTS_FILE))) >= {
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
    with pytest.raises(af.AdapterMismatchError, match="n_layers: adapter's base 2 vs model 3"):
        af.load_adapter(make_base(n_layers=3), tmp_path / "spam")
    other_weights = make_base(seed=1)
    with pytest.raises(af.AdapterMismatchError, match="weights differ"):
        af.load_adapter(other_weights, tmp_path / "spam")
    assert ad.adapter_names(other_weights) == []  # nothing was added
    config_path = tmp_path / "spam" / af.CONFIG_FILE
    config = json.loads(config_path.read_text())
    config["targets"].append("trf_blocks.7.att.W_query")
    config_path.write_text(json.dumps(config))
    _record_checksum(tmp_path / "spam")  # a consistent adapter of a deeper model
    with pytest.raises(af.AdapterMismatchError, match="trf_blocks.7.att.W_query"):
        af.load_adapter(make_base(), tmp_path / "spam")


def _record_checksum(directory):
    config = json.loads((directory / af.CONFIG_FILE).read_text())
    config["sha256"] = af.adapter_sha256(directory / af.WEIGHTS_FILE, config)
    (directory / af.CONFIG_FILE).write_text(json.dumps(config))


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_missing_or_extra_tensors_are_errors(base, two_adapters, tmp_path, change):
    af.save_adapter(two_adapters, tmp_path / "chat", name="chat")
    path = tmp_path / "chat" / af.WEIGHTS_FILE
    tensors = load_file(str(path))
    if change == "missing":
        del tensors["trf_blocks.1.att.W_key.lora.B"]
    else:
        tensors["trf_blocks.1.ff.fc1.lora.A"] = torch.zeros(64, 2)
    save_file(tensors, str(path))
    _record_checksum(tmp_path / "chat")  # a consistent file from another adapter, not a corrupt one
    fresh = copy.deepcopy(base)
    with pytest.raises(
        af.AdapterMismatchError, match="W_key.lora.B" if change == "missing" else "fc1"
    ):
        af.load_adapter(fresh, tmp_path / "chat")
    assert ad.adapter_names(fresh) == [] and not lora_layers(fresh)


def test_switching_back_and_forth_reproduces_each_adapter(two_adapters):
    outputs = {}
    for name in ("chat", "spam"):
        ad.set_adapter(two_adapters, name)
        outputs[name] = two_adapters(IDX)
    assert outputs["chat"].shape == (2, 10, 1000) and outputs["spam"].shape == (2, 10, 2)
    for name in ("spam", "chat", "spam", "chat"):
        ad.set_adapter(two_adapters, name)
        assert ad.active_adapter(two_adapters) == name
        assert torch.equal(two_adapters(IDX), outputs[name])


def test_only_the_active_adapter_trains(two_adapters):
    ad.set_adapter(two_adapters, "chat")
    trainable = {n for n, p in two_adapters.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.chat." in n for n in trainable)
    ad.set_adapter(two_adapters, "spam")
    trainable = {n for n, p in two_adapters.named_parameters() if p.requires_grad}
    assert "out_head.versions.spam.weight" in trainable
    assert all(".spam." in n for n in trainable)


def test_disable_gives_exactly_the_base(base, two_adapters):
    expected = base(IDX)
    with ad.disable_adapters(two_adapters):
        assert torch.equal(two_adapters(IDX), expected)
    assert not torch.equal(two_adapters(IDX)[..., :2], expected[..., :2])


def test_delete_and_unload(base, two_adapters):
    ad.set_adapter(two_adapters, "chat")
    chat_output = two_adapters(IDX)
    ad.delete_adapter(two_adapters, "spam")
    assert ad.adapter_names(two_adapters) == ["chat"]
    assert not isinstance(two_adapters.out_head, ad.PerAdapterModule)  # head owned by spam only
    assert not isinstance(two_adapters.trf_blocks[0].ff.fc1, LinearWithLoRA)
    assert torch.equal(two_adapters(IDX), chat_output)
    with pytest.raises(KeyError, match="spam"):
        ad.set_adapter(two_adapters, "spam")
    ad.unload(two_adapters)
    assert not lora_layers(two_adapters)
    assert two_adapters.state_dict().keys() == base.state_dict().keys()
    assert torch.equal(two_adapters(IDX), base(IDX))


def test_unload_after_merge_restores_the_base(base, two_adapters):
    ad.set_adapter(two_adapters, "chat")
    merge_lora(two_adapters)
    ad.unload(two_adapters)
    torch.testing.assert_close(two_adapters(IDX), base(IDX), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["chat", "spam"])
def test_merge_and_unload_matches_the_adapter_model(two_adapters, name):
    ad.set_adapter(two_adapters, name)
    expected = two_adapters(IDX)
    plain = ad.merge_and_unload(two_adapters)
    assert not lora_layers(plain)
    assert not any(isinstance(m, ad.PerAdapterModule) for m in plain.modules())
    torch.testing.assert_close(plain(IDX), expected, rtol=0, atol=1e-5)


def test_merge_and_unload_refuses_non_finite_and_changes_nothing(two_adapters):
    ad.set_adapter(two_adapters, "chat")
    with torch.no_grad():
        two_adapters.trf_blocks[0].att.W_value.adapters["chat"].B.fill_(float("nan"))
    with pytest.raises(ValueError, match="inf/NaN"):
        ad.merge_and_unload(two_adapters)
    assert len(lora_layers(two_adapters)) == 12
    assert not any(m.merged for m in lora_layers(two_adapters).values())


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


def test_misuse_is_refused(two_adapters, tmp_path):
    with pytest.raises(ValueError, match="already has an adapter named 'chat'"):
        ad.add_adapter(two_adapters, "chat", LoRAConfig(rank=2, alpha=2, targets="fc1"))
    with pytest.raises(af.AdapterLoadError, match="adapter_config.json is missing"):
        af.load_adapter(two_adapters, tmp_path / "nothing")
    ad.set_adapter(two_adapters, "chat")
    merge_lora(two_adapters)
    with pytest.raises(RuntimeError, match="unmerge"):
        af.save_adapter(two_adapters, tmp_path / "x")
    with pytest.raises(RuntimeError, match="unmerge"):
        ad.set_adapter(two_adapters, "spam")
    with pytest.raises(RuntimeError, match="unmerge"), ad.disable_adapters(two_adapters):
        pass


def test_a_merged_adapter_cannot_be_deleted_but_another_can(two_adapters):
    ad.set_adapter(two_adapters, "spam")
    ad.add_adapter(two_adapters, "extra", LoRAConfig(rank=2, alpha=2, targets="fc1"))
    ad.set_adapter(two_adapters, "chat")
    merge_lora(two_adapters)
    with pytest.raises(RuntimeError, match="'chat' is merged into the weights: unmerge_lora"):
        ad.delete_adapter(two_adapters, "chat")
    assert ad.adapter_names(two_adapters) == ["chat", "spam", "extra"]
    ad.delete_adapter(two_adapters, "extra")
    assert ad.adapter_names(two_adapters) == ["chat", "spam"]
    with pytest.raises(KeyError, match="No adapter named 'extra'"):
        ad.delete_adapter(two_adapters, "extra")


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


def _edit(directory, **changes):
    path = directory / af.CONFIG_FILE
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


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
    _edit(tmp_path / "spam", **changes)
    with pytest.raises(af.AdapterLoadError, match=message):
        af.load_adapter(make_base(), tmp_path / "spam")


def test_an_adapter_saved_before_its_config_had_a_checksum_still_loads(two_adapters, tmp_path):
    """Such a config records the tensor file's sha256 alone (weights_sha256)."""
    ad.set_adapter(two_adapters, "spam")
    expected = two_adapters(IDX)
    folder = af.save_adapter(two_adapters, tmp_path / "spam")
    config = json.loads((folder / af.CONFIG_FILE).read_text())
    config["weights_sha256"] = sha256_of(folder / af.WEIGHTS_FILE)
    del config["sha256"]
    (folder / af.CONFIG_FILE).write_text(json.dumps(config))
    torch.testing.assert_close(af.load_adapter(make_base(), folder)(IDX), expected)
    _edit(folder, alpha=8)  # no checksum covers it, but the recorded scaling no longer fits
    with pytest.raises(af.AdapterLoadError, match="'scaling' is 1.0, but alpha 8"):
        af.load_adapter(make_base(), folder)


def test_an_adapter_whose_layers_differ_in_alpha_is_not_saved(base, tmp_path):
    """adapter_config.json records one alpha: such a file would load with the wrong scaling."""
    model = copy.deepcopy(base)
    ad.add_adapter(model, "x", LoRAConfig(rank=2, alpha=4, targets="attention"))
    add_lora(model, ["trf_blocks.1.ff.fc1"], "x", LoRAConfig(rank=2, alpha=16))
    with pytest.raises(ValueError, match=r"trf_blocks.0.att.W_query has \(2, 4, .*\['trf_blocks.1"):
        af.save_adapter(model, tmp_path / "x", name="x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", ["", "a.b", None])
def test_an_adapter_name_must_be_a_non_empty_string_without_dots(
    base, two_adapters, tmp_path, name
):
    with pytest.raises(ValueError, match="name must be a non-empty string without '.', got"):
        ad.add_adapter(copy.deepcopy(base), name, LoRAConfig(rank=2, alpha=2))
    af.save_adapter(two_adapters, tmp_path / "chat", name="chat")
    fresh = copy.deepcopy(base)
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        af.load_adapter(fresh, tmp_path / "chat", name=name)
    assert not lora_layers(fresh)


def test_one_module_name_as_a_string_is_one_name_not_its_letters(base, tmp_path):
    model = copy.deepcopy(base)
    ad.add_adapter(model, "x", LoRAConfig(rank=2, alpha=2), modules_to_save="out_head")
    assert isinstance(model.out_head, ad.PerAdapterModule)
    config = json.loads(
        (af.save_adapter(model, tmp_path, modules_to_save="out_head") / af.CONFIG_FILE).read_text()
    )
    assert list(config["modules_to_save"]) == ["out_head"]
    assert af.base_fingerprint(base, exclude="out_head") == af.base_fingerprint(base, ["out_head"])


def test_an_adapter_loaded_onto_a_cast_base_is_refused_saying_why(two_adapters, tmp_path):
    af.save_adapter(two_adapters, tmp_path / "chat", name="chat")
    with pytest.raises(af.AdapterMismatchError, match=r"holds \['torch.bfloat16'\] weights: cast"):
        af.load_adapter(make_base().to(torch.bfloat16), tmp_path / "chat")
