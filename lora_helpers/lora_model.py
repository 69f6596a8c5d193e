"""LoRA on a whole model: choose target layers, wrap them, freeze the rest, merge (notebook 05).

The layers themselves (``LoRAConfig``, ``LoRALayer``, ``LinearWithLoRA``, ``EmbeddingWithLoRA``)
are in ``lora``; this module applies them to a model by name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from .lora import (
    EmbeddingWithLoRA,
    LinearWithLoRA,
    LoRAConfig,
    LoRALayer,
    LoRAWrapper,
    check_fits,
    check_mergeable,
    unwrap,
)
from .model import ATTENTION_LINEARS, BLOCK_LINEARS, FC1, FC2, QUERY, VALUE
from .quant import Linear4bit


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


# Our GPT's linear layers, grouped for ``LoRAConfig(targets=...)`` (names from model.py).
TARGET_GROUPS = {
    "attention": tuple(map(_short, ATTENTION_LINEARS)),
    "attention_qv": (_short(QUERY), _short(VALUE)),
    "feed_forward": (_short(FC1), _short(FC2)),
    "blocks": tuple(map(_short, BLOCK_LINEARS)),
    "head": ("out_head",),
}


class LoRAAlreadyAppliedError(RuntimeError):
    """A target layer already carries a LoRA adapter."""


def replace_linear_with_lora(model: nn.Module, rank: int, alpha: float) -> nn.Module:
    """Appendix E's recipe in *LLMs from scratch*: wrap every ``nn.Linear`` of ``model``,
    recursively, in place, with one rank and alpha."""
    config = LoRAConfig(rank, alpha)
    for name, module in model.named_children():
        if isinstance(module, nn.Linear):
            setattr(model, name, LinearWithLoRA(module, config))
        elif not isinstance(module, LoRAWrapper):
            replace_linear_with_lora(module, rank, alpha)
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRAWrapper]:
    """Every LoRA-wrapped layer of ``model`` (linear layers and embeddings), by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRAWrapper)}


def _linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The target candidates: plain linear layers and embeddings, and LoRA-wrapped ones (not
    their insides)."""
    layers, wrapped = {}, []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in wrapped):
            continue
        if isinstance(module, LoRAWrapper):
            wrapped.append(f"{name}.")
        if isinstance(module, (nn.Linear, nn.Embedding, Linear4bit, LoRAWrapper)):
            layers[name] = module
    return layers


def _matches(name: str, target: str) -> bool:
    return (
        name == target
        or name.rsplit(".", 1)[-1] == target
        or re.fullmatch(target, name) is not None
    )


def resolve_targets(model: nn.Module, targets: str | Iterable[str]) -> list[str]:
    """Names of the layers that ``targets`` (group names, layer names or regexes) select."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    patterns = [p for t in targets for p in TARGET_GROUPS.get(t, (t,))]
    layers = _linear_layers(model)
    unmatched = [p for p in patterns if not any(_matches(name, p) for name in layers)]
    if unmatched or not patterns:
        kinds = sorted({name.rsplit(".", 1)[-1] for name in layers})
        raise ValueError(
            f"LoRA targets {unmatched or targets} match no linear layer of this model. Use a group "
            f"({', '.join(TARGET_GROUPS)}), a layer kind ({', '.join(kinds)}), a full name "
            f"(e.g. {next(iter(layers), '?')!r}) or a regular expression over full names."
        )
    return [name for name in layers if any(_matches(name, p) for p in patterns)]


def apply_lora(
    model: nn.Module,
    config: LoRAConfig,
    freeze_base: bool = True,
    also_train: Iterable[str] = (),
) -> nn.Module:
    """Wrap the layers ``config.targets`` selects with LoRA, in place. With ``freeze_base``,
    every parameter except the LoRA factors and those of the modules in ``also_train`` (e.g. a
    new head) is frozen."""
    names = resolve_targets(model, config.targets)
    already = [n for n in names if isinstance(model.get_submodule(n), LoRAWrapper)]
    if already:
        raise LoRAAlreadyAppliedError(
            f"These layers already have LoRA: {already}. Apply LoRA once; to start over, build "
            "a fresh model (or load the base checkpoint again)."
        )
    add_lora(model, names, "default", config)
    if freeze_base:
        freeze_except_lora(model, also_train)
    return model


def add_lora(
    model: nn.Module, names: list[str], adapter: str, config: LoRAConfig
) -> dict[str, LoRALayer]:
    """Give the layers ``names`` of ``model`` the LoRA adapter ``adapter`` (not activated on
    layers that had adapters): a plain layer is wrapped, a wrapped one gets one adapter more.
    All or nothing: every layer is checked (weight not tied, ``config`` fits its size) before
    the first is changed. Returns the new LoRA updates by layer."""
    layers = {name: model.get_submodule(name) for name in names}
    # An embedding may be tied to the output layer: its update changes lookups only (see
    # EmbeddingWithLoRA.merge), so only linear layers must have a weight of their own.
    check_not_tied(model, [n for n, m in layers.items() if isinstance(m, nn.Linear)])
    for layer in layers.values():
        check_fits(config, unwrap(layer))
    added = {}
    for name, layer in layers.items():
        if isinstance(layer, LoRAWrapper):
            added[name] = layer.add_adapter(adapter, config)
        else:
            wrapper = EmbeddingWithLoRA if isinstance(layer, nn.Embedding) else LinearWithLoRA
            wrapped = wrapper(layer, config, adapter)
            replace_module(model, name, wrapped)
            added[name] = wrapped.lora
    return added


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` in the place of ``model``'s submodule ``name``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def check_not_tied(model: nn.Module, names: list[str]) -> None:
    """Refuse LoRA on layers whose weight is shared with another module (a tied head)."""
    shared = _shared_parameter_names(model)
    tied = [n for n in names if f"{n}.weight" in shared]
    if tied:
        raise ValueError(
            f"{tied} share their weight with {sorted(shared[f'{tied[0]}.weight'])}: a LoRA update "
            "merged into it would change those too. Leave it out of the targets, or untie it "
            "first (e.g. replace the head with a new nn.Linear)."
        )


def _shared_parameter_names(model: nn.Module) -> dict[str, set[str]]:
    """For each parameter name whose tensor is also registered elsewhere, the other names."""
    by_tensor: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(p), set()).add(name)
    return {n: names - {n} for names in by_tensor.values() if len(names) > 1 for n in names}


def freeze_except_lora(model: nn.Module, also_train: Iterable[str] = ()) -> None:
    """Make only the LoRA factors trainable, plus the parameters of the modules named in
    ``also_train`` (e.g. a new classification head: ``also_train=["out_head"]``)."""
    also_train = list(also_train)
    for name in also_train:
        model.get_submodule(name)  # raises AttributeError naming a missing module
    for name, param in model.named_parameters():
        is_lora = is_lora_parameter(name)
        in_also = any(name == m or name.startswith(f"{m}.") for m in also_train)
        param.requires_grad = is_lora or in_also


def merge_lora(model: nn.Module, safe: bool = True) -> int:
    """Merge every LoRA layer into its plain weight; returns how many were merged. With
    ``safe``, every merged weight is checked first and nothing changes if one is not finite."""
    layers = [m for m in lora_layers(model).values() if not m.merged and m.active is not None]
    for layer in layers:
        check_mergeable(layer)  # all checked before the first merge
    with torch.no_grad():
        finite = [torch.isfinite(layer.merged_weight()).all() for layer in layers] if safe else []
    if not all(finite):
        raise ValueError(
            "Merging would put inf/NaN into a weight; nothing was merged. Check the "
            "LoRA parameters (training may have diverged) or merge in a wider dtype."
        )
    for layer in layers:
        layer.merge(safe=False)
    return len(layers)


def unmerge_lora(model: nn.Module) -> int:
    """Undo ``merge_lora``; returns how many layers were unmerged."""
    layers = [m for m in lora_layers(model).values() if m.merged]
    for layer in layers:
        layer.unmerge()
    return len(layers)


def is_lora_parameter(name: str) -> bool:
    """True for the parameters (and OLoRA buffers) of LoRA adapters."""
    return ".adapters." in name


def lora_state_dict(model: nn.Module, name: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of one adapter (the active one by default) keyed ``<layer>.lora.<tensor>``,
    without the adapter's name: what an adapter file holds."""
    state = {}
    for layer_name, layer in lora_layers(model).items():
        adapter = name or layer.active
        if adapter in layer.adapters:
            for key, value in layer.adapters[adapter].state_dict().items():
                state[f"{layer_name}.lora.{key}"] = value
    return state
