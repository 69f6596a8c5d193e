"""The package as a whole: every module of lora_helpers is listed, with one line, in the package
docstring and in the module table of lora_helpers/README.md."""

import re
from pathlib import Path

import lora_helpers

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(p.stem for p in (ROOT / "lora_helpers").glob("*.py") if p.stem != "__init__")


def test_the_package_docstring_lists_every_module():
    listed = re.findall(r"^- ``(\w+)``: ", lora_helpers.__doc__, re.MULTILINE)
    missing = sorted(set(MODULES) - set(listed))
    assert not missing, f"add a line for {missing} to lora_helpers/__init__.py"
    assert len(listed) == len(set(listed)), "a module is listed twice"


def test_the_package_readme_module_table_lists_every_module():
    readme = (ROOT / "lora_helpers" / "README.md").read_text()
    section = readme.split("## What each module holds", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\| `lora_helpers\.(\w+)` \| ", section, re.MULTILINE)
    missing = sorted(set(MODULES) - set(listed))
    assert not missing, f"add a row for {missing} to lora_helpers/README.md's module table"
    assert len(listed) == len(set(listed)), "a module has two rows"
