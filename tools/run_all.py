"""Execute every notebook in order and save the executed copies (how the committed outputs are
refreshed), stamping each with how it ran and reporting the time each took.

    python -m tools.run_all                  # full mode: what the committed outputs come from
    LORA_QUICK=1 python -m tools.run_all     # quick mode, minutes on any CPU
    python -m tools.run_all --only 04 06 --out /tmp/executed   # some notebooks, elsewhere
    python -m tools.run_all --solutions --only 04_pretraining_solutions   # one solution
    python -m tools.run_all --table          # only rewrite the README's timing table
    python -m tools.run_all --finalize --solutions   # only redraw committed progress bars

(``python tools/run_all.py ...`` does the same.)

Each executed notebook's metadata gets a ``lora_from_scratch`` stamp (mode, device, torch
version, seconds, date). The README's timing table is generated from the committed notebooks'
stamps (``--table``); a test fails if it is stale or if a committed notebook was run in quick
mode.

A tqdm bar in an executed notebook is a widget whose plain-text fallback (what GitHub shows) is
the bar's first frame, ``0%``; the run's last frame is kept only in the widget state. Every run
redraws each bar's fallback from that state (``--finalize`` does it for the committed notebooks
without executing them).
"""

from __future__ import annotations

import argparse
import datetime
import html
import os
import platform
import re
import sys
import time
from pathlib import Path

import nbformat
import torch
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from tqdm.std import Bar

ROOT = Path(__file__).resolve().parents[1]
STAMP = "lora_from_scratch"
TABLE_START, TABLE_END = "<!-- timings:start -->", "<!-- timings:end -->"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def notebook_paths(solutions: bool = True) -> list[Path]:
    """The notebooks in order, then (with ``solutions``) their worked solutions."""
    paths = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if solutions:
        paths += sorted((ROOT / "notebooks" / "solutions").glob("*.ipynb"))
    return paths


def device_name() -> str:
    """What the notebooks run on here: the CUDA GPU's name, else the CPU's model and cores."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        model = found.group(1).strip() if found else model
    return f"{os.cpu_count()}-core CPU ({model})"


def stamp(nb: nbformat.NotebookNode, mode: str, seconds: float) -> None:
    """Record in the notebook's metadata how and where it was executed."""
    nb.metadata[STAMP] = {
        "mode": mode,
        "device": device_name(),
        "torch": torch.__version__,
        "seconds": round(seconds, 1),
        "date": datetime.date.today().isoformat(),
    }


def _html_text(value: str) -> str:
    """A tqdm widget label as plain text: entities unescaped, figure and no-break spaces plain."""
    return html.unescape(value).replace("\u2007", " ").replace("\xa0", " ")


def progress_bar_text(states: dict, model_id: str) -> str | None:
    """The last frame of the tqdm bar widget ``model_id`` as tqdm's text bar, from the saved
    widget ``states``; None if that widget is not a tqdm bar (label, progress, label)."""
    box = states.get(model_id, {})
    if box.get("model_name") != "HBoxModel":
        return None
    children = [str(child).removeprefix("IPY_MODEL_") for child in box["state"]["children"]]
    models = [states.get(child, {}) for child in children]
    kinds = [m.get("model_name", "") for m in models]
    if len(kinds) != 3 or kinds[::2] != ["HTMLModel"] * 2 or "Progress" not in kinds[1]:
        return None
    left, bar, right = (m.get("state", {}) for m in models)
    left_text, right_text = _html_text(left.get("value", "")), _html_text(right.get("value", ""))
    if not left_text:  # no bar in tqdm's format (unknown total): the right label is all of it
        return right_text or None
    low, high = bar.get("min", 0.0), bar.get("max", 1.0)
    frac = min(max((bar.get("value", low) - low) / ((high - low) or 1.0), 0.0), 1.0)
    return f"{left_text}|{format(Bar(frac, default_len=10), '')}|{right_text}"


def finalize_progress_bars(nb: nbformat.NotebookNode) -> int:
    """Rewrite the plain-text fallback of every tqdm bar output to the bar's last recorded frame
    (readers without widgets, GitHub's viewer included, see the end of the run, not ``0%``);
    the widget view stays. Returns how many outputs changed."""
    states = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    changed = 0
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            view = output.get("data", {}).get(WIDGET_VIEW)
            text = progress_bar_text(states, view.get("model_id", "")) if view else None
            if text is not None and output.data.get("text/plain") != text:
                output.data["text/plain"] = text
                changed += 1
    return changed


def finalize_notebooks(paths: list[Path]) -> int:
    """Redraw the progress bars of committed notebooks in place, without executing anything;
    returns how many outputs changed."""
    total = 0
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        changed = finalize_progress_bars(nb)
        if changed:
            nbformat.write(nb, path)
        print(f"  {path.relative_to(ROOT)}: {changed} progress bars redrawn")
        total += changed
    return total


def run_notebook(
    path: Path, out: Path, timeout: int, mode: str = "full"
) -> tuple[float, str | None]:
    """Execute ``path`` in its own folder and write the executed, stamped copy to ``out`` (also
    when a cell fails, to show where); returns the seconds taken and the error, if any."""
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    error = None
    try:
        client.execute()
    except CellExecutionError as err:
        error = str(err).strip().splitlines()[-1]
    seconds = time.perf_counter() - start
    finalize_progress_bars(nb)
    stamp(nb, mode if error is None else f"{mode}, failed", seconds)
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out)
    return seconds, error


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def timing_table(paths: list[Path] | None = None) -> str:
    """The README's timing table, made from the stamps of the committed notebooks."""
    rows, totals, devices = [], [0.0, 0.0], set()
    for path in notebook_paths(solutions=False) if paths is None else paths:
        solution = ROOT / "notebooks" / "solutions" / f"{path.stem}_solutions.ipynb"
        cells = []
        for i, p in enumerate((path, solution)):
            info = nbformat.read(p, as_version=4).metadata.get(STAMP)
            if info is None:
                cells.append("not run yet")
                continue
            totals[i] += info["seconds"]
            devices.add(f"{info['device']}, torch {info['torch']}")
            mode = "" if info["mode"] == "full" else f" ({info['mode']} mode)"
            cells.append(f"{_duration(info['seconds'])}{mode}, {info['date']}")
        rows.append(f"| {path.stem} | {cells[0]} | {cells[1]} |")
    return "\n".join(
        [
            f"Measured on: {'; '.join(sorted(devices))}.",
            "",
            "| notebook | notebook, full mode | its worked solutions, full mode |",
            "|---|---:|---:|",
            *rows,
            f"| **all** | **{_duration(totals[0])}** | **{_duration(totals[1])}** |",
            "",
            f"Everything together: **{_duration(sum(totals))}**.",
        ]
    )


def update_readme(readme: Path = ROOT / "README.md") -> bool:
    """Rewrite the table between the timing markers; True if the README changed."""
    text = readme.read_text()
    start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
    new = f"{text[:start]}\n{timing_table()}\n{text[end:]}"
    if new != text:
        readme.write_text(new)
    return new != text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="starts of notebook names, e.g. 04 06 (with --solutions, also their solutions), "
        "or 04_pretraining_solutions",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for the executed copies (default: overwrite the notebooks in place)",
    )
    parser.add_argument("--solutions", action="store_true", help="also run notebooks/solutions")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    parser.add_argument("--table", action="store_true", help="only rewrite the README table")
    parser.add_argument(
        "--finalize",
        action="store_true",
        help="only redraw the progress bars of the committed notebooks from their widget state",
    )
    args = parser.parse_args(argv)
    if args.table:
        print("README timing table", "updated" if update_readme() else "already current")
        return 0

    paths = notebook_paths(args.solutions)
    if args.only:
        paths = [p for p in paths if p.name.startswith(tuple(args.only))]
    if args.finalize:
        print(f"{finalize_notebooks(paths)} progress bars redrawn in {len(paths)} notebooks")
        return 0
    mode = "quick" if os.environ.get("LORA_QUICK") == "1" else "full"
    print(f"Running {len(paths)} notebooks in {mode} mode on {device_name()}")
    times, failed = {}, {}
    for path in paths:
        out = args.out / path.name if args.out else path
        print(f"  {path.relative_to(ROOT)} ...", end=" ", flush=True)
        times[path.name], error = run_notebook(path, out, args.timeout, mode)
        print(f"{times[path.name]:7.1f} s" + (f"  FAILED: {error}" if error else ""))
        if error:
            failed[path.name] = error
    print(f"\n| notebook | {mode}-mode time |\n|---|---|")
    for name, seconds in times.items():
        print(f"| {name} | {_duration(seconds)} |")
    print(f"| **all** | {_duration(sum(times.values()))} |")
    if mode == "full" and args.out is None:
        print("README timing table", "updated" if update_readme() else "already current")
    if failed:
        print(f"\n{len(failed)} failed (their executed copies show where): {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
