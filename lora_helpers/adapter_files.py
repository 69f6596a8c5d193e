"""Adapters as files (notebook 08): ``save_adapter`` / ``load_adapter`` for a small safetensors
file plus a JSON config that records the adapter's settings and which base model it belongs to
(its fields and checks: ``adapter_config``); Hugging Face PEFT's files are written by
``peft_format`` and read by ``peft_import``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import fields
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from . import __version__
from .adapter_config import (
    ADAPTER_FORMAT,
    CONFIG_FILE,
    REMEDY,
    WEIGHTS_FILE,
    AdapterLoadError,
    AdapterMismatchError,
    adapter_sha256,
    read_adapter_config,
    read_adapter_tensors,
)  # fmt: skip
from .adapters import (
    PerAdapterModule,
    active_adapter,
    adapter_parts,
    adapter_wrappers,
    add_adapter,
    all_or_nothing,
    as_names,
    check_adapter,
    check_new_adapter,
    check_unmerged,
)
from .files import atomic_write
from .lora import LoRAConfig, LoRALayer, LoRAWrapper, as_rank, layer_dims, unwrap
from .lora_model import lora_state_dict
from .model import GPTConfig
from .peft_format import save_peft_adapter
from .peft_import import is_peft_adapter, load_peft_adapter
from .quant import Linear4bit
from .settings import display_path


def base_fingerprint(model: nn.Module, exclude: Iterable[str] = ()) -> str:
    """sha256 over the base model's parameters (names, dtypes, shapes, values), ignoring adapters
    and the modules in ``exclude``; the same for a plain base and one carrying adapters."""
    exclude = tuple(f"{name}." for name in as_names(exclude))
    digest = hashlib.sha256()
    for name, tensor in sorted(_base_parameters(model).items()):
        if name.startswith(exclude):
            continue
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _base_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters of the base under the names they have without adapters."""
    wrappers = adapter_wrappers(model)
    stored = model.state_dict(keep_vars=True)  # persistent buffers too: a 4-bit layer's codes
    tensors = dict(model.named_parameters()) | {
        n: b for n, b in model.named_buffers() if n in stored
    }
    base = {}
    for name, param in tensors.items():
        owner = next((w for w in wrappers if name.startswith(f"{w}.")), None)
        if owner is None:
            base[name] = param
            continue
        rest = name[len(owner) + 1 :]
        for inner in ("linear.", "embedding.", "original."):
            if rest.startswith(inner):
                base[f"{owner}.{rest[len(inner) :]}"] = param
    return base


def _architecture(model: nn.Module) -> dict:
    cfg: GPTConfig = model.cfg
    architecture = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name != "drop_rate"}
    quantized = [n for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    if quantized:  # recorded only for a 4-bit base: an fp32 base's record stays as it was
        architecture["quantized"] = f"NF4 ({len(quantized)} linear layers)"
    return architecture


def save_adapter(
    model: nn.Module,
    directory: str | Path,
    name: str | None = None,
    modules_to_save: str | Iterable[str] = (),
    format: str = "lora_helpers",
) -> Path:
    """Write adapter ``name`` (default: the active one) to ``directory``: its LoRA tensors and
    the modules it owns (plus any plain ``modules_to_save``, e.g. a new head) in
    ``adapter.safetensors``, and ``adapter_config.json`` describing it and its base.
    ``format="peft"``: Hugging Face PEFT's files for transformers' GPT-2 (see peft_format)."""
    if format == "peft":
        return save_peft_adapter(model, directory, name, as_names(modules_to_save))
    if format != "lora_helpers":
        raise ValueError(f"Unknown adapter format {format!r}; choose 'lora_helpers' or 'peft'.")
    name = name or active_adapter(model)
    check_adapter(model, name)
    check_unmerged(model)
    layers = adapter_parts(model, name, LoRAWrapper)
    first = _one_setting(name, layers)
    owned = {n: model.get_submodule(n) for n in as_names(modules_to_save)}
    owned |= adapter_parts(model, name, PerAdapterModule)  # its own version, if it has one
    tensors = lora_state_dict(model, name)
    for module_name, module in owned.items():
        tensors |= {f"{module_name}.{k}": v for k, v in module.state_dict().items()}
    config = {
        "format": ADAPTER_FORMAT,
        "library": {"name": "lora_helpers", "version": __version__},
        "rank": first.rank,
        "alpha": first.alpha,
        "scaling_rule": first.scaling,
        "scaling": first.factor,
        "dropout": first.dropout,
        "init": first.init,
        "targets": list(layers),
        "modules_to_save": {n: _describe(m) for n, m in owned.items()},
        "base": {
            "architecture": _architecture(model),
            "fingerprint": base_fingerprint(model, exclude=owned),
        },
    }
    directory = Path(directory)
    with atomic_write(directory / WEIGHTS_FILE) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        config["sha256"] = adapter_sha256(tmp, config)  # load_adapter refuses a changed byte
    with atomic_write(directory / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(config, indent=2))
    return directory


def _one_setting(name: str, layers: dict[str, LoRALayer]) -> LoRAConfig:
    """The first layer's LoRA configuration, after checking that all share its rank, alpha,
    scaling rule, dropout and init: adapter_config.json records them once, for every layer."""

    def setting(lora: LoRALayer) -> tuple:
        c = lora.config
        return c.rank, c.alpha, c.scaling, c.dropout, c.init

    (first_name, first), *_ = layers.items()
    if others := [n for n, lora in layers.items() if setting(lora) != setting(first)]:
        raise ValueError(
            f"Adapter {name!r} does not use one setting (rank, alpha, scaling rule, dropout, "
            f"init) for all its layers: {first_name} has {setting(first)}, but {others} differ. "
            "adapter_config.json records one setting, so the file would load with the wrong "
            "scaling. Save it with format='peft', which records each layer's rank and alpha."
        )
    return first.config


def _describe(module: nn.Module) -> dict:
    if not isinstance(module, nn.Linear):
        raise TypeError(f"Only nn.Linear modules can be saved with an adapter, got {type(module)}")
    return {
        "type": "Linear",
        "in_features": module.in_features,
        "out_features": module.out_features,
        "bias": module.bias is not None,
    }


def expected_adapter_tensors(model: nn.Module, config: dict) -> dict[str, tuple[int, ...]]:
    """The names and shapes of the tensors the adapter described by ``config`` has on
    ``model`` (whose layers are checked to exist by ``_check_base``)."""
    rank, shapes = as_rank(config["rank"]), {}
    for target in config["targets"]:
        in_dim, out_dim = layer_dims(unwrap(model.get_submodule(target)))
        pairs = [("A", "B"), ("A0", "B0")] if config["init"] == "olora" else [("A", "B")]
        for a, b in pairs:
            shapes[f"{target}.lora.{a}"] = (in_dim, rank)
            shapes[f"{target}.lora.{b}"] = (rank, out_dim)
    for name, module in config["modules_to_save"].items():
        shapes[f"{name}.weight"] = (module["out_features"], module["in_features"])
        if module["bias"]:
            shapes[f"{name}.bias"] = (module["out_features"],)
    return shapes


def _check_tensors(
    directory: Path, tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]
) -> None:
    """Raise AdapterMismatchError unless ``tensors`` are exactly the expected floating-point
    tensors with the expected shapes."""
    missing, extra = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected)
    if missing or extra:
        raise AdapterMismatchError(
            f"{display_path(directory)} does not hold the tensors its config describes: missing "
            f"{missing}, unexpected {extra}. The file is incomplete or from another adapter. "
            f"{REMEDY}"
        )
    shown = display_path(directory / WEIGHTS_FILE)
    for key, shape in expected.items():
        tensor = tensors[key]
        if tuple(tensor.shape) != shape:
            raise AdapterMismatchError(
                f"{shown}: {key} has shape {tuple(tensor.shape)}, the model expects {shape}. "
                f"{REMEDY}"
            )
        if not tensor.is_floating_point():
            raise AdapterMismatchError(
                f"{shown}: {key} has dtype {tensor.dtype}, expected a floating-point tensor. "
                f"{REMEDY}"
            )


def load_adapter(model: nn.Module, directory: str | Path, name: str = "default") -> nn.Module:
    """Add the adapter saved in ``directory`` to ``model`` as ``name`` and make it active.

    All or nothing: the config, the tensors (keys, shapes, dtypes, checksum) and the base
    (architecture, weights, target layers) are checked before the model is touched; any
    problem raises AdapterLoadError (AdapterMismatchError for another base; RuntimeError for a
    model with a merged adapter) and leaves the model exactly as it was. A Hugging Face PEFT
    adapter for GPT-2 is read by ``peft_format.load_peft_adapter``.
    """
    directory = Path(directory)
    check_new_adapter(model, name)
    check_unmerged(model)  # the new adapter would become active over merged weights
    if is_peft_adapter(directory):
        return load_peft_adapter(model, directory, name)
    config = read_adapter_config(directory)
    tensors = read_adapter_tensors(directory, config)
    _check_base(model, config, directory)
    _check_tensors(directory, tensors, expected_adapter_tensors(model, config))
    device = next(model.parameters()).device
    owned = {
        n: nn.Linear(d["in_features"], d["out_features"], bias=d["bias"], device=device)
        for n, d in config["modules_to_save"].items()
    }
    with all_or_nothing(model, name):
        _add_loaded(model, name, config, owned, directory)
        expected = lora_state_dict(model, name)
        for module_name, module in owned.items():
            expected |= {f"{module_name}.{k}": v for k, v in module.state_dict().items()}
        with torch.no_grad():
            for key, target in expected.items():
                target.copy_(tensors[key])
    return model


def _add_loaded(
    model: nn.Module, name: str, config: dict, owned: dict[str, nn.Module], directory: Path
) -> None:
    """Add the (still untrained) adapter ``config`` describes, as ``name``."""
    try:
        lora = LoRAConfig(
            config["rank"],
            config["alpha"],
            scaling=config["scaling_rule"],
            dropout=config["dropout"],
            init=config["init"],
            targets=tuple(re.escape(t) for t in config["targets"]),
        )
        add_adapter(model, name, lora, modules_to_save=owned)
    except ValueError as err:  # e.g. an OLoRA rank above a layer's size
        raise AdapterLoadError(f"{display_path(directory)}: {err} {REMEDY}") from err


def _check_base(model: nn.Module, config: dict, directory: Path) -> None:
    """Raise AdapterMismatchError unless ``model`` is the base the adapter was trained on."""
    shown = display_path(directory)
    stored, ours = config["base"]["architecture"], _architecture(model)
    diffs = [
        f"{k}: adapter's base {stored.get(k)} vs model {ours.get(k)}"
        for k in sorted(stored.keys() | ours.keys())
        if stored.get(k) != ours.get(k)
    ]
    if diffs:
        raise AdapterMismatchError(
            f"The adapter in {shown} was trained on another architecture: "
            f"{'; '.join(diffs)}. Load it onto the base it was trained on."
        )
    layers = {
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear | nn.Embedding | Linear4bit | LoRAWrapper)
    }
    missing = [t for t in config["targets"] if t not in layers]
    if missing:
        raise AdapterMismatchError(
            f"The model has no layers named {missing} (targets of the adapter in {shown})."
        )
    modules = dict(model.named_modules())
    if missing := [n for n in config["modules_to_save"] if n not in modules]:
        raise AdapterMismatchError(
            f"The model has no modules named {missing} (modules_to_save of {shown})."
        )
    fingerprint = base_fingerprint(model, exclude=config["modules_to_save"])
    if fingerprint != config["base"]["fingerprint"]:
        dtypes = sorted({str(p.dtype) for p in model.parameters()} - {str(torch.float32)})
        cast = f" The model holds {dtypes} weights: cast it after loading." if dtypes else ""
        raise AdapterMismatchError(
            "The model's weights differ from the base the adapter was trained on (fingerprint "
            f"{fingerprint[:12]}… vs {config['base']['fingerprint'][:12]}… of the adapter in "
            f"{shown}). Load the same base checkpoint the adapter was trained on.{cast}"
        )
