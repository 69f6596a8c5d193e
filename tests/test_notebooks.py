"""The collection as a whole: badges, setup cells, exercises and solutions, run_all's stamps and
the README's timing table. (nbval executes every notebook once, each cold: see conftest.py.)"""

import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from tools import colab, run_all

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
SOLUTIONS = sorted((ROOT / "notebooks" / "solutions").glob("*.ipynb"))


def ids(paths):
    return [p.stem for p in paths]


@pytest.mark.parametrize("path", NOTEBOOKS + SOLUTIONS, ids=ids(NOTEBOOKS + SOLUTIONS))
def test_badge_points_at_its_own_notebook_and_setup_cell_is_current(path):
    nb = nbformat.read(path, as_version=4)
    links = re.findall(r"\(https://colab\.research\.google\.com/github/[^)]+\)", nb.cells[0].source)
    assert links == [f"({colab.colab_url(path)})"]
    assert nb.cells[1].source == colab.setup_cell()


def test_readme_lists_every_notebook_with_its_own_badge():
    readme = (ROOT / "README.md").read_text()
    for path in NOTEBOOKS:
        link = path.relative_to(ROOT).as_posix()
        assert f"]({link}) {colab.badge(path)}" in readme, f"README row for {path.name}"
    assert colab.main(["--check"]) == 0


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids(NOTEBOOKS))
def test_each_notebook_has_exercises_and_worked_solutions(path):
    nb = nbformat.read(path, as_version=4)
    assert "**Exercises**" in nb.cells[-1].source
    assert (ROOT / "notebooks" / "solutions" / f"{path.stem}_solutions.ipynb").exists()


def test_run_all_keeps_the_executed_copy_of_a_failing_notebook(tmp_path):
    cells = [nbformat.v4.new_code_cell("print('first cell ran')"), nbformat.v4.new_code_cell("1/0")]
    path = tmp_path / "broken.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=cells), path)
    out = tmp_path / "executed" / "broken.ipynb"

    seconds, error = run_all.run_notebook(path, out, timeout=60)

    assert seconds > 0 and "ZeroDivisionError" in error
    executed = nbformat.read(out, as_version=4)
    assert executed.metadata[run_all.STAMP]["mode"] == "full, failed"
    assert executed.metadata[run_all.STAMP]["seconds"] == round(seconds, 1)
    assert executed.cells[0].outputs[0]["text"] == "first cell ran\n"
    assert executed.cells[1].outputs[0]["ename"] == "ZeroDivisionError"


@pytest.mark.parametrize("path", NOTEBOOKS + SOLUTIONS, ids=ids(NOTEBOOKS + SOLUTIONS))
def test_committed_outputs_come_from_a_full_mode_run(path):
    """Every committed notebook was executed by tools.run_all in full mode, without error."""
    info = nbformat.read(path, as_version=4).metadata.get(run_all.STAMP)
    assert info is not None, f"{path.name} has no run_all stamp: run python -m tools.run_all"
    assert info["mode"] == "full", f"{path.name} was executed in {info['mode']} mode"
    assert {"device", "torch", "seconds", "date"} <= info.keys()


def test_readme_timing_table_is_made_from_the_stamps():
    readme = (ROOT / "README.md").read_text()
    start = readme.index(run_all.TABLE_START) + len(run_all.TABLE_START)
    table = readme[start : readme.index(run_all.TABLE_END)]
    assert table.strip() == run_all.timing_table(), "run: python -m tools.run_all --table"


@pytest.mark.parametrize("tool", ["run_all", "colab", "prose"])
@pytest.mark.parametrize("style", ["module", "script"])
def test_tools_run_as_modules_and_as_scripts(tool, style):
    """``python -m tools.run_all`` like ``benchmarks/``; ``python tools/run_all.py`` as before."""
    command = ["-m", f"tools.{tool}"] if style == "module" else [f"tools/{tool}.py"]
    done = subprocess.run(
        [sys.executable, *command, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout
