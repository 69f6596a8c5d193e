"""The benchmark's reports: the console table, the speed targets, the README's markdown tables
(from ``results/*.json``), for ``benchmarks/finetune_speed.py``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from benchmarks.levers import RANK

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
README = ROOT / "benchmarks" / "README.md"
TABLE_START, TABLE_END = "<!-- benchmark:start -->", "<!-- benchmark:end -->"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def slug(name: str) -> str:
    """A file name from a device name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def accuracy_text(row: dict) -> str:
    """The mean unseen test accuracy, with its range over the seeds when they differ."""
    low, high = row["unseen_test_acc_range"]
    spread = f" ({low:.1f}–{high:.1f})" if low < high else ""
    return f"{row['unseen_test_acc']:.1f}{spread}"


def format_table(rows: list[dict], matmul: float) -> str:
    head = (
        f"{'variant':28s} {'seconds':>8s} {'examples/s':>11s} {'peak MiB':>9s} "
        f"{'trainable':>11s} {'unseen acc %':>18s} {'GFLOP/s':>8s} {'% matmul':>9s}"
    )
    lines = [head]
    for r in rows:
        peak = "-" if r["peak_mem_mib"] is None else f"{r['peak_mem_mib']:.0f}"
        lines.append(
            f"{r['variant']:28s} {r['seconds']:8.2f} {r['examples_per_s']:11.1f} {peak:>9s} "
            f"{r['trainable_params']:11,} {accuracy_text(r):>18s} "
            f"{r['useful_gflops']:8.2f} {r['pct_of_matmul']:9.1f}"
        )
    lines.append(f"{'calibration: matmul':28s} {'':>8s} {'':>11s} {'':>9s} {'':>11s} {'':>18s} "
                 f"{matmul:8.2f} {100.0:9.1f}")  # fmt: skip
    return "\n".join(lines)


def targets(rows: list[dict]) -> list[tuple[str, bool | None, str]]:
    """The speed targets for ours-lora: (target, met (None: not measured), measured)."""
    by = {r["variant"]: r for r in rows}
    ours = by.get("ours-lora")
    out = []
    for other, factor in (("naive-lora", 5.0), ("peft-lora", 1.5), ("ours-full", 1.3)):
        target = f"ours-lora >= {factor}x {other} examples/s"
        if other == "ours-full":
            target += ", less peak memory"
        else:
            target += ", equal or better unseen accuracy"
        if ours is None or other not in by:
            out.append((target, None, "not measured"))
            continue
        ratio = ours["examples_per_s"] / by[other]["examples_per_s"]
        met = ratio >= factor
        measured = f"{ratio:.2f}x"
        if other == "ours-full":
            mine, theirs = ours["peak_mem_mib"], by[other]["peak_mem_mib"]
            if mine is not None and theirs is not None:
                met = met and mine < theirs
                measured += f", peak {mine:.0f} vs {theirs:.0f} MiB"
        else:
            gap = ours["unseen_test_acc"] - by[other]["unseen_test_acc"]
            met = met and gap >= 0
            measured += f", accuracy {gap:+.2f} points"
        out.append((target, met, measured))
    return out


def format_targets(rows: list[dict]) -> str:
    word = {True: "met", False: "NOT met", None: "-"}
    return "\n".join(f"{word[met]:8s} {t}: {m}" for t, met, m in targets(rows))


def format_markdown(result: dict) -> str:
    """One device's README table, from the JSON the benchmark writes."""
    meta = result["metadata"]
    lines = [
        f"{meta['date']} · {meta['device']} · torch {meta['torch']} · {meta['threads']} "
        f"thread(s) · {meta['preset']} ({meta['base']}), {meta['epochs']} epoch(s) over "
        f"{meta['train_messages']:,} messages, batch {meta['batch_size']}, LoRA r={RANK}, "
        f"seeds {', '.join(map(str, meta['seeds']))}",
        *(["", f"**{meta['note']}**"] if meta.get("note") else []),
        "",
        "| variant | seconds (fastest seed) | examples/s | peak MiB | trainable params "
        "| unseen test acc % (mean, range) "
        "| useful GFLOP/s | % of matmul |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        peak = "–" if r["peak_mem_mib"] is None else f"{r['peak_mem_mib']:.0f}"
        lines.append(
            f"| {r['variant']} | {r['seconds']:.2f} | {r['examples_per_s']:.1f} | {peak} | "
            f"{r['trainable_params']:,} | {accuracy_text(r)} | "
            f"{r['useful_gflops']:.2f} | {r['pct_of_matmul']:.1f} |"
        )
    lines.append(f"| calibration: matmul | | | | | | {meta['matmul_gflops']:.2f} | 100 |")
    lines += ["", "Targets (ours-lora, same run):", ""]
    word = {True: "met", False: "**not met**", None: "not measured"}
    lines += [f"- {t}: {word[met]} ({m})" for t, met, m in targets(result["rows"])]
    study = result.get("lever_study")
    if study:
        lines += [
            "",
            "What each lever is worth (`--lever-study`: ours-lora with one lever flipped):",
            "",
            "| run | seconds | × ours-lora's time | peak MiB | unseen test acc % |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in study:
            peak = "–" if r["peak_mem_mib"] is None else f"{r['peak_mem_mib']:.0f}"
            lines.append(
                f"| {r['variant']} | {r['seconds']:.2f} | {r['seconds'] / study[0]['seconds']:.2f} "
                f"| {peak} | {r['unseen_test_acc']:.1f} |"
            )
    return "\n".join(lines)


def readme_table(results_dir: Path = RESULTS_DIR) -> str:
    """The README's benchmark section: one table per ``results/*.json``, by file name."""
    parts = []
    for path in sorted(results_dir.glob("*.json")):
        parts.append(format_markdown(json.loads(path.read_text())))
    return "\n\n".join(parts)


def update_readme(readme: Path = README, results_dir: Path = RESULTS_DIR) -> bool:
    """Rewrite the README between the benchmark markers; True if it changed."""
    text = readme.read_text()
    start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
    new = text[:start] + "\n" + readme_table(results_dir) + "\n" + text[end:]
    if new != text:
        readme.write_text(new)
    return new != text
