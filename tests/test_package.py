"""The package as a whole: every module of lora_helpers is listed, with one line, in the package
docstring and in the module table of lora_helpers/README.md; the table "Bad inputs and what you
see" in tests/README.md counts its rows and names tests that exist."""

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


def test_the_bad_inputs_table_counts_its_rows_and_names_tests_that_exist():
    root = Path(__file__).parents[1]
    section = (root / "tests" / "README.md").read_text().split("## Bad inputs and what you see")[1]
    section = section.split("\n## ")[0]
    rows = re.findall(r"^\| (\d+) \|", section, flags=re.M)
    assert rows == [str(i) for i in range(1, len(rows) + 1)]
    assert f"**{len(rows)} rows**" in section
    named = re.findall(r"`(tests/test_\w+\.py)::(test_\w+)`", section)
    missing = [f"{f}::{t}" for f, t in named if f"def {t}(" not in (root / f).read_text()]
    assert named and not missing
