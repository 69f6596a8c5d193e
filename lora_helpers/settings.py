"""The few switches and folders every notebook shares, read from environment variables.

- ``LORA_QUICK=1``: shrink models, data and steps so every notebook runs in seconds on a CPU
  (this is how CI executes the notebooks). Anything else, or unset, means full mode.
- ``LORA_DATA_DIR``: where downloaded datasets live (default ``<project>/data``). Point it at a
  pre-filled offline copy and nothing is downloaded; files are still sha256-verified.
- ``LORA_ARTIFACTS_DIR``: where checkpoints and the saved data split go
  (default ``<project>/artifacts``; quick mode uses its ``quick/`` subfolder).
"""

from __future__ import annotations

import os
from pathlib import Path


def is_quick() -> bool:
    """True when ``LORA_QUICK=1``: notebooks then use tiny models and a few steps."""
    return os.environ.get("LORA_QUICK", "0").strip() == "1"


def project_dir() -> Path:
    """The collection's root: the nearest folder (cwd or a parent) holding ``notebooks/``
    and ``lora_helpers/``; otherwise the current folder (e.g. ``/content`` on Colab)."""
    cwd = Path.cwd().resolve()
    for folder in (cwd, *cwd.parents):
        if (folder / "notebooks").is_dir() and (folder / "lora_helpers").is_dir():
            return folder
    return cwd


def data_dir() -> Path:
    """Folder for downloaded raw data (may be a read-only offline copy)."""
    env = os.environ.get("LORA_DATA_DIR")
    return Path(env).expanduser().resolve() if env else project_dir() / "data"


def artifacts_dir() -> Path:
    """Folder for things the notebooks make and share: checkpoints, the saved data split."""
    env = os.environ.get("LORA_ARTIFACTS_DIR")
    root = Path(env).expanduser().resolve() if env else project_dir() / "artifacts"
    folder = root / "quick" if is_quick() else root
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def images_dir() -> Path:
    """Folder for saved figures: ``<project>/images`` (``images/quick`` in quick mode, which
    git ignores, so a CI-sized run never overwrites the committed figures)."""
    folder = project_dir() / "images"
    folder = folder / "quick" if is_quick() else folder
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def display_path(path: Path) -> str:
    """``path`` relative to the project folder when it lies inside it (as printed in the
    notebooks' outputs, which should not show where one person's copy lives), else in full."""
    path, root = Path(path).resolve(), project_dir()
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
