"""Our adapters against Hugging Face PEFT on a tiny random transformers GPT-2, offline."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lora_helpers import adapter_files as af
from lora_helpers import adapters as ad
from lora_helpers import gpt2, peft_import
from lora_helpers import peft_format as pf
from lora_helpers.finetune import last_token_logits
from lora_helpers.gpt2 import load_gpt2_weights
from lora_helpers.lora import LoRAConfig
from lora_helpers.lora_model import lora_layers, merge_lora
from lora_helpers.model import GPTConfig, GPTModel

transformers = pytest.importorskip("transformers")  # test dependencies (requirements-dev)
peft = pytest.importorskip("peft")

TINY = GPTConfig(
    vocab_size=1000, context_length=64, emb_dim=64, n_heads=2, n_layers=2, qkv_bias=True
)
PAD = 0  # the tiny vocabulary's padding token; messages below never contain it
IDX = torch.randint(1, 1000, (3, 12), generator=torch.Generator().manual_seed(1))
LENGTHS = torch.tensor([12, 7, 3])
PADDED = IDX.masked_fill(torch.arange(12) >= LENGTHS[:, None], PAD)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random tiny GPT-2 saved with save_pretrained; biases and norms made non-trivial."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=1000, n_positions=64, n_embd=64, n_layer=2, n_head=2, resid_pdrop=0,
        embd_pdrop=0, attn_pdrop=0, bos_token_id=0, eos_token_id=0, pad_token_id=PAD,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    path = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(path)
    return path


def hf_lm(checkpoint):
    return transformers.GPT2LMHeadModel.from_pretrained(checkpoint).eval()


def hf_classifier(checkpoint):
    return transformers.GPT2ForSequenceClassification.from_pretrained(
        checkpoint, num_labels=2, pad_token_id=PAD
    ).eval()


def ours(checkpoint) -> GPTModel:
    return load_gpt2_weights(GPTModel(TINY), checkpoint / "model.safetensors").eval()


def randomise(params, seed=0):
    """Stand-in for training: random non-zero values (B starts at zero otherwise)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in params:
            param.normal_(std=0.2)


def our_lora_params(model, name="x"):
    return [p for layer in lora_layers(model).values() for p in layer.adapters[name].parameters()]


def peft_lora_params(model):
    return [p for n, p in model.named_parameters() if "lora_" in n]


def close(actual, expected):
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("targets", "scaling", "init"),
    [
        ("blocks", "standard", "default"),
        ("blocks", "rslora", "default"),
        ("attention_qv", "standard", "default"),  # c_attn with a zero key block
        (["W_query", "fc2"], "rslora", "olora"),  # OLoRA: its A0 B0 term joins as more rank
    ],
)
def test_exported_adapter_gives_peft_our_logits(checkpoint, tmp_path, targets, scaling, init):
    model = ours(checkpoint)
    ad.add_adapter(
        model, "x", LoRAConfig(rank=2, alpha=5, targets=targets, scaling=scaling, init=init)
    )
    randomise(p for layer in lora_layers(model).values() for p in (layer.adapters["x"].B,))
    af.save_adapter(model, tmp_path, format="peft")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] and config["use_rslora"] == (scaling == "rslora")
    hf = peft.PeftModel.from_pretrained(hf_lm(checkpoint), tmp_path).eval()
    with torch.no_grad():
        close(hf(IDX).logits, model(IDX))
        assert (model(IDX) - ours(checkpoint)(IDX)).abs().max() > 1e-2  # the adapter matters


def test_fused_c_attn_keeps_the_scaling(checkpoint, tmp_path):
    """q, k, v at rank 2 are c_attn at rank 6: alpha triples (standard), or grows √3 (rsLoRA)."""
    for scaling, alpha in (("standard", 15.0), ("rslora", 5 * 3**0.5)):
        model = ours(checkpoint)
        ad.add_adapter(
            model, "x", LoRAConfig(rank=2, alpha=5, targets="attention", scaling=scaling)
        )
        af.save_adapter(model, tmp_path / scaling, format="peft")
        hf = peft.PeftModel.from_pretrained(hf_lm(checkpoint), tmp_path / scaling)
        c_attn = hf.base_model.model.transformer.h[1].attn.c_attn
        assert c_attn.r["default"] == 6 and c_attn.lora_alpha["default"] == pytest.approx(alpha)
        assert hf.base_model.model.transformer.h[1].attn.c_proj.r["default"] == 2


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_adapter_imports_with_the_same_logits(checkpoint, tmp_path, use_rslora):
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], use_rslora=use_rslora,
        rank_pattern={"h.1.mlp.c_fc": 2}, alpha_pattern={"h.1.mlp.c_fc": 3},
    )  # fmt: skip
    hf = peft.get_peft_model(hf_lm(checkpoint), config).eval()
    randomise(peft_lora_params(hf))
    hf.save_pretrained(tmp_path)
    model = af.load_adapter(ours(checkpoint), tmp_path, name="imported")
    assert ad.active_adapter(model) == "imported"
    with torch.no_grad():
        close(model(IDX), hf(IDX).logits)


def test_round_trip_gives_back_the_same_adapter(checkpoint, tmp_path):
    model = ours(checkpoint)
    ad.add_adapter(model, "x", LoRAConfig(rank=2, alpha=5, targets="blocks"))
    randomise(our_lora_params(model))
    af.save_adapter(model, tmp_path, format="peft")
    back = af.load_adapter(ours(checkpoint), tmp_path, name="x")
    for layer_name, layer in lora_layers(back).items():
        original = model.get_submodule(layer_name).adapters["x"]
        assert layer.lora.rank == 2 and layer.lora.scaling == pytest.approx(original.scaling)
        close(layer.lora.delta_weight(), original.delta_weight())


def test_classifier_exports_with_score_as_modules_to_save(checkpoint, tmp_path):
    model = ours(checkpoint)
    head = nn.Linear(64, 2)
    nn.init.zeros_(head.bias)  # GPT-2's score has no bias; a zero one maps exactly
    ad.add_adapter(
        model, "x", LoRAConfig(2, 4, targets="blocks"), modules_to_save={"out_head": head}
    )
    randomise(our_lora_params(model) + [head.weight])
    af.save_adapter(model, tmp_path, format="peft")
    assert "base_model.model.score.weight" in load_file(str(tmp_path / pf.PEFT_WEIGHTS_FILE))
    hf = peft.PeftModel.from_pretrained(hf_classifier(checkpoint), tmp_path).eval()
    with torch.no_grad():
        close(hf(PADDED).logits, last_token_logits(model, PADDED, LENGTHS))


def test_head_bias_is_refused_or_dropped_on_request(checkpoint, tmp_path):
    model = ours(checkpoint)
    head = nn.Linear(64, 2)
    ad.add_adapter(
        model, "x", LoRAConfig(2, 4, targets="attention"), modules_to_save={"out_head": head}
    )
    randomise(our_lora_params(model) + list(head.parameters()))
    with pytest.raises(pf.PeftFormatError, match="non-zero bias.*drop_head_bias=True"):
        af.save_adapter(model, tmp_path, format="peft")
    assert not (tmp_path / "adapter_config.json").exists()
    pf.save_peft_adapter(model, tmp_path, drop_head_bias=True)
    hf = peft.PeftModel.from_pretrained(hf_classifier(checkpoint), tmp_path).eval()
    with torch.no_grad():
        close(hf(PADDED).logits + head.bias, last_token_logits(model, PADDED, LENGTHS))


def test_peft_classifier_imports_with_the_same_logits(checkpoint, tmp_path):
    config = peft.LoraConfig(
        task_type="SEQ_CLS", r=3, lora_alpha=6, target_modules=["c_attn", "mlp.c_proj"]
    )
    hf = peft.get_peft_model(hf_classifier(checkpoint), config).eval()
    randomise(peft_lora_params(hf))
    hf.save_pretrained(tmp_path)
    model = af.load_adapter(ours(checkpoint), tmp_path)
    assert model.out_head.current().bias is None  # score has none
    with torch.no_grad():
        close(last_token_logits(model, PADDED, LENGTHS), hf(PADDED).logits)
    ad.set_adapter(model, "default")
    with ad.disable_adapters(model), torch.no_grad():
        close(model(IDX), ours(checkpoint)(IDX))  # the vocabulary head is still there


def test_qkv_with_different_ranks_but_one_scaling_map_exactly(checkpoint, tmp_path):
    model = ours(checkpoint)
    ad.add_adapter(model, "x", LoRAConfig(rank=2, alpha=5, targets=["W_query", "W_key"]))
    key = model.trf_blocks[1].att.W_key
    del key.adapters["x"]
    key.add_adapter("x", LoRAConfig(4, 10))  # scaling 10/4 = 5/2, as the query's
    randomise(our_lora_params(model))
    af.save_adapter(model, tmp_path, format="peft")
    hf = peft.PeftModel.from_pretrained(hf_lm(checkpoint), tmp_path).eval()
    assert hf.base_model.model.transformer.h[1].attn.c_attn.r["default"] == 6
    with torch.no_grad():
        close(hf(IDX).logits, model(IDX))


def test_what_has_no_exact_mapping_is_refused(checkpoint, tmp_path):
    model = ours(checkpoint)
    model.out_head = nn.Linear(64, 2)
    ad.add_adapter(model, "x", LoRAConfig(2, 4, targets=["blocks", "out_head"]))
    with pytest.raises(pf.PeftFormatError, match="'out_head' has no PEFT equivalent"):
        af.save_adapter(model, tmp_path, format="peft")
    model = ours(checkpoint)
    ad.add_adapter(model, "x", LoRAConfig(2, 4, targets="attention"))
    key = model.trf_blocks[0].att.W_key
    del key.adapters["x"]
    key.add_adapter("x", LoRAConfig(2, 8))
    with pytest.raises(pf.PeftFormatError, match="h.0.attn.c_attn: .* different scalings"):
        af.save_adapter(model, tmp_path, format="peft")


def test_peft_features_we_lack_are_refused(checkpoint, tmp_path):
    model = ours(checkpoint)
    ad.add_adapter(model, "x", LoRAConfig(2, 4, targets="attention"))
    af.save_adapter(model, tmp_path, format="peft")
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(pf.PeftFormatError, match="'use_dora': True"):
        af.load_adapter(ours(checkpoint), tmp_path)
    config_path.write_text(json.dumps(config))
    tensors = load_file(str(tmp_path / pf.PEFT_WEIGHTS_FILE))
    tensors["base_model.model.transformer.wpe.lora_embedding_A"] = torch.zeros(2, 64)
    tensors["base_model.model.transformer.wpe.lora_embedding_B"] = torch.zeros(64, 2)
    save_file(tensors, str(tmp_path / pf.PEFT_WEIGHTS_FILE))
    target = ours(checkpoint)
    with pytest.raises(pf.PeftFormatError, match="'transformer.wpe' has no equivalent"):
        af.load_adapter(target, tmp_path)
    assert ad.adapter_names(target) == [] and not lora_layers(target)  # nothing was added


def test_scratch_base_converts_to_transformers(tmp_path):
    """A base without q/k/v biases (our scratch models) as a transformers model, and an
    exported classifier adapter on it, predicting what ours predicts."""
    torch.manual_seed(2)
    base = GPTModel(GPTConfig(vocab_size=1000, context_length=64, emb_dim=64, n_heads=2,
                              n_layers=2)).eval()  # fmt: skip
    with torch.no_grad():
        close(gpt2.to_transformers(base)(IDX).logits, base(IDX))
    model = copy.deepcopy(base)
    ad.add_adapter(
        model, "x", LoRAConfig(2, 4), modules_to_save={"out_head": nn.Linear(64, 2, bias=False)}
    )
    randomise(our_lora_params(model) + [model.out_head.versions["x"].weight])
    af.save_adapter(model, tmp_path, format="peft")
    hf = gpt2.to_transformers(base, num_labels=2, pad_token_id=PAD)
    hf = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    with torch.no_grad():
        close(hf(PADDED).logits, last_token_logits(model, PADDED, LENGTHS))
    with pytest.raises(ValueError, match="carries adapters"):
        gpt2.gpt2_state_dict(model)


def test_classifier_with_an_embedding_update_exports_and_imports_exactly(checkpoint, tmp_path):
    model = ours(checkpoint)
    head = nn.Linear(64, 2, bias=False)
    targets = ["blocks", "tok_emb"]
    ad.add_adapter(
        model, "x", LoRAConfig(2, 4, targets=targets), modules_to_save={"out_head": head}
    )
    randomise(our_lora_params(model) + [head.weight])
    af.save_adapter(model, tmp_path, format="peft")
    saved = load_file(str(tmp_path / pf.PEFT_WEIGHTS_FILE))
    assert saved["base_model.model.transformer.wte.lora_embedding_A"].shape == (2, 1000)
    hf = peft.PeftModel.from_pretrained(hf_classifier(checkpoint), tmp_path).eval()
    with torch.no_grad():
        ours_logits = last_token_logits(model, PADDED, LENGTHS)
        close(hf(PADDED).logits, ours_logits)
        back = af.load_adapter(ours(checkpoint), tmp_path, name="y")
        close(last_token_logits(back, PADDED, LENGTHS), ours_logits)


def peft_folder(checkpoint, folder, **options):
    """A trained-looking PEFT LoRA adapter for the tiny GPT-2, saved in ``folder``."""
    config = peft.LoraConfig(**({"r": 2, "lora_alpha": 4, "target_modules": ["c_attn"]} | options))
    hf = peft.get_peft_model(hf_lm(checkpoint), config).eval()
    randomise(peft_lora_params(hf))
    hf.save_pretrained(folder)
    return hf


def test_a_peft_load_onto_a_merged_model_is_refused_and_changes_nothing(
    checkpoint, tmp_path, unchanged
):
    peft_folder(checkpoint, tmp_path)
    model = ours(checkpoint)
    ad.add_adapter(model, "old", LoRAConfig(rank=2, alpha=2, targets="attention"))
    merge_lora(model)
    check = unchanged(model)
    with pytest.raises(RuntimeError, match="merged into the weights: unmerge_lora"):
        af.load_adapter(model, tmp_path, name="new")
    check()


def test_a_peft_load_that_fails_half_way_with_any_error_changes_nothing(
    checkpoint, tmp_path, monkeypatch, unchanged
):
    peft_folder(checkpoint, tmp_path, target_modules=["c_attn", "c_fc"])
    model = ours(checkpoint)
    ad.add_adapter(model, "chat", LoRAConfig(rank=2, alpha=2, targets="attention"))
    check = unchanged(model)
    copy_, calls = peft_import._copy, []

    def interrupted(*args):  # Ctrl-C a few layers in: not an Exception, yet undone too
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        copy_(*args)

    monkeypatch.setattr(peft_import, "_copy", interrupted)
    with pytest.raises(KeyboardInterrupt):
        af.load_adapter(model, tmp_path, name="new")
    check()


def test_a_peft_adapter_with_dropout_loads_in_the_models_eval_mode(checkpoint, tmp_path):
    peft_folder(checkpoint, tmp_path, lora_dropout=0.5)
    model = af.load_adapter(ours(checkpoint), tmp_path)
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(IDX), model(IDX))


def test_pissa_is_refused_and_its_plain_lora_conversion_loads_exactly(checkpoint, tmp_path):
    """PiSSA subtracts the adapter's start from the base weights: the adapter alone does not
    fit GPT-2's weights. PEFT's conversion makes it a plain LoRA adapter (of twice the rank)."""
    config = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], init_lora_weights="pissa"
    )
    hf = peft.get_peft_model(hf_lm(checkpoint), config).eval()
    hf.peft_config["default"].init_lora_weights = True  # the starting point, as PEFT's docs do
    hf.save_pretrained(tmp_path / "start")
    hf.peft_config["default"].init_lora_weights = "pissa"
    randomise(peft_lora_params(hf))
    hf.save_pretrained(tmp_path / "pissa")
    with pytest.raises(pf.PeftFormatError, match="init_lora_weights='pissa'.*rewrote the base"):
        af.load_adapter(ours(checkpoint), tmp_path / "pissa")
    converted = tmp_path / "converted"
    hf.save_pretrained(converted, path_initial_model_for_weight_conversion=tmp_path / "start")
    with torch.no_grad():
        close(af.load_adapter(ours(checkpoint), converted)(IDX), hf(IDX).logits)


@pytest.mark.parametrize("init", ["olora", "corda", "loftq", "pissa_niter_4"])
def test_other_inits_that_rewrite_the_base_are_refused(checkpoint, tmp_path, init):
    peft_folder(checkpoint, tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(config | {"init_lora_weights": init}))
    with pytest.raises(pf.PeftFormatError, match=f"init_lora_weights='{init}'"):
        af.load_adapter(ours(checkpoint), tmp_path)


def test_layers_to_transform_imports_with_the_same_logits(checkpoint, tmp_path):
    hf = peft_folder(
        checkpoint, tmp_path, target_modules=["c_attn", "c_fc"], layers_to_transform=[1]
    )
    model = af.load_adapter(ours(checkpoint), tmp_path)
    assert {n.split(".", 2)[1] for n in lora_layers(model)} == {"1"}  # block 1 only
    with torch.no_grad():
        close(model(IDX), hf(IDX).logits)


def test_a_truncated_peft_file_is_refused_naming_it(checkpoint, tmp_path):
    peft_folder(checkpoint, tmp_path)
    path = tmp_path / pf.PEFT_WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(pf.PeftFormatError, match="is not a readable safetensors file") as err:
        af.load_adapter(ours(checkpoint), tmp_path)
    assert str(path) in str(err.value)


def test_peft_to_ours_to_peft_keeps_c_attns_rank(checkpoint, tmp_path):
    hf = peft_folder(checkpoint, tmp_path / "peft", r=4, lora_alpha=8)
    imported = af.load_adapter(ours(checkpoint), tmp_path / "peft")
    af.save_adapter(imported, tmp_path / "back", format="peft")
    config = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["rank_pattern"]) == (4, 8, {})
    back = peft.PeftModel.from_pretrained(hf_lm(checkpoint), tmp_path / "back").eval()
    with torch.no_grad():
        close(back(IDX).logits, hf(IDX).logits)


def test_exporting_an_embedding_update_with_a_tied_head_warns(checkpoint, tmp_path):
    """PEFT's merge adds the update to wte, which the tied head shares; unmerged it is exact."""
    model = ours(checkpoint)
    ad.add_adapter(model, "x", LoRAConfig(rank=2, alpha=4, targets=["tok_emb", "attention"]))
    randomise(our_lora_params(model))
    with pytest.warns(UserWarning, match="shares with its output head.*merge_and_unload"):
        af.save_adapter(model, tmp_path, format="peft")
    hf = peft.PeftModel.from_pretrained(hf_lm(checkpoint), tmp_path).eval()
    with torch.no_grad():
        close(hf(IDX).logits, model(IDX))
        merged = hf.merge_and_unload()(IDX).logits
    assert (merged - model(IDX)).abs().max() > 1e-2


def test_a_peft_config_without_lora_alpha_uses_peft_s_default(checkpoint, tmp_path):
    hf = peft_folder(checkpoint, tmp_path, lora_alpha=8)  # PEFT's default
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    del config["lora_alpha"]
    config_path.write_text(json.dumps(config))
    with torch.no_grad():
        close(af.load_adapter(ours(checkpoint), tmp_path)(IDX), hf(IDX).logits)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda t, k: t.update({k: t[k][:1]}), r"has A \(1, 64\) and B \(192, 2\)"),
        (lambda t, k: t.update({k: t[k][:0]}), r"has A \(0, 64\)"),
        (lambda t, k: t.update({k: t[k][0]}), r"has A \(64,\)"),
    ],
)
def test_lora_factors_of_unmatched_ranks_are_refused(checkpoint, tmp_path, damage, message):
    peft_folder(checkpoint, tmp_path)
    path = tmp_path / pf.PEFT_WEIGHTS_FILE
    tensors = load_file(str(path))
    damage(tensors, "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight")
    save_file(tensors, str(path))
    with pytest.raises(pf.PeftFormatError, match=f"{path}: a LoRA pair is .*{message}"):
        af.load_adapter(ours(checkpoint), tmp_path)


def test_a_peft_adapter_for_another_size_is_refused_naming_the_folder(checkpoint, tmp_path):
    peft_folder(checkpoint, tmp_path)
    small = GPTModel(GPTConfig(**(TINY.to_dict() | {"emb_dim": 32})))
    with pytest.raises(pf.PeftFormatError, match=f"{tmp_path}: .*another GPT-2 size"):
        af.load_adapter(small, tmp_path)
    assert not lora_layers(small)


def test_a_peft_config_that_is_not_an_object_is_refused(checkpoint, tmp_path):
    peft_folder(checkpoint, tmp_path)
    (tmp_path / "adapter_config.json").write_text("[]")
    with pytest.raises(pf.PeftFormatError, match="is not a PEFT adapter config"):
        af.load_adapter(ours(checkpoint), tmp_path)
