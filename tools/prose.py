"""Numbers a notebook's prose quotes that none of its outputs print (a stale or mistyped result).

    python -m tools.prose                                   # every notebook and solution
    python -m tools.prose notebooks/07_parameter_counts.ipynb

A markdown cell's measured numbers must each appear, as a whole number, in some output of the
same notebook (stream, plain text of a result or display, progress bar, error); a bare integer
(no decimal point, no thousands separator: ``2 %``, ``8x``, ``36 s``) must appear with its unit
(``2%``, ``8×``, ``36s``), as small integers occur by chance in nearly any output. Read as
measured: percentages (``96.0 %``, both ends of ``95.7–96.0 %``), ratios (``8x``, ``7.6×``,
``1.5–2 times``), sizes (``KiB`` ... ``GB``, ``bytes``), durations (``ms``, ``s``, ``min``,
``seconds``, ``minutes``, ``hours``), counts with thousands separators (``7,241,346``) and
decimals with two or more places (``0.413``). Inline code, fenced code, LaTeX, URLs, link
targets and HTML comments are not read. An HTML comment in the cell (invisible to readers)
exempts the numbers it lists, in that cell only:

    <!-- cited: 98.00 % (appendix E of LLMs from scratch) -->   an outside source
    <!-- defined: 12 bytes, 50,257 -->                          a definition or a setting
    <!-- from 06: 96.0 %, 7,241,346 -->                         notebook 06's outputs print it

``from 06`` numbers are checked against notebooks/06_*.ipynb (``from 06s``: its solutions).
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nbformat

if not __package__:  # run as ``python tools/prose.py``: make ``tools`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.run_all import ROOT, WIDGET_STATE, WIDGET_VIEW, notebook_paths, progress_bar_text  # noqa: E402

NOTEBOOKS = ROOT / "notebooks"
NUMBER = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?(?:e[-+]\d+)?"  # and 9.5e-07
SPACES = " \u00a0\u202f\u2009"
SPACE = rf"[{SPACES}]?"
UNITS = {
    "percentage": rf"{SPACE}(?:%|percent\b)",
    "ratio": rf"(?:x|{SPACE}(?:×|times\b))(?!\w)",
    "size": rf"{SPACE}(?:[KMGT]i?B|kB|bytes?)\b",
    "duration": rf"{SPACE}(?:ms|µs|sec|mins?|seconds?|minutes?|hours?)\b"
    rf"|(?<!\d{{3}}0){SPACE}s\b",  # not a decade: 1590s
}
UNIT = re.compile("|".join(f"(?P<{kind}>{unit})" for kind, unit in UNITS.items()))
SAME_UNIT = [  # the spellings of one unit, as prose or an output may write it after a number
    r"%|percent\b",
    r"(?<=\d)x(?!\w)|×|times\b",  # 8x, 8×, 8 ×, 8 times; not 8 x 8
    r"bytes?\b|B\b",
    r"[kK]B\b",
    r"ms\b",
    r"µs|us\b",
    r"s\b|secs?\b|seconds?\b",
    r"mins?\b|minutes?\b",
    r"h\b|hrs?\b|hours?\b",
]
DIMENSION = re.compile(r"\s*(?:\d|[A-Za-z]\b|\$)")  # 768 × 768, 50,257 × r: a shape, no ratio
RANGE = re.compile(rf"{SPACE}(?:–|—|-|to){SPACE}(?:{NUMBER})(?!\d)")
PROSE_NUMBER = re.compile(rf"(?<![\w.])(?:{NUMBER})(?!\d|\.\d)")  # not in versions: 2.4.1
HIDDEN = [  # what a reader does not see as prose, in the order it is masked
    r"^[ \t]*(```|~~~).*?^[ \t]*\1",  # fenced code
    r"<!--.*?-->",  # HTML comments, the markers among them
    r"(`+).+?\2",  # inline code
    r"(?<!\\)\$\$.+?\$\$",  # display LaTeX
    r"(?<!\\)\$[^$]+?(?<!\\)\$",  # inline LaTeX
    r"\]\([^)]*\)|^[ \t]*\[[^\]]+\]:.*?$",  # link targets
    r"(?:https?://|www\.)\S+",  # bare URLs
    r"arXiv:?\s*\d{4}\.\d{4,5}",  # arXiv identifiers
    r"</?[A-Za-z][^>]*>",  # HTML tags
]
HIDDEN_RE = re.compile("|".join(f"(?:{p})" for p in HIDDEN), re.DOTALL | re.MULTILINE)
MARKER = re.compile(r"<!--\s*(cited|defined|from\s+(\d\d)(s?))\s*:(.*?)-->", re.DOTALL)
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclass(frozen=True)
class Claim:
    """A measured number in prose: the number, as written with its unit, and where it is."""

    number: str
    text: str
    kind: str
    start: int
    end: int
    unit: str = ""


@dataclass(frozen=True)
class Marker:
    """An HTML comment that exempts ``numbers``: cited, defined or from notebook ``ref``."""

    kind: str
    numbers: tuple[str, ...]
    ref: str | None = None
    units: tuple[str, ...] = ()  # each number's unit as the marker writes it ("" if none)


@dataclass(frozen=True)
class Flag:
    """A quoted number no output prints, with the cell it is in and why it is flagged."""

    cell: int
    number: str
    text: str
    snippet: str
    reason: str


def masked(markdown: str) -> str:
    """The markdown with code, LaTeX, comments, URLs and tags blanked out, same length."""
    return HIDDEN_RE.sub(lambda m: re.sub(r"\S", " ", m.group()), markdown)


def _kind(text: str, markdown: str, token: re.Match) -> tuple[str, int, str] | None:
    """What a number token of the masked ``text`` claims, where its claim ends and its unit,
    judged by what follows it (``markdown`` is the text unmasked, to tell a shape from a
    ratio)."""
    rest = token.end()
    unit = UNIT.match(text, rest)
    if unit is None and (span := RANGE.match(text, rest)):  # first end of a range
        unit = UNIT.match(text, span.end())
    if unit is not None and "×" in unit.group() and DIMENSION.match(markdown, unit.end()):
        unit = None
    if unit is not None:
        return unit.lastgroup, unit.end(), unit.group().strip(SPACES)
    number = token.group()
    if "," in number:
        return "count", rest, ""
    if len(number.partition(".")[2]) >= 2 or ("." in number and "e" in number):  # 9.5e-07
        return "decimal", rest, ""
    return None


def claims(markdown: str) -> list[Claim]:
    """The measured numbers a markdown cell quotes, in order (see the module's docstring)."""
    text = masked(markdown)
    found = []
    for token in PROSE_NUMBER.finditer(text):
        judged = _kind(text, markdown, token)
        if judged is not None:
            kind, end, unit = judged
            written = markdown[token.start() : end]
            found.append(Claim(token.group(), written, kind, *token.span(), unit=unit))
    return found


def markers(markdown: str) -> list[Marker]:
    """The cited, defined and ``from NN`` markers of a markdown cell, with the numbers they
    list (a parenthesis in a marker is a note, not numbers)."""
    found = []
    for m in MARKER.finditer(markdown):
        listed = re.sub(r"\([^)]*\)", " ", m.group(4))
        tokens = list(re.finditer(NUMBER, listed))
        units = tuple(
            u.group().strip(SPACES) if (u := UNIT.match(listed, t.end())) else "" for t in tokens
        )
        numbers = tuple(t.group() for t in tokens)
        kind, ref = ("from", m.group(2) + m.group(3)) if m.group(2) else (m.group(1), None)
        found.append(Marker(kind, numbers, ref, units))
    return found


def output_texts(
    nb: nbformat.NotebookNode, redraw_bars: bool = False
) -> Iterator[tuple[int, str, str]]:
    """(cell index, output kind, text) for every text the notebook's outputs show: streams (kind
    ``stdout``/``stderr``), results' and displays' plain text (progress bars redrawn from their
    widget state with ``redraw_bars``), errors."""
    states = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            kind = out.output_type
            if kind == "stream":
                yield i, out.name, out.text
            elif kind == "error":
                yield i, kind, ANSI.sub("", "\n".join(out.traceback)) or out.evalue
            elif "text/plain" in out.get("data", {}):
                view = out.data.get(WIDGET_VIEW) if redraw_bars else None
                bar = progress_bar_text(states, view.get("model_id", "")) if view else None
                yield i, kind, bar or out.data["text/plain"]


def printed_text(nb: nbformat.NotebookNode) -> str:
    """All the text the notebook's outputs show, progress bars at their last frame."""
    return "\n".join(text for _, _, text in output_texts(nb, redraw_bars=True))


def unit_pattern(unit: str) -> str:
    """A regex for the ways an output may print ``unit`` (as prose writes it) after a number:
    ``%`` or ``percent``, ``x``, ``×`` or ``times``, ``s``, ``sec`` or ``seconds``, ..."""
    for forms in SAME_UNIT:
        if re.compile(forms).fullmatch(f"1{unit}", 1):  # the unit, read after a digit
            return forms
    return re.escape(unit) + r"(?!\w)"


def is_printed(number: str, printed: str, unit: str = "") -> bool:
    """Whether ``number`` occurs in ``printed`` as a whole number (not inside a longer one); a
    bare integer (``8``, not ``8.0`` or ``8,000``) with a ``unit`` must occur followed by it
    (``8x`` or ``8 ×``, not ``8`` alone, which nearly any output prints by chance)."""
    whole = rf"(?<![\d.])(?<!\d,){re.escape(number)}"
    if unit and re.fullmatch(r"\d+", number):
        return re.search(rf"{whole}{SPACE}(?:{unit_pattern(unit)})", printed) is not None
    return re.search(rf"{whole}(?![\d]|[.,]\d)", printed) is not None


@functools.cache
def notebook_printed(ref: str, folder: Path = NOTEBOOKS) -> str | None:
    """What notebook ``ref`` (``06``, or ``06s`` for its solutions) prints; None if none."""
    number, solutions = ref[:2], ref.endswith("s")
    pattern = f"{number}_*_solutions.ipynb" if solutions else f"{number}_*.ipynb"
    paths = sorted((folder / "solutions" if solutions else folder).glob(pattern))
    return printed_text(nbformat.read(paths[0], as_version=4)) if paths else None


def snippet(markdown: str, start: int, end: int, width: int = 60) -> str:
    """About ``width`` characters of the prose around ``markdown[start:end]``, on one line."""
    number = markdown[start:end]
    left = re.sub(r"\s+", " ", markdown[:start]).lstrip()
    right = re.sub(r"\s+", " ", markdown[end:]).rstrip()
    keep = max(width - len(number), 0)
    left = left[len(left) - min(len(left), max(keep - len(right), keep // 2)) :]
    return (left + number + right[: keep - len(left)]).strip()


def _marker_flags(cell: int, marker: Marker, folder: Path) -> list[Flag]:
    """The numbers a ``from NN`` marker lists that notebook NN does not print."""
    if marker.kind != "from":
        return []
    other = notebook_printed(marker.ref, folder)
    note = f"<!-- from {marker.ref}: ... -->"
    reason = f"quoted from {marker.ref}, whose outputs do not print it"
    if other is None:
        other, reason = "", f"quoted from {marker.ref}, but there is no notebook {marker.ref}"
    units = marker.units or ("",) * len(marker.numbers)
    return [
        Flag(cell, n, f"{n} {u}".strip(), note, reason)
        for n, u in zip(marker.numbers, units, strict=True)
        if not is_printed(n, other, u)
    ]


def unprinted(nb: nbformat.NotebookNode, folder: Path = NOTEBOOKS) -> list[Flag]:
    """The numbers the notebook's markdown quotes that none of its outputs print (nor, for a
    ``from NN`` marker, notebook NN's in ``folder``), in cell order."""
    printed, flags = printed_text(nb), []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "markdown":
            continue
        exempt = set()
        for marker in markers(cell.source):
            exempt.update(marker.numbers)
            flags += _marker_flags(i, marker, folder)
        for c in claims(cell.source):
            if c.number not in exempt and not is_printed(c.number, printed, c.unit):
                text = snippet(cell.source, c.start, c.end)
                flags.append(Flag(i, c.number, c.text, text, "printed by no output"))
    return flags


def _name(path: Path) -> str:
    """The path as the repository names it, when it is in the repository."""
    path = path.resolve()
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


def report(paths: list[Path]) -> dict[str, list[Flag]]:
    """Print every flagged number of ``paths`` (notebook, cell, number, snippet, why) and a
    count per notebook; returns the flags by notebook."""
    found = {}
    for path in paths:
        name = _name(path)
        found[name] = unprinted(nbformat.read(path, as_version=4))
        for f in found[name]:
            print(f"{name}  cell {f.cell:>2}  {f.text!r:<16} {f.snippet!r}  ({f.reason})")
    print("\nnumbers printed by no output, per notebook:")
    for name, flags in found.items():
        print(f"{len(flags):>4}  {name}")
    print(f"{sum(map(len, found.values())):>4}  in all")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, help="notebooks (default: all)")
    args = parser.parse_args(argv)
    found = report(args.paths or notebook_paths())
    return 1 if any(found.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
