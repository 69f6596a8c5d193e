"""Adapters as switchable parts of one base model (notebook 08).

The adapter lifecycle known from Hugging Face PEFT, written from scratch: several named adapters
on one frozen base, ``set_adapter``, ``disable_adapters``, ``delete_adapter``, ``unload`` and
``merge_and_unload``. Saving and loading them is ``adapter_files``' job.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch import nn

from .lora import AdapterWrapper, LoRAConfig
from .lora_model import (
    add_lora,
    lora_layers,
    merge_lora,
    replace_module,
    resolve_targets,
    unmerge_lora,
)


class PerAdapterModule(AdapterWrapper):
    """A module an adapter replaces or trains in full (e.g. a new head): the original, plus one
    version per adapter. ``forward`` uses the active adapter's version, else the original."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original = original
        self.versions = nn.ModuleDict()
        self.train(original.training)

    plain = property(lambda self: self.original)
    parts = property(lambda self: self.versions)

    def current(self) -> nn.Module:
        if self.disabled or self.active not in self.versions:
            return self.original
        return self.versions[self.active]

    merged_module = current  # an adapter's own module is all there is to merge

    def forward(self, *args, **kwargs):
        return self.current()(*args, **kwargs)


def adapter_wrappers(model: nn.Module) -> dict[str, AdapterWrapper]:
    """Every module of ``model`` that holds adapters (LoRA layers, PerAdapterModules), by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterWrapper)}


def adapter_parts(model: nn.Module, name: str, kind: type[AdapterWrapper]) -> dict[str, nn.Module]:
    """Adapter ``name``'s part in each wrapper of type ``kind`` (its LoRA updates in the
    LoRA layers, its own modules in the PerAdapterModules), by module name."""
    wrappers = adapter_wrappers(model).items()
    return {n: w.parts[name] for n, w in wrappers if isinstance(w, kind) and name in w.parts}


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the adapters on ``model``, in the order they were added."""
    names = [n for m in lora_layers(model).values() for n in m.adapters]
    return list(dict.fromkeys(names))


def as_names(names: str | Iterable[str]) -> list[str]:
    """One module name or several, as a list: a string is one name, not its characters."""
    return [names] if isinstance(names, str) else list(names)


def check_new_adapter(model: nn.Module, name: str) -> None:
    """Raise ValueError unless ``name`` can name a new adapter of ``model``: a non-empty string
    without '.' (it becomes a module name) that no adapter of ``model`` has."""
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(
            f"An adapter's name must be a non-empty string without '.', got {name!r}: it "
            "names the adapter's modules."
        )
    if name in adapter_names(model):
        raise ValueError(f"The model already has an adapter named {name!r}: {adapter_names(model)}")


def check_adapter(model: nn.Module, name: str) -> None:
    """Raise KeyError unless ``model`` has an adapter named ``name``."""
    if name not in adapter_names(model):
        raise KeyError(f"No adapter named {name!r}; the model has {adapter_names(model)}")


def check_unmerged(model: nn.Module, name: str | None = None) -> None:
    """Raise RuntimeError if an adapter (adapter ``name``, if given) is merged into the weights."""
    merged = {w.active for w in adapter_wrappers(model).values() if w.merged}
    if merged and (name is None or name in merged):
        what = "An adapter is" if name is None else f"{name!r} is"
        raise RuntimeError(f"{what} merged into the weights: unmerge_lora(model) first.")


def add_adapter(
    model: nn.Module,
    name: str,
    config: LoRAConfig,
    modules_to_save: dict[str, nn.Module] | Iterable[str] = (),
) -> nn.Module:
    """Add a named LoRA adapter on the layers ``config.targets`` selects and make it the
    active, trainable one.

    ``modules_to_save`` are modules this adapter owns in full: a name (the adapter trains its
    own copy of that module) or ``{name: new_module}`` (e.g. ``{"out_head": nn.Linear(d, 2)}``).
    """
    check_new_adapter(model, name)
    names = resolve_targets(model, config.targets)
    own = (
        modules_to_save
        if isinstance(modules_to_save, dict)
        else dict.fromkeys(as_names(modules_to_save))
    )
    for module_name in own:
        model.get_submodule(module_name)  # raises AttributeError naming a missing module
    add_lora(model, names, name, config)  # checks every layer before changing one
    for module_name, module in own.items():
        add_module_version(model, module_name, name, module)
    set_adapter(model, name)
    return model


def add_module_version(
    model: nn.Module, module_name: str, name: str, module: nn.Module | None = None
) -> None:
    """Give adapter ``name`` its own version of ``model``'s module ``module_name``: ``module``,
    or (None) a copy of the original; in the original's mode (train or eval)."""
    wrapper = model.get_submodule(module_name)
    if not isinstance(wrapper, PerAdapterModule):
        wrapper = PerAdapterModule(wrapper)
        replace_module(model, module_name, wrapper)
    version = module if module is not None else copy.deepcopy(wrapper.original)
    wrapper.versions[name] = version.train(wrapper.training)


def set_adapter(model: nn.Module, name: str) -> None:
    """Make ``name`` the active adapter (layers without it act as plain layers) and the only
    trainable part of the model."""
    check_adapter(model, name)
    check_unmerged(model)
    model.requires_grad_(False)
    for wrapper in adapter_wrappers(model).values():
        wrapper.active = name if name in wrapper.parts else None
        if wrapper.active is not None:
            wrapper.parts[name].requires_grad_(True)


def active_adapter(model: nn.Module) -> str | None:
    """The name of the active adapter, or None."""
    actives = {m.active for m in lora_layers(model).values()} - {None}
    return actives.pop() if actives else None


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within this block the model computes exactly what its base model computes."""
    check_unmerged(model)
    wrappers = adapter_wrappers(model).values()
    for wrapper in wrappers:
        wrapper.disabled = True
    try:
        yield model
    finally:
        for wrapper in wrappers:
            wrapper.disabled = False


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``; a layer left with no adapter becomes its plain module again."""
    check_adapter(model, name)
    check_unmerged(model, name)
    _remove_parts(model, name)


def _remove_parts(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``'s part from every wrapper; unwrap the wrappers left empty."""
    for wrapper_name, wrapper in adapter_wrappers(model).items():
        if name in wrapper.parts:
            del wrapper.parts[name]
            wrapper.active = None if wrapper.active == name else wrapper.active
            if not wrapper.parts:
                replace_module(model, wrapper_name, wrapper.plain)


@contextmanager
def all_or_nothing(model: nn.Module, name: str) -> Iterator[None]:
    """Add adapter ``name`` within this block: on any exception the model is left as it was
    (the new adapter's parts removed, the active adapter and ``requires_grad`` flags restored)."""
    actives = {wrapper: wrapper.active for wrapper in adapter_wrappers(model).values()}
    trainable = {param: param.requires_grad for param in model.parameters()}
    try:
        yield
    except BaseException:
        _remove_parts(model, name)
        for wrapper, active in actives.items():
            wrapper.active = active
        for param, flag in trainable.items():
            param.requires_grad_(flag)
        raise


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging: back to the plain base model (in place)."""
    unmerge_lora(model)
    for name, wrapper in adapter_wrappers(model).items():
        replace_module(model, name, wrapper.plain)
    return model


def merge_and_unload(model: nn.Module, safe: bool = True) -> nn.Module:
    """Merge the active adapter into the weights and drop every adapter: a plain model with the
    same outputs and no extra cost. With ``safe``, refuse (changing nothing) if a merged weight
    would not be finite."""
    merge_lora(model, safe=safe)
    for name, wrapper in adapter_wrappers(model).items():
        replace_module(model, name, wrapper.merged_module())
    return model
