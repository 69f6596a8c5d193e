"""Write the "Open in Colab" badge and the Colab setup cell into every notebook, and the badges
into the README's notebook table, from the one place that names the repository and branch.

    python -m tools.colab          # rewrite what is out of date (or: python tools/colab.py)
    python -m tools.colab --check  # exit 1, listing the files, if anything is out of date
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import nbformat

REPOSITORY = "lora-from-scratch/lora-from-scratch"  # GitHub owner/name
BRANCH = "main"

ROOT = Path(__file__).resolve().parents[1]
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
BADGE_LINK = re.compile(
    r"\[!\[Open In Colab\]\(" + re.escape(BADGE_IMAGE) + r"\)\]\(https://colab\.research\.google"
    r"\.com/github/[^)\s]+\)"
)
SETUP_MARKER = "# Setup: on Colab"


def colab_url(notebook: Path) -> str:
    """The Colab address that opens ``notebook`` (a path inside the repository)."""
    relative = notebook.resolve().relative_to(ROOT).as_posix()
    return f"https://colab.research.google.com/github/{REPOSITORY}/blob/{BRANCH}/{relative}"


def badge(notebook: Path) -> str:
    return f"[![Open In Colab]({BADGE_IMAGE})]({colab_url(notebook)})"


def setup_cell() -> str:
    """The second cell of every notebook: installs the package on Colab, inert elsewhere."""
    return f"""{SETUP_MARKER}, install the helper package from this repository and check for a GPU;
# on your own machine or in CI this cell does nothing.
import sys

if "google.colab" in sys.modules:
    %pip install -q "lora-helpers @ git+https://github.com/{REPOSITORY}@{BRANCH}"
    import torch

    if not torch.cuda.is_available():
        print("No GPU: choose Runtime > Change runtime type > T4 GPU, then run all cells again.")"""


def notebooks() -> list[Path]:
    """Every notebook of the collection, solutions included, in order."""
    folder = ROOT / "notebooks"
    return sorted(folder.glob("[0-9][0-9]_*.ipynb")) + sorted(folder.glob("solutions/*.ipynb"))


def update_notebook(path: Path, write: bool = True) -> bool:
    """Put the right badge in the first cell and the setup cell second; True if changed."""
    nb = nbformat.read(path, as_version=4)
    first = nb.cells[0]
    if first.cell_type != "markdown" or not first.source.startswith("# "):
        raise ValueError(f"{path}: the first cell must be the markdown title cell")
    title, _, rest = first.source.partition("\n")
    rest = BADGE_LINK.sub("", rest).lstrip("\n")
    source = f"{title}\n\n{badge(path)}\n\n{rest}".rstrip()
    changed = source != first.source
    first.source = source
    setup = nbformat.v4.new_code_cell(setup_cell())
    if len(nb.cells) > 1 and nb.cells[1].source.startswith(SETUP_MARKER):
        changed |= nb.cells[1].source != setup.source
        nb.cells[1].source = setup.source
    else:
        nb.cells.insert(1, setup)
        changed = True
    if changed and write:
        nbformat.write(nb, path)
    return changed


def update_readme(path: Path = ROOT / "README.md", write: bool = True) -> bool:
    """Point each README badge at the notebook linked just before it; True if changed."""
    text = path.read_text()

    def fix(match: re.Match) -> str:
        return f"[{match['title']}]({match['link']}) {badge(ROOT / match['link'])}"

    pattern = re.compile(
        r"\[(?P<title>[^\]]+)\]\((?P<link>notebooks/[^)]+\.ipynb)\) " + BADGE_LINK.pattern
    )
    new = pattern.sub(fix, text)
    if new != text and write:
        path.write_text(new)
    return new != text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report, change nothing")
    args = parser.parse_args(argv)
    write = not args.check
    stale = [path for path in notebooks() if update_notebook(path, write)]
    if update_readme(ROOT / "README.md", write):
        stale.append(ROOT / "README.md")
    for path in stale:
        print(("out of date: " if args.check else "updated: ") + str(path.relative_to(ROOT)))
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
