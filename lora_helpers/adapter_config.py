"""What an adapter folder holds and the checks a loaded one must pass (notebook 08): the file
names, ``adapter_config.json``'s fields and their types, and the checksum over the tensors and
every field, so that a changed byte or a field edited by hand is refused, naming the file."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from .downloads import sha256_of
from .lora import LoRAConfig, lora_scaling
from .settings import display_path

ADAPTER_FORMAT = "lora_helpers.adapter.v1"
WEIGHTS_FILE, CONFIG_FILE = "adapter.safetensors", "adapter_config.json"


class AdapterLoadError(RuntimeError):
    """An adapter cannot be loaded (files missing, corrupt or malformed, or made for another
    model); the model was left exactly as it was."""


class AdapterMismatchError(AdapterLoadError):
    """An adapter file does not fit the model it is loaded onto."""


def adapter_sha256(weights: str | Path, config: dict) -> str:
    """sha256 over the tensor file and every field of the config but its checksums: a changed
    byte, or a field such as ``alpha`` edited by hand, changes it."""
    fields = {k: v for k, v in config.items() if k not in CHECKSUMS}
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{sha256_of(weights)}\n{text}".encode()).hexdigest()


# Required fields of adapter_config.json and the JSON types they must have.
CONFIG_FIELDS = {
    "rank": int,
    "alpha": (int, float),
    "scaling_rule": str,
    "dropout": (int, float),
    "init": str,
    "targets": list,
    "modules_to_save": dict,
    "base": dict,
}
REMEDY = "Save the adapter again with save_adapter(), or restore the folder from a copy."
# The checksums a config may record: of the tensors and the config's fields (``sha256``), or,
# in adapters saved before it was recorded, of the tensor file alone (``weights_sha256``).
CHECKSUMS = ("sha256", "weights_sha256")


def read_adapter_config(directory: str | Path) -> dict:
    """The JSON config of a saved adapter, every field checked (AdapterLoadError otherwise)."""
    path = Path(directory) / CONFIG_FILE
    if not path.exists():
        raise AdapterLoadError(
            f"No adapter at {display_path(directory)}: {display_path(path)} is missing. "
            "Pass the folder save_adapter() wrote."
        )
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterLoadError(f"{display_path(path)} is not valid JSON ({err}). {REMEDY}") from err
    if not isinstance(config, dict) or config.get("format") != ADAPTER_FORMAT:
        raise AdapterLoadError(
            f"{display_path(path)} is not a lora_helpers adapter ({ADAPTER_FORMAT})."
        )
    problems = [
        f"{key!r} is missing"
        if key not in config
        else f"{key!r} must be {_json_type(kind)}, got {config[key]!r}"
        for key, kind in CONFIG_FIELDS.items()
        if key not in config or not _is(config[key], kind)
    ]
    problems += _base_problems(config.get("base"))
    if not problems:
        problems += _value_problems(config)
    if problems:
        raise AdapterLoadError(
            f"{display_path(path)} is malformed: {'; '.join(problems)}. {REMEDY}"
        )
    return config


def _is(value, kind) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)


def _json_type(kind) -> str:
    names = {int: "an integer", float: "a number", str: "a string", list: "a list"}
    return names.get(kind, "a number" if kind == (int, float) else "an object")


def _base_problems(base) -> list[str]:
    if not isinstance(base, dict):
        return []
    problems = []
    if not isinstance(base.get("architecture"), dict):
        problems.append("'base.architecture' must be an object")
    if not isinstance(base.get("fingerprint"), str):
        problems.append("'base.fingerprint' must be a string")
    return problems


def _value_problems(config: dict) -> list[str]:
    """What is wrong with the values of a config whose fields have the right types."""
    problems = []
    try:  # the layer sizes are not known here: add_adapter checks the rank against them
        LoRAConfig(
            rank=config["rank"], alpha=config["alpha"], scaling=config["scaling_rule"],
            dropout=config["dropout"], init=config["init"],
        )  # fmt: skip
    except ValueError as err:
        problems.append(str(err).rstrip("."))
    if not problems:
        problems += _scaling_problems(config)
    if not config["targets"] or not all(isinstance(t, str) for t in config["targets"]):
        problems.append("'targets' must be a non-empty list of layer names")
    for name, module in config["modules_to_save"].items():
        fields_ok = isinstance(module, dict) and all(
            _is(module.get(k), int) for k in ("in_features", "out_features")
        )
        if not fields_ok or not isinstance(module.get("bias"), bool):
            problems.append(
                f"modules_to_save[{name!r}] must give in_features, out_features and bias"
            )
    for key in CHECKSUMS:
        sha = config.get(key)
        if sha is not None and not (isinstance(sha, str) and re.fullmatch("[0-9a-f]{64}", sha)):
            problems.append(f"{key!r} must be 64 hex digits, got {sha!r}")
    return problems


def _scaling_problems(config: dict) -> list[str]:
    """The recorded ``scaling`` must follow from alpha, rank and scaling_rule: a check that
    also covers adapters saved before the config's fields had a checksum."""
    scaling = config.get("scaling")
    implied = lora_scaling(config["alpha"], config["rank"], config["scaling_rule"])
    if scaling is None or (_is(scaling, (int, float)) and math.isclose(scaling, implied)):
        return []
    return [
        f"'scaling' is {scaling!r}, but alpha {config['alpha']}, rank {config['rank']} and "
        f"scaling_rule {config['scaling_rule']!r} give {implied} (a field edited by hand?)"
    ]


def read_adapter_tensors(directory: str | Path, config: dict) -> dict[str, torch.Tensor]:
    """The adapter's tensors, checked against the sha256 its config records."""
    path = Path(directory) / WEIGHTS_FILE
    if not path.exists():
        raise AdapterLoadError(
            f"{display_path(path)} is missing: {display_path(directory)} holds the adapter's "
            f"config but not its tensors. Copy the whole folder. {REMEDY}"
        )
    expected = config.get("sha256")
    if expected is not None and (actual := adapter_sha256(path, config)) != expected:
        raise AdapterLoadError(
            f"{display_path(path)} or its {CONFIG_FILE} changed after save_adapter() wrote them: "
            f"their sha256 is {actual[:12]}…, {CONFIG_FILE} records {expected[:12]}… (a changed, "
            f"truncated or replaced tensor file, or a field such as alpha edited by hand). {REMEDY}"
        )
    legacy = config.get("weights_sha256")  # adapters saved before "sha256" was recorded
    if expected is None and legacy is not None and (actual := sha256_of(path)) != legacy:
        raise AdapterLoadError(
            f"{display_path(path)} is corrupt: its sha256 is {actual[:12]}…, {CONFIG_FILE} records "
            f"{legacy[:12]}… (a changed, truncated or replaced file). {REMEDY}"
        )
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for bad files
        raise AdapterLoadError(
            f"{display_path(path)} is not a readable safetensors file ({err}). {REMEDY}"
        ) from err
