"""lora_helpers.adapters: several named adapters on one model: adding, switching, disabling,
deleting, unloading and merging them (saving and loading them: tests/test_adapter_files.py)."""

import copy
import json

import pytest
import torch

# The tiny base and its two adapters: tests/tiny_adapters.py.
from tiny_adapters import IDX, make_base, with_two_adapters

from lora_helpers import adapter_config as ac
from lora_helpers import adapter_files as af
from lora_helpers import adapters as ad
from lora_helpers.lora import LinearWithLoRA, LoRAConfig
from lora_helpers.lora_model import lora_layers, merge_lora


@pytest.fixture
def base():
    return make_base()


@pytest.fixture
def two_adapters(base):
    return with_two_adapters(base)


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


def test_misuse_is_refused(two_adapters, tmp_path):
    with pytest.raises(ValueError, match="already has an adapter named 'chat'"):
        ad.add_adapter(two_adapters, "chat", LoRAConfig(rank=2, alpha=2, targets="fc1"))
    with pytest.raises(ac.AdapterLoadError, match="adapter_config.json is missing"):
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
        (af.save_adapter(model, tmp_path, modules_to_save="out_head") / ac.CONFIG_FILE).read_text()
    )
    assert list(config["modules_to_save"]) == ["out_head"]
    assert af.base_fingerprint(base, exclude="out_head") == af.base_fingerprint(base, ["out_head"])
