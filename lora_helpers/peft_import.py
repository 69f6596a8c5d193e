"""Reading a Hugging Face PEFT LoRA adapter for transformers' GPT-2 into our GPT (notebook 08):
the inverse of ``peft_format``'s export, refusing what does not map exactly (another PEFT
method, a trained bias, DoRA, shapes of another GPT-2 size)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from . import adapters as ad
from .lora import LoRAConfig, lora_scaling
from .lora_model import add_lora
from .peft_format import (
    EMBEDDING,
    LAYER_MAP,
    PEFT_CONFIG_FILE,
    PEFT_DEFAULT_ALPHA,
    PEFT_WEIGHTS_FILE,
    PREFIX,
    RESAVE,
    PeftFormatError,
)  # fmt: skip


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
