import hashlib
import json
import socket
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_helpers import gpt2
from lora_helpers.downloads import CorruptFileError, DownloadError
from lora_helpers.model import PRESETS, GPTConfig, GPTModel

TINY = GPTConfig(
    vocab_size=1000, context_length=64, emb_dim=64, n_heads=2, n_layers=2, qkv_bias=True
)


@pytest.fixture(scope="module")
def hf_model():
    """A randomly initialised tiny GPT2LMHeadModel; biases and norms made non-trivial too."""
    transformers = pytest.importorskip("transformers")  # a test dependency (requirements-dev)
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=1000, n_positions=64, n_embd=64, n_layer=2, n_head=2, resid_pdrop=0,
        embd_pdrop=0, attn_pdrop=0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def hub_tensors(hf_model):
    """The tiny model's tensors as the hub stores them: no prefix, no lm_head, mask buffers."""
    tensors = {
        k.removeprefix("transformer."): v.contiguous()
        for k, v in hf_model.state_dict().items()
        if k != "lm_head.weight"
    }
    for i in range(2):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
        tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return tensors


@pytest.fixture
def hub_file(tmp_path, hub_tensors):
    path = tmp_path / "hub.safetensors"
    save_file(hub_tensors, str(path))
    return path


def _saved(tmp_path, tensors: dict) -> str:
    path = tmp_path / "edited.safetensors"
    save_file(tensors, str(path))
    return str(path)


@pytest.mark.parametrize("use_sdpa", [True, False])
@pytest.mark.parametrize("layout", ["save_pretrained", "hub"])
def test_logits_equal_transformers(hf_model, hub_file, tmp_path, layout, use_sdpa):
    if layout == "save_pretrained":
        hf_model.save_pretrained(tmp_path / "hf", safe_serialization=True)
        path = tmp_path / "hf" / "model.safetensors"
        assert "transformer.wte.weight" in load_file(str(path))
    else:
        path = hub_file
    model = gpt2.load_gpt2_weights(GPTModel(TINY), path).eval()
    assert model.out_head.weight is model.tok_emb.weight  # tying kept
    for block in model.trf_blocks:
        block.att.use_sdpa = use_sdpa
    torch.manual_seed(1)
    for shape in [(1, 1), (2, 7), (3, 33), (2, 64)]:  # (2, 64): the full context
        idx = torch.randint(0, 1000, shape)
        with torch.no_grad():
            expected = hf_model(idx).logits
            actual = model(idx)
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


def test_lm_head_is_accepted_only_when_tied(hub_tensors, tmp_path):
    tied = {**hub_tensors, "lm_head.weight": hub_tensors["wte.weight"].clone()}
    gpt2.load_gpt2_weights(GPTModel(TINY), _saved(tmp_path, tied))
    untied = {**hub_tensors, "lm_head.weight": hub_tensors["wte.weight"] + 1}
    with pytest.raises(ValueError, match="lm_head.weight differs from wte.weight"):
        gpt2.load_gpt2_weights(GPTModel(TINY), _saved(tmp_path, untied))


def test_missing_tensor_is_named_and_nothing_is_copied(hub_tensors, tmp_path):
    tensors = {k: v for k, v in hub_tensors.items() if k != "h.1.mlp.c_fc.bias"}
    model = GPTModel(TINY)
    before = model.tok_emb.weight.clone()
    with pytest.raises(ValueError, match=r"missing tensors \['h.1.mlp.c_fc.bias'\]") as info:
        gpt2.load_gpt2_weights(model, _saved(tmp_path, tensors))
    assert "trf_blocks.1.ff.fc1.bias" in str(info.value)  # the parameter left unfilled
    assert torch.equal(model.tok_emb.weight, before)


def test_extra_tensor_is_named(hub_tensors, tmp_path):
    tensors = {**hub_tensors, "h.0.attn.rotary.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"unexpected tensors \['h.0.attn.rotary.weight'\]"):
        gpt2.load_gpt2_weights(GPTModel(TINY), _saved(tmp_path, tensors))
    with pytest.raises(ValueError, match=r"missing tensors \['h.2.attn.c_attn.bias'"):
        gpt2.load_gpt2_weights(GPTModel(replace(TINY, n_layers=3)), _saved(tmp_path, hub_tensors))


def test_wrong_shape_and_duplicate_names_are_errors(hub_tensors, tmp_path):
    tensors = {**hub_tensors, "wpe.weight": torch.zeros(32, 64)}
    with pytest.raises(ValueError, match=r"wpe.weight gives pos_emb.weight the shape \(32, 64\)"):
        gpt2.load_gpt2_weights(GPTModel(TINY), _saved(tmp_path, tensors))
    tensors = {**hub_tensors, "transformer.wpe.weight": hub_tensors["wpe.weight"].clone()}
    with pytest.raises(ValueError, match="'wpe.weight' twice"):
        gpt2.load_gpt2_weights(GPTModel(TINY), _saved(tmp_path, tensors))


def test_unknown_size_lists_the_sizes():
    with pytest.raises(ValueError, match="124M"):
        gpt2.load_gpt2("125M")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network at all, and an empty data folder."""

    def refuse(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("LORA_DATA_DIR", str(tmp_path / "data"))


def test_offline_fails_fast_and_says_where_to_put_the_file(offline):
    dest = gpt2.gpt2_weights_path("355M")
    with pytest.raises(DownloadError) as info:
        gpt2.fetch_gpt2("355M")
    url = "https://huggingface.co/openai-community/gpt2-medium/resolve/main/model.safetensors"
    message = str(info.value)
    assert "network" in message and url in message and str(dest) in message
    assert not dest.exists()


def test_cached_file_is_loaded_without_network(offline, monkeypatch, hf_model, hub_tensors):
    monkeypatch.setitem(PRESETS, "gpt2-tiny", TINY)
    monkeypatch.setitem(gpt2.GPT2_SIZES, "tiny", ("gpt2-tiny", "nobody/tiny"))
    dest = gpt2.gpt2_weights_path("tiny")
    dest.parent.mkdir(parents=True)
    save_file(hub_tensors, str(dest))
    model = gpt2.load_gpt2("tiny")
    assert not model.training
    idx = torch.randint(0, 1000, (1, 64))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf_model(idx).logits, atol=1e-4, rtol=0)


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """A local server that acts like the hub: a 302 carrying X-Linked-* to a download server."""
    served = {"payload": b"weights", "size": None, "sha256": None}

    class Handler(BaseHTTPRequestHandler):
        def do_HEAD(self):
            if self.path.startswith("/cdn/"):
                self.send_response(200)
                self.send_header("Content-Length", str(len(served["payload"])))
            else:
                payload = served["payload"]
                self.send_response(302)
                self.send_header("Location", "/cdn/blob")
                self.send_header("X-Linked-Size", str(served["size"] or len(payload)))
                sha256 = served["sha256"] or hashlib.sha256(payload).hexdigest()
                self.send_header("X-Linked-Etag", f'"{sha256}"')
            self.end_headers()

        def do_GET(self):
            self.do_HEAD()
            if self.path.startswith("/cdn/"):
                self.wfile.write(served["payload"])

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(gpt2, "HUB_URL", f"http://127.0.0.1:{server.server_port}/{{repo}}/resolve")
    monkeypatch.setattr(
        gpt2, "CONFIG_URL", f"http://127.0.0.1:{server.server_port}/{{repo}}/config"
    )
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("LORA_DATA_DIR", str(tmp_path / "data"))
    yield served
    server.shutdown()
    server.server_close()


def test_download_is_checked_against_the_hub_headers(fake_hub):
    url = gpt2.HUB_URL.format(repo="openai-community/gpt2")
    assert gpt2.hub_file_info(url, timeout=5) == (7, hashlib.sha256(b"weights").hexdigest())
    path = gpt2.fetch_gpt2("124M")
    assert path == gpt2.gpt2_weights_path("124M") and path.read_bytes() == b"weights"
    assert (path.parent / "config.json").exists()  # fetched too, for load_gpt2 to check


@pytest.mark.parametrize("wrong", ["sha256", "size"])
def test_corrupt_download_is_refused_and_leaves_no_file(fake_hub, wrong):
    fake_hub[wrong] = "0" * 64 if wrong == "sha256" else 8
    dest = gpt2.gpt2_weights_path("124M")
    with pytest.raises(CorruptFileError, match=wrong):
        gpt2.fetch_gpt2("124M")
    assert not dest.exists() and list(dest.parent.iterdir()) == []  # no temporary file either


@pytest.mark.parametrize(
    ("field", "value"), [("scale_attn_by_inverse_layer_idx", True), ("scale_attn_weights", False)]
)
def test_a_config_json_with_another_attention_scaling_is_refused(hf_model, tmp_path, field, value):
    """Both change the attention scores without changing a shape: they would load silently."""
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {field: value}))
    model = GPTModel(TINY)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match=f"{field}: config.json {value} vs model {not value}"):
        gpt2.load_gpt2_weights(model, tmp_path / "model.safetensors")
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


def test_a_truncated_weights_file_is_refused_naming_it(hub_file):
    hub_file.write_bytes(hub_file.read_bytes()[:1000])
    with pytest.raises(ValueError, match="is not a readable safetensors file.*download it again"):
        gpt2.load_gpt2_weights(GPTModel(TINY), hub_file)


def test_a_missing_weights_file_or_a_config_json_that_is_no_object_is_named(hub_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="No GPT-2 weights file at .*none.safetensors"):
        gpt2.load_gpt2_weights(GPTModel(TINY), tmp_path / "none.safetensors")
    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(ValueError, match="config.json is not a model config"):
        gpt2.load_gpt2_weights(GPTModel(TINY), hub_file)


# --- a config.json next to the weights -------------------------------------------------------


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
