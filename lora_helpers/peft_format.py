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
from safetensors.torch import save_file
from torch import nn

from . import adapters as ad
from .files import atomic_write
from .lora import LoRALayer, LoRAWrapper, unwrap
from .model import FC1, FC2, KEY, OUT_PROJ, QUERY, VALUE

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
