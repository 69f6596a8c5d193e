"""Execute every notebook in order and save the executed copies (how the committed outputs are
refreshed), reporting the time each took.

    python tools/run_all.py                  # full mode (use a GPU for 04, 05, 06, 08, 09)
    LORA_QUICK=1 python tools/run_all.py     # quick mode, minutes on any CPU
    python tools/run_all.py --only 04 06 --out /tmp/executed   # some notebooks, elsewhere
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]


def run_notebook(path: Path, out: Path, timeout: int) -> tuple[float, str | None]:
    """Execute ``path`` in its own folder and write the executed copy to ``out`` (also when a
    cell fails, to show where); returns the seconds taken and the error, if any."""
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
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out)
    return seconds, error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help="notebook numbers, e.g. 04 06")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for the executed copies (default: overwrite the notebooks in place)",
    )
    parser.add_argument("--solutions", action="store_true", help="also run notebooks/solutions")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    args = parser.parse_args(argv)

    paths = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if args.solutions:
        paths += sorted((ROOT / "notebooks" / "solutions").glob("*.ipynb"))
    if args.only:
        paths = [p for p in paths if p.name[:2] in args.only]
    mode = "quick" if os.environ.get("LORA_QUICK") == "1" else "full"
    print(f"Running {len(paths)} notebooks in {mode} mode")
    times, failed = {}, {}
    for path in paths:
        out = args.out / path.name if args.out else path
        print(f"  {path.relative_to(ROOT)} ...", end=" ", flush=True)
        times[path.name], error = run_notebook(path, out, args.timeout)
        print(f"{times[path.name]:7.1f} s" + (f"  FAILED: {error}" if error else ""))
        if error:
            failed[path.name] = error
    print(f"\n| notebook | {mode}-mode time |\n|---|---|")
    for name, seconds in times.items():
        print(
            f"| {name} | {seconds / 60:.1f} min |"
            if seconds >= 60
            else f"| {name} | {seconds:.0f} s |"
        )
    print(f"| **all** | {sum(times.values()) / 60:.1f} min |")
    if failed:
        print(f"\n{len(failed)} failed (their executed copies show where): {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
