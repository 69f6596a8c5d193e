"""What a reader sees in the committed outputs (on GitHub, without widgets): progress bars at
their last frame, no object reprs, no paths of the machine that ran them, no warnings."""

import functools
import re
from pathlib import Path

import nbformat
import pytest

from tools import run_all
from tools.prose import output_texts

ROOT = Path(__file__).resolve().parents[1]
PATHS = run_all.notebook_paths()
RERUN = "then re-run it: python -m tools.run_all --solutions --only {stem}"
REDRAW = "redraw it: python -m tools.run_all --finalize --solutions --only {stem}"
FROZEN_BAR = re.compile(r".*(?<![\d.])0%\|.*")  # 0%| but not 100%|
OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-f]+>")
LOCAL_PATH = re.compile(r"/root/|/work/|/home/|/Users/|/tmp/|site-packages|\.venv")


@functools.cache
def texts(path: Path) -> list[tuple[int, str, str]]:
    """(cell index, output kind, text) of every committed output of the notebook at ``path``."""
    return list(output_texts(nbformat.read(path, as_version=4)))


def offenders(path: Path, pattern: re.Pattern, kinds: tuple[str, ...] = ()) -> list[str]:
    """'cell N (kind): text' for each output text (of ``kinds``, if given) matching ``pattern``."""
    found = []
    for cell, kind, text in texts(path):
        if not kinds or kind in kinds:
            found += [f"cell {cell} ({kind}): {m.group()!r}" for m in pattern.finditer(text)]
    return found


def message(path: Path, found: list[str], fix: str, then: str = RERUN) -> str:
    """A failure message naming the notebook, each offending cell and text, and the fix."""
    name = path.relative_to(ROOT).as_posix()
    command = then.format(stem=path.stem.removesuffix("_solutions"))
    return f"{name}:\n  " + "\n  ".join(found) + f"\n{fix}; {command}"


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_no_frozen_progress_bar(path):
    found = offenders(path, FROZEN_BAR)
    fix = "a progress bar shows its first frame (0%), not its last"
    assert not found, message(path, found, fix, then=REDRAW)


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_no_object_repr(path):
    found = offenders(path, OBJECT_REPR)
    fix = "a cell ends in a call whose result is an object: end it with ';' or assign the result"
    assert not found, message(path, found, fix)


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_no_local_path(path):
    found = offenders(path, re.compile(rf".{{0,40}}(?:{LOCAL_PATH.pattern})\S*"))
    fix = "an output shows a path of the machine that ran it: print paths relative to the notebook"
    assert not found, message(path, found, fix)


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_no_warning_on_stderr(path):
    found = offenders(path, re.compile(r".*Warning.*"), kinds=("stderr",))
    fix = "a warning reached stderr: fix its cause, or silence it where the notebook explains why"
    assert not found, message(path, found, fix)


def bar_widget(left: str, value: float, maximum: float, right: str) -> tuple[dict, dict]:
    """A display output of a tqdm bar, showing its first frame, and the widget state that
    holds its last frame (labels as tqdm.notebook writes them: HTML, figure spaces)."""
    models = {
        "box": ("HBoxModel", {"children": ["IPY_MODEL_left", "IPY_MODEL_bar", "IPY_MODEL_right"]}),
        "left": ("HTMLModel", {"value": left}),
        "bar": ("FloatProgressModel", {"value": value, "max": maximum, "bar_style": "success"}),
        "right": ("HTMLModel", {"value": right}),
    }
    state = {key: {"model_name": name, "state": st} for key, (name, st) in models.items()}
    view = {"model_id": "box", "version_major": 2, "version_minor": 0}
    first = "training:   0%|          | 0/650 [00:00<?, ?it/s]"
    data = {run_all.WIDGET_VIEW: view, "text/plain": first}
    return nbformat.v4.new_output("display_data", data=data), state


def test_finalize_progress_bars_draws_the_last_frame_and_keeps_the_widget():
    right = "\u2007650/650\u2007[00:37&lt;00:00,\u2007\u20074.87it/s,\u2007train=0.000,"
    right += "\u2007val=0.236]"
    output, state = bar_widget("training:\u2007100%", 650.0, 650.0, right)
    other = nbformat.v4.new_output("display_data", data={"text/plain": "<Figure>"})
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("train()")])
    nb.cells[0].outputs = [output, other]
    nb.metadata["widgets"] = {run_all.WIDGET_STATE: {"state": state}}

    assert run_all.finalize_progress_bars(nb) == 1
    assert run_all.finalize_progress_bars(nb) == 0  # already drawn

    expected = "training: 100%|██████████| 650/650 [00:37<00:00,  4.87it/s, train=0.000, val=0.236]"
    assert nb.cells[0].outputs[0].data["text/plain"] == expected
    assert nb.cells[0].outputs[0].data[run_all.WIDGET_VIEW]["model_id"] == "box"
    assert nb.cells[0].outputs[1].data["text/plain"] == "<Figure>"
    nbformat.validate(nb)


def test_a_bar_stopped_half_way_is_drawn_half_full():
    right = "\u2007325/650\u2007[00:18&lt;00:18]"
    _, state = bar_widget("training:\u2007\u200750%", 325.0, 650.0, right)

    text = run_all.progress_bar_text(state, "box")

    assert text == "training:  50%|█████     | 325/650 [00:18<00:18]"
    assert run_all.progress_bar_text(state, "left") is None  # not a bar


def test_run_notebook_writes_the_bars_last_frame(tmp_path):
    code = "from tqdm.auto import tqdm\nfor _ in tqdm(range(3), desc='steps'):\n    pass"
    path = tmp_path / "bar.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)]), path)

    run_all.run_notebook(path, path, timeout=60)

    (output,) = nbformat.read(path, as_version=4).cells[0].outputs
    assert output.data["text/plain"].startswith("steps: 100%|██████████| 3/3 [00:00<00:00")
    assert run_all.WIDGET_VIEW in output.data
