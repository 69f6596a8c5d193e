"""pytest runs the notebooks in quick mode unless LORA_QUICK is set explicitly, and each one cold.

This runs before any notebook kernel starts, and kernels inherit the environment.
"""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("LORA_QUICK", "1")
FRESH = Path(tempfile.mkdtemp(prefix="lora-artifacts-"))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Give every notebook an empty artifacts folder of its own, as a student opening it first
    would have: nbval starts a notebook's kernel (which inherits this environment) when its
    first cell is set up, so each notebook must rebuild what it needs, and runs only once."""
    path = Path(str(item.fspath))
    if path.suffix == ".ipynb" and not (FRESH / path.stem).exists():
        (FRESH / path.stem).mkdir()
        os.environ["LORA_ARTIFACTS_DIR"] = str(FRESH / path.stem)


def pytest_sessionfinish(session):
    shutil.rmtree(FRESH, ignore_errors=True)
