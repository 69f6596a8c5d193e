"""The prose quotes only numbers its outputs print: a percentage, ratio, size, duration, count or
loss in a markdown cell must appear in the same notebook's outputs, unless the cell marks it as
cited, defined or quoted from another notebook (tools/prose.py says how)."""

import re
from pathlib import Path

import nbformat
import pytest

from tools import prose, run_all

ROOT = Path(__file__).resolve().parents[1]
PATHS = run_all.notebook_paths()


def notebook(markdown: str, printed: str) -> nbformat.NotebookNode:
    """A notebook of one markdown cell and one code cell that prints ``printed``."""
    code = nbformat.v4.new_code_cell("report()")
    code.outputs = [nbformat.v4.new_output("stream", name="stdout", text=printed)]
    return nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(markdown), code])


def flagged(nb: nbformat.NotebookNode, folder: Path = prose.NOTEBOOKS) -> list[str]:
    return [f.number for f in prose.unprinted(nb, folder)]


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_prose_quotes_only_printed_numbers(path):
    flags = prose.unprinted(nbformat.read(path, as_version=4))
    lines = [f"cell {f.cell}: {f.text!r} in {f.snippet!r} ({f.reason})" for f in flags]
    assert not flags, (
        f"{path.relative_to(ROOT)} quotes numbers its outputs do not print:\n  "
        + "\n  ".join(lines)
        + "\nquote the printed number, or mark the cell: <!-- cited: ... -->, "
        "<!-- defined: ... --> or <!-- from NN: ... --> (see tools/prose.py)"
    )


def test_a_quoted_number_that_is_printed_passes():
    nb = notebook("LoRA reaches 96.0 % accuracy, loss 0.413, in 37 s.", "acc 96.0%  loss 0.413\n")
    nb.cells[1].outputs.append(nbformat.v4.new_output("stream", name="stderr", text="took 37 s"))
    assert flagged(nb) == []


def test_a_bare_integer_counts_as_printed_only_with_its_unit():
    markdown = "It is 8x faster, 2 % larger, keeps 4 bytes and 12 MiB, and takes 36 s."
    assert flagged(notebook(markdown, "layers 8, heads 2, 4 and 12, batch 36\n")) == [
        "8",
        "2",
        "4",
        "12",
        "36",
    ]
    assert flagged(notebook(markdown, "8× | 2% | 4 bytes | 12 MiB | 36s\n")) == []
    assert flagged(notebook(markdown, "8 times, 2 percent, 4 B, 12MiB, 36 seconds")) == []
    assert flagged(notebook(markdown, "8x, 2%, 4 bytes, 12 GiB, 36 ms")) == ["12", "36"]


def test_decimals_and_separated_counts_count_as_printed_without_their_unit():
    markdown = "It is 7.6x faster, reaches 96.0 %, trains 7,241 weights in 1,024 s."
    assert flagged(notebook(markdown, "| 7.6 | 96.0 | 7,241 | 1,024 |\n")) == []


def test_a_from_marker_checks_a_bare_integer_with_its_unit(tmp_path):
    nbformat.write(notebook("", "8 layers, 2.0x, 3x"), tmp_path / "06_spam.ipynb")
    quoted = "Notebook 06 was 8x and 3x faster.\n<!-- from 06: 8x, 3x -->"
    assert [f.text for f in prose.unprinted(notebook(quoted, ""), tmp_path)] == ["8 x"]


def test_a_contradiction_is_flagged():
    nb = notebook("LoRA reaches 95.0 % accuracy.", "test accuracy: 96.0%\n")
    assert flagged(nb) == ["95.0"]
    (flag,) = prose.unprinted(nb)
    assert flag.cell == 0 and flag.text == "95.0 %" and "LoRA reaches 95.0 %" in flag.snippet


def test_a_number_inside_a_longer_printed_number_is_flagged():
    nb = notebook("It trains 241,346 weights, 96 % of them, loss 0.41.", "7,241,346 96.04% 0.413")
    assert flagged(nb) == ["241,346", "96", "0.41"]


def test_a_changed_number_in_a_real_notebook_is_flagged():
    nb = nbformat.read(ROOT / "notebooks" / "07_parameter_counts.ipynb", as_version=4)
    printed, before = prose.printed_text(nb), [(f.cell, f.number) for f in prose.unprinted(nb)]
    index, claim = next(
        (i, c)
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "markdown"
        for c in prose.claims(cell.source)
        if len(c.number) > 2
        and prose.is_printed(c.number, printed, c.unit)
        and not prose.markers(cell.source)
    )  # e.g. 110 MiB
    wrong = next(
        claim.number[:-1] + digit
        for digit in "0123456789"
        if not prose.is_printed(claim.number[:-1] + digit, printed)
    )
    source = nb.cells[index].source
    nb.cells[index].source = source[: claim.start] + wrong + source[claim.end :]

    after = [(f.cell, f.number) for f in prose.unprinted(nb)]

    assert [flag for flag in after if flag not in before] == [(index, wrong)]


def test_cited_and_defined_markers_exempt_their_numbers_in_their_cell_only():
    markdown = (
        "The book reports 98.00 % and AdamW keeps 8 bytes per weight, 50,257 tokens.\n"
        "<!-- cited: 98.00 % (appendix E of LLMs from scratch, 2024) -->\n"
        "<!-- defined: 8 bytes, 50,257 -->"
    )
    nb = notebook(markdown, "nothing to see")
    assert flagged(nb) == []
    assert [m.kind for m in prose.markers(markdown)] == ["cited", "defined"]
    assert prose.markers(markdown)[0].numbers == ("98.00",)  # the parenthesis is a note

    nb.cells.append(nbformat.v4.new_markdown_cell("Again: 98.00 % and 8 bytes."))
    assert [(f.cell, f.number) for f in prose.unprinted(nb)] == [(2, "98.00"), (2, "8")]


def test_a_from_marker_is_checked_against_that_notebook(tmp_path):
    (tmp_path / "solutions").mkdir()
    nbformat.write(notebook("", "accuracy 96.0%, 7,241,346 params"), tmp_path / "06_spam.ipynb")
    solutions = tmp_path / "solutions" / "06_spam_solutions.ipynb"
    nbformat.write(notebook("", "rank 8: 0.236"), solutions)
    quoted = "Notebook 06 reached 96.0 % with 7,241,346 parameters, loss 0.236."
    markers = "<!-- from 06: 96.0 %, 7,241,346 -->\n<!-- from 06s: 0.236 -->"

    assert flagged(notebook(f"{quoted}\n{markers}", "here: nothing"), tmp_path) == []

    wrong = notebook("It reached 95.0 %.\n<!-- from 06: 95.0 % -->", "here: 95.0")
    (flag,) = prose.unprinted(wrong, tmp_path)
    assert flag.number == "95.0" and "from 06" in flag.reason
    missing = notebook("It reached 95.0 %.\n<!-- from 11: 95.0 % -->", "")
    assert "no notebook 11" in prose.unprinted(missing, tmp_path)[0].reason


def test_numbers_in_code_latex_links_and_comments_are_not_read():
    markdown = (
        "Run `train(lr=0.001, steps=1,000)` for 12 s. $$ 0.75 \\times 8x $$ and $r = 0.25$,\n"
        "```python\nprint(f'{96.5:.1f} %')\n```\n<!-- 3.14 GiB, a note -->\n"
        "[the paper](https://arxiv.org/abs/2106.09685v2.5) (arXiv 2406.01775), "
        "<img src='a.png' width='1,000'>, Python 3.11.2."
    )
    assert [(c.number, c.kind) for c in prose.claims(markdown)] == [("12", "duration")]


@pytest.mark.parametrize(
    ("markdown", "numbers", "kind"),
    [
        ("from 95.7–96.0 % to 96.0%, 50 percent", ["95.7", "96.0", "96.0", "50"], "percentage"),
        ("8x faster, 7.6× smaller, 1.5–2 times slower", ["8", "7.6", "1.5", "2"], "ratio"),
        ("3.64 MiB, 2 GB, 12 bytes, 0.5 KiB", ["3.64", "2", "12", "0.5"], "size"),
        ("37 s, 120 ms, 12.3 min, 2 hours, 5 minutes", ["37", "120", "12.3", "2", "5"], "duration"),
        ("7,241,346 parameters, 50,257 tokens", ["7,241,346", "50,257"], "count"),
        ("a loss of 6.233, then 0.41", ["6.233", "0.41"], "decimal"),
        ("logits within 9.5e-07, then 1.2e+03", ["9.5e-07", "1.2e+03"], "decimal"),
        ("a learning rate of 1e-3 (a setting, not a measurement)", [], None),
        ("rank 16, GPT-2 124M, the 1590s, 2024, a 768 × 768 matrix, 0.5, 8x8", [], None),
    ],
)
def test_what_is_read_as_a_measured_number(markdown, numbers, kind):
    found = prose.claims(markdown)
    assert [c.number for c in found] == numbers
    assert {c.kind for c in found} <= {kind}


def test_the_command_prints_every_flag_with_its_notebook_and_cell(tmp_path, capsys):
    path = tmp_path / "99_demo.ipynb"
    nbformat.write(notebook("# Demo\n\nThe run took 41 s and 2.5 GiB.", "took 41 s"), path)

    assert prose.main([str(path)]) == 1

    out = capsys.readouterr().out
    assert re.search(r"99_demo\.ipynb\s+cell  0\s+'2\.5 GiB'\s+'.*took 41 s and 2\.5 GiB", out)
    assert "41 s'" not in out  # printed by the notebook
    assert re.search(r"^\s+1\s+\S*99_demo\.ipynb$", out, re.MULTILINE)
