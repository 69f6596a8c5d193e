"""OpenAI's pretrained GPT-2 (124M to 1558M parameters) loaded into our GPTModel.

The weights come from the Hugging Face hub as ``model.safetensors`` (never a pickle file), are
downloaded once into the data folder, and are copied tensor by tensor into our names. GPT-2
stores its linear layers as ``Conv1D`` with (in, out) weights, so those are transposed, and it
fuses query, key and value into one ``c_attn`` layer, which is split. Every tensor of the file
must fill a parameter and every parameter must be filled; anything else is an error that names
the keys.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import torch
from safetensors.torch import load_file

from .data import PAD_ID
from .downloads import DownloadError, download_file
from .lora import AdapterWrapper
from .model import FC1, FC2, KEY, OUT_PROJ, QUERY, VALUE, GPTConfig, GPTModel, gpt_config
from .settings import data_dir

# size -> (our preset in model.PRESETS, the model's repository on the Hugging Face hub)
GPT2_SIZES = {
    "124M": ("gpt2-124M", "openai-community/gpt2"),
    "355M": ("gpt2-355M", "openai-community/gpt2-medium"),
    "774M": ("gpt2-774M", "openai-community/gpt2-large"),
    "1558M": ("gpt2-1558M", "openai-community/gpt2-xl"),
}
HUB_URL = "https://huggingface.co/{repo}/resolve/main/model.safetensors"
CONFIG_URL = "https://huggingface.co/{repo}/resolve/main/config.json"  # checked by load_gpt2

# GPT-2's names (hub layout, no ``transformer.`` prefix) -> the parameters each tensor fills.
TOP_NAMES = {
    "wte.weight": ("tok_emb.weight",),  # also the output head: GPT-2 ties them
    "wpe.weight": ("pos_emb.weight",),
    "ln_f.weight": ("final_norm.scale",),
    "ln_f.bias": ("final_norm.shift",),
}
BLOCK_NAMES = {  # inside block i: ``h.{i}.<key>`` -> ``trf_blocks.{i}.<value>``
    "ln_1.weight": ("norm1.scale",),
    "ln_1.bias": ("norm1.shift",),
    "attn.c_attn.weight": (f"{QUERY}.weight", f"{KEY}.weight", f"{VALUE}.weight"),
    "attn.c_attn.bias": (f"{QUERY}.bias", f"{KEY}.bias", f"{VALUE}.bias"),
    "attn.c_proj.weight": (f"{OUT_PROJ}.weight",),
    "attn.c_proj.bias": (f"{OUT_PROJ}.bias",),
    "ln_2.weight": ("norm2.scale",),
    "ln_2.bias": ("norm2.shift",),
    "mlp.c_fc.weight": (f"{FC1}.weight",),
    "mlp.c_fc.bias": (f"{FC1}.bias",),
    "mlp.c_proj.weight": (f"{FC2}.weight",),
    "mlp.c_proj.bias": (f"{FC2}.bias",),
}
CONV1D_WEIGHTS = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")  # stored as (in, out)
# Causal-mask buffers that GPT-2 files may hold next to the weights; they are not weights.
NON_WEIGHT_BUFFERS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")


def gpt2_weights_path(size: str) -> Path:
    """Where GPT-2 ``size`` is cached: ``<data folder>/gpt2/<size>/model.safetensors``."""
    if size not in GPT2_SIZES:
        raise ValueError(f"Unknown GPT-2 size {size!r}; choose one of {list(GPT2_SIZES)}")
    return data_dir() / "gpt2" / size / "model.safetensors"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs) -> None:
        return None  # hand back the redirect itself: it carries the X-Linked-* headers


def hub_file_info(url: str, timeout: float) -> tuple[int | None, str | None]:
    """The size and sha256 the hub announces for a file (None where it says nothing).

    The hub sends them as ``X-Linked-Size`` and ``X-Linked-Etag`` with its redirect to the
    download server, so this is a HEAD request that does not follow redirects.
    """
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.build_opener(_NoRedirect).open(request, timeout=timeout) as response:
            headers = response.headers
    except urllib.error.HTTPError as err:
        if not 300 <= err.code < 400:
            raise
        headers = err.headers
        err.close()
    n_bytes = headers.get("X-Linked-Size")
    etag = headers.get("X-Linked-Etag", "").removeprefix("W/").strip('"')
    sha256 = etag if re.fullmatch("[0-9a-f]{64}", etag) else None
    return (int(n_bytes) if n_bytes else None), sha256


def fetch_gpt2(size: str = "124M", timeout: float = 10.0) -> Path:
    """The local ``model.safetensors`` of GPT-2 ``size``, downloaded and checked if not cached,
    with the model's ``config.json`` next to it (``load_gpt2_weights`` checks it).

    A cached file is used without any network call.
    """
    dest = gpt2_weights_path(size)
    if dest.exists():
        return dest
    url = HUB_URL.format(repo=GPT2_SIZES[size][1])
    try:
        n_bytes, sha256 = hub_file_info(url, timeout)
        download_file(url, dest, timeout, expected_size=n_bytes, expected_sha256=sha256)
        config_url = CONFIG_URL.format(repo=GPT2_SIZES[size][1])
        download_file(config_url, dest.parent / "config.json", timeout)
    except OSError as err:  # URLError, HTTPError and timeouts are all OSErrors
        raise DownloadError(
            f"The GPT-2 {size} weights need the network the first time: downloading {url} "
            f"failed ({err}).\nTo work offline, download that file by hand and place it at "
            f"{dest}, or set LORA_DATA_DIR to a folder that holds gpt2/{size}/model.safetensors."
        ) from err
    return dest


# Hugging Face's config.json field -> our GPTConfig field (GPT-2's defaults where it may be absent)
HF_CONFIG_FIELDS = {
    "vocab_size": "vocab_size",
    "n_positions": "context_length",
    "n_embd": "emb_dim",
    "n_head": "n_heads",
    "n_layer": "n_layers",
    "tie_word_embeddings": "tie_weights",
}
HF_DEFAULTS = {
    "tie_word_embeddings": True,
    "activation_function": "gelu_new",
    "n_inner": None,
    "scale_attn_weights": True,  # attention scores divided by sqrt(head size), as ours
    "scale_attn_by_inverse_layer_idx": False,  # and not also by the block's number
}


def check_gpt2_config(weights_path: str | Path, cfg: GPTConfig) -> None:
    """If the weights' folder holds Hugging Face's ``config.json``, raise ValueError unless
    every architecture field in it matches ``cfg``. (A wrong ``n_heads`` gives the very same
    shapes, so the weights alone would load silently and compute something else.)"""
    path = Path(weights_path).parent / "config.json"
    if not path.exists():
        return
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}): delete or fix it.") from err
    if not isinstance(hf, dict):
        raise ValueError(f"{path} is not a model config (a JSON object): delete or fix it.")
    hf = HF_DEFAULTS | hf
    hf["n_inner"] = hf["n_inner"] or 4 * hf.get("n_embd", 0)  # null means 4 x n_embd
    expected = {key: getattr(cfg, ours) for key, ours in HF_CONFIG_FIELDS.items()}
    expected |= {"model_type": "gpt2", "activation_function": "gelu_new"}
    expected |= {"layer_norm_epsilon": 1e-5, "n_inner": 4 * cfg.emb_dim}  # our LayerNorm, MLP
    expected |= {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False}
    diffs = [
        f"{key}: config.json {hf.get(key, 'missing')!r} vs model {value!r}"
        for key, value in expected.items()
        if hf.get(key, "missing") != value
    ]
    if diffs:
        raise ValueError(
            f"{path} describes another architecture than the model: {'; '.join(diffs)}. Build "
            "the model from the preset of that size (e.g. load_gpt2('355M')), or remove a "
            "config.json that does not belong to these weights."
        )


def gpt2_name_map(n_layers: int) -> dict[str, tuple[str, ...]]:
    """Every GPT-2 tensor name of an ``n_layers`` model -> the parameter names it fills."""
    names = dict(TOP_NAMES)
    for i in range(n_layers):
        for key, targets in BLOCK_NAMES.items():
            names[f"h.{i}.{key}"] = tuple(f"trf_blocks.{i}.{t}" for t in targets)
    return names


def read_gpt2_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights in a GPT-2 safetensors file under hub names: no ``transformer.`` prefix,
    no mask buffers, no ``lm_head.weight`` (checked to equal ``wte.weight``, as GPT-2 ties them)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"No GPT-2 weights file at {path}.")
    try:
        source = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for bad files
        raise ValueError(
            f"{path} is not a readable safetensors file ({err}): it is truncated or damaged. "
            "Delete it and download it again (load_gpt2 downloads a missing file)."
        ) from err
    tensors = {}
    for key, tensor in source.items():
        name = key.removeprefix("transformer.")
        if NON_WEIGHT_BUFFERS.fullmatch(name):
            continue
        if name in tensors:
            raise ValueError(f"{path} holds {name!r} twice (with and without 'transformer.')")
        tensors[name] = tensor
    head = tensors.pop("lm_head.weight", None)
    if (
        head is not None
        and "wte.weight" in tensors
        and not torch.equal(head, tensors["wte.weight"])
    ):
        raise ValueError(
            f"{path}: lm_head.weight differs from wte.weight, but GPT-2 (and our model) ties them."
        )
    return tensors


def load_gpt2_weights(model: GPTModel, path: str | Path) -> GPTModel:
    """Copy the GPT-2 weights in ``path`` into ``model``; nothing is copied unless all fit
    (including the architecture in a ``config.json`` next to them)."""
    check_gpt2_config(path, model.cfg)
    source = read_gpt2_tensors(path)
    names = gpt2_name_map(model.cfg.n_layers)
    params = dict(model.named_parameters())  # the tied head is listed once, as tok_emb.weight
    values, problems = {}, []
    for key in sorted(names.keys() & source.keys()):
        tensor = source[key].t() if key.endswith(CONV1D_WEIGHTS) else source[key]
        for target, part in zip(names[key], tensor.chunk(len(names[key])), strict=False):
            if target not in params:
                problems.append(f"{key} has no place in the model (it has no {target})")
            elif part.shape != params[target].shape:
                problems.append(
                    f"{key} gives {target} the shape {tuple(part.shape)}, "
                    f"expected {tuple(params[target].shape)}"
                )
            else:
                values[target] = part
    if missing := sorted(names.keys() - source.keys()):
        problems.append(f"missing tensors {missing}")
    if unexpected := sorted(source.keys() - names.keys()):
        problems.append(f"unexpected tensors {unexpected}")
    if unfilled := sorted(params.keys() - values.keys()):
        problems.append(f"parameters left unfilled {unfilled}")
    if problems:
        raise ValueError(f"{path} does not fit the model: " + "; ".join(problems))
    with torch.no_grad():
        for target, value in values.items():
            params[target].copy_(value)
    return model


def load_gpt2(size: str = "124M", device: str | torch.device = "cpu") -> GPTModel:
    """OpenAI's pretrained GPT-2 ``size`` as our GPTModel, in eval mode on ``device``."""
    path = fetch_gpt2(size)
    model = GPTModel(gpt_config(GPT2_SIZES[size][0]))
    return load_gpt2_weights(model, path).to(device).eval()


# --- our base model in transformers ---------------------------------------------------------


def gpt2_state_dict(model: GPTModel) -> dict[str, torch.Tensor]:
    """Our plain GPT's weights under transformers' GPT-2 names (``transformer.`` prefix, Conv1D
    (in, out) layout, q/k/v fused, zero q/k/v biases where ours have none): the inverse of
    ``load_gpt2_weights``. A vocabulary head is included only if untied."""
    if any(isinstance(m, AdapterWrapper) for m in model.modules()):
        raise ValueError(
            "Convert the plain base model: this one carries adapters (adapters.unload)."
        )
    params = dict(model.named_parameters())
    state = {}
    for key, targets in gpt2_name_map(model.cfg.n_layers).items():
        if key.endswith("attn.c_attn.bias") and not model.cfg.qkv_bias:
            tensor = torch.zeros(3 * model.cfg.emb_dim)
        else:
            tensor = torch.cat([params[t].detach() for t in targets])
        state[f"transformer.{key}"] = tensor.T if key.endswith(CONV1D_WEIGHTS) else tensor
    if not model.cfg.tie_weights and model.out_head.out_features == model.cfg.vocab_size:
        state["lm_head.weight"] = model.out_head.weight.detach()
    return {k: v.cpu().contiguous() for k, v in state.items()}


def to_transformers(model: GPTModel, num_labels: int | None = None, pad_token_id: int = PAD_ID):
    """transformers' GPT2LMHeadModel (or, with ``num_labels``, GPT2ForSequenceClassification,
    whose new ``score`` is random until an adapter brings one) holding our base's weights, in
    eval mode on the CPU: the base that our exported PEFT adapters load onto."""
    import transformers  # optional: pip install transformers

    cfg = model.cfg
    config = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.emb_dim,
        n_layer=cfg.n_layers, n_head=cfg.n_heads, resid_pdrop=cfg.drop_rate,
        embd_pdrop=cfg.drop_rate, attn_pdrop=cfg.drop_rate, layer_norm_epsilon=1e-5,
        activation_function="gelu_new", tie_word_embeddings=cfg.tie_weights,
        pad_token_id=pad_token_id, bos_token_id=PAD_ID, eos_token_id=PAD_ID,
    )  # fmt: skip
    if num_labels is None:
        hf_model = transformers.GPT2LMHeadModel(config)
    else:
        config.num_labels = num_labels
        hf_model = transformers.GPT2ForSequenceClassification(config)
    missing, unexpected = hf_model.load_state_dict(gpt2_state_dict(model), strict=False)
    left = set(missing) - {"lm_head.weight", "score.weight"}
    if unexpected or left:
        raise ValueError(f"Weights do not fit: unexpected {unexpected}, missing {sorted(left)}.")
    return hf_model.eval()
