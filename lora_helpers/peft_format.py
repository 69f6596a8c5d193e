"""Adapters in Hugging Face PEFT's LoRA format, for transformers' GPT-2 (notebook 08).

Our GPT is GPT-2 under other names (see gpt2.py), so one of our LoRA adapters is a PEFT LoRA
adapter there: ``trf_blocks.i.att.W_query/W_key/W_value`` is the fused ``h.i.attn.c_attn``,
``out_proj`` is ``attn.c_proj``, ``fc1`` is ``mlp.c_fc``, ``fc2`` is ``mlp.c_proj``, and a
classification ``out_head`` is ``GPT2ForSequenceClassification``'s ``score`` (saved in full, as
PEFT's ``modules_to_save``).

The fused layer computes ``[q | k | v]``; with the A factors side by side and the B factors on
a block diagonal, ``x [A_q A_k A_v] diag(B_q, B_k, B_v) = [x A_q B_q | x A_k B_k | x A_v B_v]``:
the same updates, at rank r_q + r_k + r_v, with alpha chosen so that the scaling is unchanged.
PEFT stores ``lora_A.weight`` as (rank, in) and ``lora_B.weight`` as (out, rank), for GPT-2's
Conv1D layers too, which are the transposes of our A (in, rank) and B (rank, out).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import adapters as ad
from .data import PAD_ID
from .files import atomic_write
from .gpt2 import CONV1D_WEIGHTS, gpt2_name_map
from .lora import AdapterWrapper, LoRAConfig, LoRALayer, LoRAWrapper, lora_scaling, unwrap
from .lora_model import add_lora
from .model import FC1, FC2, KEY, OUT_PROJ, QUERY, VALUE, GPTModel

PEFT_WEIGHTS_FILE, PEFT_CONFIG_FILE = "adapter_model.safetensors", "adapter_config.json"
PREFIX = "base_model.model."  # what PEFT puts before the transformers model's module names
# GPT-2 module inside block i -> our layers inside trf_blocks.i (c_attn: its q, k, v parts)
LAYER_MAP = {
    "attn.c_attn": (QUERY, KEY, VALUE),
    "attn.c_proj": (OUT_PROJ,),
    "mlp.c_fc": (FC1,),
    "mlp.c_proj": (FC2,),
}
OUR_TO_GPT2 = {ours: (gpt2, i) for gpt2, parts in LAYER_MAP.items() for i, ours in enumerate(parts)}
EMBEDDING = "wte"  # GPT-2's token embedding, our tok_emb: PEFT names its factors lora_embedding_A/B
TIED_EMBEDDING = (
    "The adapter updates tok_emb, whose table GPT-2 shares with its output head "
    "(tie_word_embeddings): PEFT's merge_and_unload() adds the update to wte and so to the head "
    "too, and the merged model's logits differ from ours (our merge keeps the head on the "
    "unchanged table). Use the exported adapter unmerged in PEFT, or leave tok_emb out of the "
    "targets."
)
PEFT_DEFAULT_ALPHA = 8  # LoraConfig's lora_alpha where a config leaves it out
RESAVE = "Save the adapter again with save_pretrained (PEFT) or save_adapter(..., format='peft')."


class PeftFormatError(ValueError):
    """An adapter with no exact equivalent in the other format."""


# --- export ----------------------------------------------------------------------------------


def save_peft_adapter(
    model: nn.Module,
    directory: str | Path,
    name: str | None = None,
    modules_to_save: str | tuple[str, ...] | list[str] = (),
    drop_head_bias: bool = False,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write adapter ``name`` (default: the active one) as PEFT's ``adapter_config.json`` and
    ``adapter_model.safetensors``, for transformers' GPT-2 (``GPT2ForSequenceClassification``
    when the adapter owns an ``out_head``, else ``GPT2LMHeadModel``).

    Raises PeftFormatError, naming the layer, where no exact mapping exists. ``score`` has no
    bias, so a head with a non-zero bias is refused unless ``drop_head_bias`` (not exact then).
    q, k and v that share one A (as imported from one c_attn) export at that A's rank; others
    at r_q + r_k + r_v, so an imported c_attn of rank r comes back at 3r once trained here.
    Warns where PEFT's merge would not be exact: an updated token embedding with a tied head.
    """
    name = name or ad.active_adapter(model)
    ad.check_adapter(model, name)
    ad.check_unmerged(model)
    layers = ad.adapter_parts(model, name, LoRAWrapper)
    rule = _one_scaling_rule(layers)
    tensors, ranks, alphas = {}, {}, {}
    for module, parts in _gpt2_modules(layers).items():
        lora_a, lora_b, scaling = _fused_factors(module, parts)
        key = f"{PREFIX}transformer.{module}"
        if module == EMBEDDING:  # same layouts: (rank, vocabulary) and (width, rank)
            tensors[f"{key}.lora_embedding_A"], tensors[f"{key}.lora_embedding_B"] = lora_a, lora_b
        else:
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = lora_a, lora_b
        ranks[module] = lora_a.shape[0]
        root = ranks[module] if rule == "standard" else math.sqrt(ranks[module])
        alphas[module] = scaling * root  # so that PEFT's alpha/rank (or /√rank) is our scaling
    head = _exported_head(model, name, ad.as_names(modules_to_save), drop_head_bias)
    if head is not None:
        tensors[f"{PREFIX}score.weight"] = head
    dropouts = [lora.config.dropout for lora in layers.values()]
    if EMBEDDING in ranks and head is None and model.cfg.tie_weights:
        warnings.warn(TIED_EMBEDDING, UserWarning, stacklevel=2)
    config = _peft_config(ranks, alphas, rule, head is not None, max(dropouts, default=0.0))
    config["base_model_name_or_path"] = base_model_name_or_path
    directory = Path(directory)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_write(directory / PEFT_WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp))
    with atomic_write(directory / PEFT_CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(config, indent=2))
    return directory


def _one_scaling_rule(layers: dict[str, LoRALayer]) -> str:
    rules = sorted({lora.scaling_rule for lora in layers.values()})
    if len(rules) > 1:
        raise PeftFormatError(
            f"The adapter mixes scaling rules {rules}; PEFT has one switch (use_rslora) for all "
            "layers. Export adapters that use one rule."
        )
    return rules[0]


def _gpt2_modules(layers: dict[str, LoRALayer]) -> dict[str, list[LoRALayer | None]]:
    """Our adapted layers grouped by the GPT-2 module they belong to (c_attn: [q, k, v])."""
    modules: dict[str, list[LoRALayer | None]] = {}
    for layer_name, lora in layers.items():
        if layer_name == "tok_emb":
            modules[EMBEDDING] = [lora]
            continue
        match = re.fullmatch(r"trf_blocks\.(\d+)\.(.+)", layer_name)
        if match is None or match[2] not in OUR_TO_GPT2:
            raise PeftFormatError(
                f"LoRA on {layer_name!r} has no PEFT equivalent: GPT-2's head is tied to the "
                "token embedding, and only the token embedding and the blocks' linear layers map "
                "onto GPT-2 modules. "
                "Train a classification head in full instead (modules_to_save)."
            )
        gpt2_name, part = OUR_TO_GPT2[match[2]]
        parts = modules.setdefault(f"h.{match[1]}.{gpt2_name}", [None] * len(LAYER_MAP[gpt2_name]))
        parts[part] = lora
    return modules


def _factors(lora: LoRALayer) -> tuple[torch.Tensor, torch.Tensor]:
    """A (in, r) and B (r, out) with ``x A B`` the unscaled update; OLoRA's ``- x A0 B0`` joins
    as rank r more: [A | A0] and [B; -B0]."""
    if lora.A0 is None:
        return lora.A.detach(), lora.B.detach()
    return torch.cat([lora.A, lora.A0], 1).detach(), torch.cat([lora.B, -lora.B0]).detach()


def _fused_factors(
    module: str, parts: list[LoRALayer | None]
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """PEFT's lora_A.weight (R, in), lora_B.weight (out, R) and the scaling for one GPT-2 module
    made of ``parts`` (None: a part without LoRA, which gets zero update)."""
    present = [lora for lora in parts if lora is not None]
    if any(not math.isclose(lora.scaling, present[0].scaling) for lora in present):
        scalings = [lora.scaling for lora in present]
        raise PeftFormatError(
            f"{module}: the query, key and value adapters have different scalings {scalings}, "
            "but the fused c_attn has one. Use the same alpha/rank for the three."
        )
    out_dim = present[0].B.shape[1]
    factors = [_factors(lora) if lora is not None else None for lora in parts]
    a_parts = [f[0] for f in factors if f is not None]
    if all(torch.equal(a, a_parts[0]) for a in a_parts):  # one A: B side by side, rank kept
        a = a_parts[0]
        zero = a.new_zeros(a.shape[1], out_dim)
        b = torch.cat([f[1] if f is not None else zero for f in factors], dim=1)
        return a.T, b.T, present[0].scaling
    a = torch.cat(a_parts, dim=1)
    b = torch.zeros(a.shape[1], out_dim * len(parts), dtype=a.dtype, device=a.device)
    row = 0
    for i, f in enumerate(factors):
        if f is not None:
            b[row : row + f[1].shape[0], i * out_dim : (i + 1) * out_dim] = f[1]
            row += f[1].shape[0]
    return a.T, b.T, present[0].scaling


def _exported_head(
    model: nn.Module, name: str, modules_to_save: list[str], drop_bias: bool
) -> torch.Tensor | None:
    """The weight of the classification head the adapter owns (as ``score``), or None."""
    versions = ad.adapter_parts(model, name, ad.PerAdapterModule)
    owned = set(versions) | set(modules_to_save)
    if owned - {"out_head"}:
        raise PeftFormatError(
            f"Only a classification out_head maps onto GPT-2 (as score); {sorted(owned)} given."
        )
    if not owned:
        return None
    head = versions["out_head"] if "out_head" in versions else unwrap(model.out_head)
    if head.bias is not None and head.bias.abs().max() > 0 and not drop_bias:
        raise PeftFormatError(
            "The out_head has a non-zero bias, but GPT2ForSequenceClassification's score has "
            "none, so no exported adapter computes the same logits. Train the head with "
            "bias=False, or pass drop_head_bias=True to export without it (the exported "
            f"logits then lack the bias {head.bias.tolist()})."
        )
    return head.weight


def _peft_config(
    ranks: dict[str, int], alphas: dict[str, float], rule: str, classifier: bool, dropout: float
) -> dict:
    """PEFT's LoraConfig as JSON: the commonest (rank, alpha) as r and lora_alpha, the others as
    rank_pattern/alpha_pattern (one regex per GPT-2 module kind where all of a kind agree)."""
    pairs = {m: (ranks[m], alphas[m]) for m in ranks}
    (rank, alpha), _ = Counter(pairs.values()).most_common(1)[0]
    rank_pattern, alpha_pattern = {}, {}
    for module, pair in pairs.items():
        if pair == (rank, alpha):
            continue
        kind = module.split(".", 2)[-1]
        same_kind = {p for m, p in pairs.items() if m.endswith(f".{kind}")}
        key = (
            rf"h\.\d+\.{re.escape(kind)}"
            if len(same_kind) == 1 and module != EMBEDDING
            else re.escape(module)
        )
        rank_pattern[key], alpha_pattern[key] = pair
    return {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS" if classifier else "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": rule == "rslora",
        "target_modules": sorted(ranks, key=_module_order),
        "modules_to_save": ["score"] if classifier else None,
        "lora_dropout": dropout,
        "fan_in_fan_out": True,  # GPT-2's Conv1D stores weights as (in, out)
        "bias": "none",
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def _module_order(module: str) -> tuple[int, int]:
    if module == EMBEDDING:
        return -1, 0
    block, kind = module.split(".", 2)[1:]
    return int(block), list(LAYER_MAP).index(kind)


# --- import ----------------------------------------------------------------------------------


def is_peft_adapter(directory: str | Path) -> bool:
    """True if ``directory`` holds a PEFT adapter (PEFT's weights file, not ours)."""
    return (Path(directory) / PEFT_WEIGHTS_FILE).exists()


def load_peft_adapter(model: nn.Module, directory: str | Path, name: str = "default") -> nn.Module:
    """Add the PEFT LoRA adapter for GPT-2 in ``directory`` to our ``model`` as ``name`` and make
    it active. A PEFT file records no fingerprint, so the base cannot be checked: load it onto
    the GPT-2 weights it was trained on. Raises PeftFormatError for what does not map exactly."""
    directory = Path(directory)
    path = directory / PEFT_CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PeftFormatError(
            f"{path} is not a readable PEFT adapter config ({err}). {RESAVE}"
        ) from err
    if not isinstance(config, dict):
        raise PeftFormatError(f"{path} is not a PEFT adapter config (a JSON object). {RESAVE}")
    _check_peft_config(config)
    ad.check_new_adapter(model, name)
    ad.check_unmerged(model)  # the new adapter would become active over merged weights
    lora_pairs, head = _read_peft_tensors(directory / PEFT_WEIGHTS_FILE)
    if not lora_pairs:
        raise PeftFormatError(f"{directory} holds no LoRA tensors (lora_A/lora_B).")
    _check_layers(config, lora_pairs, directory / PEFT_WEIGHTS_FILE)
    rule = "rslora" if config.get("use_rslora") else "standard"
    updates = {}  # our layer -> (A, B, rank, alpha)
    default_alpha = config.get("lora_alpha", PEFT_DEFAULT_ALPHA)
    for module, (lora_a, lora_b) in lora_pairs.items():
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, default_alpha)
        scaling = lora_scaling(alpha, lora_a.shape[0], rule)
        updates |= _split_module(model, module, lora_a, lora_b, scaling, rule)
    try:
        _attach(model, name, updates, rule, config.get("lora_dropout", 0.0), head)
    except ValueError as err:  # e.g. a shape for another GPT-2 size, an alpha of 0
        raise PeftFormatError(f"{directory}: {err}") from err
    return model


def _check_peft_config(config: dict) -> None:
    """Refuse what makes a PEFT adapter compute something other than plain LoRA."""
    unsupported = {
        "peft_type": ("LORA",),
        "use_dora": (False, None),
        "bias": ("none", None),
        "lora_bias": (False, None),
        "layer_replication": (None,),
        "trainable_token_indices": (None,),
        "target_parameters": (None, []),
        "alora_invocation_tokens": (None,),
        "use_qalora": (False, None),
        "use_bdlora": (None,),
        "kasa_config": (None,),
        "monteclora_config": (None,),
        "arrow_config": (None,),
    }
    wrong = {k: config.get(k) for k, ok in unsupported.items() if config.get(k) not in ok}
    if wrong:
        raise PeftFormatError(
            f"This PEFT adapter uses {wrong}, which has no equivalent in our LoRA layers; only "
            "plain LoRA (peft_type LORA, no DoRA, no bias training) can be imported."
        )
    _check_init(config.get("init_lora_weights", True))


# init_lora_weights values that leave the base weights as they are. PiSSA, OLoRA and CorDA
# subtract the adapter's starting product from them, LoRA-GA an offset, LoftQ quantises them.
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")
CONVERTIBLE_INITS = ("pissa", "olora", "corda", "lora_ga")  # PEFT converts these to plain LoRA


def _check_init(init) -> None:
    """Refuse an adapter trained on base weights that PEFT rewrote when it created it."""
    if init in PLAIN_INITS:
        return
    if isinstance(init, str) and init.startswith(CONVERTIBLE_INITS):
        remedy = (
            "Convert it to plain LoRA with PEFT: save the trained model with "
            "save_pretrained(folder, path_initial_model_for_weight_conversion=<the adapter "
            "saved before training, with init_lora_weights=True>), then load that folder."
        )
    else:
        remedy = "It has no plain-LoRA equivalent: use it in PEFT, on the base it was made for."
    raise PeftFormatError(
        f"This PEFT adapter has init_lora_weights={init!r}: PEFT rewrote the base weights when "
        "it created the adapter, so the adapter fits those rewritten weights, not the unchanged "
        f"GPT-2 weights it would be added to here, and its outputs would be wrong. {remedy}"
    )


def _check_layers(config: dict, lora_pairs: dict, path: Path) -> None:
    """With ``layers_to_transform``, every LoRA tensor must be in one of those blocks."""
    layers = config.get("layers_to_transform")
    if layers is None:
        return
    layers = {layers} if isinstance(layers, int) else set(layers)
    blocks = {m: re.search(r"(?:^|\.)h\.(\d+)\.", m) for m in lora_pairs}
    outside = sorted(m for m, match in blocks.items() if not match or int(match[1]) not in layers)
    if outside:
        raise PeftFormatError(
            f"{path} holds LoRA tensors for {outside}, outside its config's layers_to_transform "
            f"{sorted(layers)}, so PEFT would not use them: the file and its config disagree. "
            f"{RESAVE}"
        )


def _read_peft_tensors(
    path: Path,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor | None]:
    """LoRA (A, B) by module name (as in the transformers model) and the score weight, if any."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    head, unknown = None, []
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for bad files
        raise PeftFormatError(
            f"{path} is not a readable safetensors file ({err}): it is truncated or damaged. "
            f"Copy the folder again. {RESAVE}"
        ) from err
    for key, tensor in tensors.items():
        short = key.removeprefix(PREFIX)
        match = re.fullmatch(r"(.+)\.lora_(?:embedding_)?([AB])(?:\.weight)?", short)
        if match:
            pairs.setdefault(match[1], {})[match[2]] = tensor
        elif short == "score.weight":
            head = tensor
        else:
            unknown.append(key)
    unknown += sorted(f"{m} (lora_A or lora_B missing)" for m, p in pairs.items() if len(p) != 2)
    if unknown:
        raise PeftFormatError(
            f"{path} holds tensors with no place in our GPT: {unknown}. Only LoRA on c_attn, "
            "attn.c_proj, mlp.c_fc and mlp.c_proj, and a score head, map onto our layers."
        )
    if bad := sorted(_shapes(m, p) for m, p in pairs.items() if not _fits(p)):
        raise PeftFormatError(
            f"{path}: a LoRA pair is lora_A (rank, in) and lora_B (out, rank), rank >= 1, but "
            f"{'; '.join(bad)}. The file is damaged or holds no LoRA adapter. {RESAVE}"
        )
    return {m: (p["A"], p["B"]) for m, p in pairs.items()}, head


def _fits(pair: dict[str, torch.Tensor]) -> bool:
    """Whether ``pair`` is A (rank, in) and B (out, rank) of one rank >= 1."""
    a, b = pair["A"], pair["B"]
    return a.dim() == b.dim() == 2 and a.shape[0] == b.shape[1] >= 1


def _shapes(module: str, pair: dict[str, torch.Tensor]) -> str:
    return f"{module} has A {tuple(pair['A'].shape)} and B {tuple(pair['B'].shape)}"


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """PEFT's rule: the first pattern that matches the end of the module name, else default."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _split_module(
    model: nn.Module,
    module: str,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    rule: str,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, int, float]]:
    """Our layers' (A, B, rank, alpha) for one PEFT module. For c_attn: if the parts use
    disjoint ranks (a block-diagonal B, as we export), each part keeps only its own ones."""
    if module.removeprefix("transformer.") == EMBEDDING:
        rank = lora_a.shape[0]
        alpha = scaling * (rank if rule == "standard" else math.sqrt(rank))
        return {"tok_emb": (lora_a.T, lora_b.T, rank, alpha)}
    match = re.fullmatch(r"(?:transformer\.)?h\.(\d+)\.(.+)", module)
    if match is None or match[2] not in LAYER_MAP:
        raise PeftFormatError(
            f"LoRA on {module!r} has no equivalent in our GPT; only c_attn, attn.c_proj, "
            "mlp.c_fc and mlp.c_proj inside the blocks map onto our layers."
        )
    parts = LAYER_MAP[match[2]]
    if int(match[1]) >= model.cfg.n_layers:
        raise PeftFormatError(f"{module}: our model has only {model.cfg.n_layers} blocks.")
    b_parts = lora_b.chunk(len(parts))
    used = [set(torch.nonzero(b.abs().sum(0)).flatten().tolist()) for b in b_parts]
    disjoint = sum(map(len, used)) == len(set().union(*used)) > 0
    updates = {}
    for part, b, ranks in zip(parts, b_parts, used, strict=True):
        keep = sorted(ranks) if disjoint else list(range(lora_a.shape[0]))
        if keep:
            root = len(keep) if rule == "standard" else math.sqrt(len(keep))
            updates[f"trf_blocks.{match[1]}.{part}"] = (
                lora_a[keep].T, b[:, keep].T, len(keep), scaling * root
            )  # fmt: skip
    return updates


def _attach(
    model: nn.Module,
    name: str,
    updates: dict[str, tuple[torch.Tensor, torch.Tensor, int, float]],
    rule: str,
    dropout: float,
    head: torch.Tensor | None,
) -> None:
    """Add adapter ``name`` with the given per-layer factors (and head), all or nothing."""
    with ad.all_or_nothing(model, name):
        for layer_name, (a, b, rank, alpha) in updates.items():
            config = LoRAConfig(rank, alpha, scaling=rule, dropout=dropout, targets=layer_name)
            lora = add_lora(model, [layer_name], name, config)[layer_name]
            _copy(lora.A, a, f"{layer_name} A")
            _copy(lora.B, b, f"{layer_name} B")
        if head is not None:
            device = next(model.parameters()).device
            score = nn.Linear(head.shape[1], head.shape[0], bias=False, device=device)
            _copy(score.weight, head, "score.weight (our out_head)")
            ad.add_module_version(model, "out_head", name, score)
        ad.set_adapter(model, name)


def _copy(target: torch.Tensor, value: torch.Tensor, what: str) -> None:
    if target.shape != value.shape:
        raise PeftFormatError(
            f"{what}: the adapter has shape {tuple(value.shape)}, our model expects "
            f"{tuple(target.shape)}. Is it an adapter for another GPT-2 size?"
        )
    with torch.no_grad():
        target.copy_(value)


# --- the base model in transformers ----------------------------------------------------------


def gpt2_state_dict(model: GPTModel) -> dict[str, torch.Tensor]:
    """Our plain GPT's weights under transformers' GPT-2 names (``transformer.`` prefix, Conv1D
    (in, out) layout, q/k/v fused, zero q/k/v biases where ours have none): the inverse of
    ``gpt2.load_gpt2_weights``. A vocabulary head is included only if untied."""
    if any(isinstance(m, AdapterWrapper) for m in model.modules()):
        raise ValueError("Convert the plain base model: this one carries adapters (ad.unload).")
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
