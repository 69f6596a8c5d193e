"""Where one training step's time goes: ``torch.profiler`` on ours-lora, ours-full and PEFT.

The step is ``finetune.finetune``'s (the classification loss, backward, clipping, fused AdamW)
on the benchmark's batches (notebook 06's recipe, the pretrained base when it is there), timed
phase by phase (forward, backward, optimizer; the variants' steps interleaved) and then
profiled: the operators with the most self time per step, the number of operators per step
that do the work (those that call no other operator), and the activations kept for backward.
``python -m benchmarks.finetune_speed --profile`` runs it and rewrites the table in
``benchmarks/README.md``.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.levers import LogitsFn, loss_with
from lora_helpers import finetune as ft
from lora_helpers.fast import adamw

README = Path(__file__).resolve().parent / "README.md"
START, END = "<!-- profile:start -->", "<!-- profile:end -->"
PHASES = ("forward", "backward", "optimizer")


def step_phases(model, params, optimizer, batch, device, loss_fn) -> dict[str, float]:
    """One training step, each phase's wall time in seconds."""
    marks = [time.perf_counter()]
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch, device)
    marks.append(time.perf_counter())
    loss.backward()
    marks.append(time.perf_counter())
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    marks.append(time.perf_counter())
    return {phase: marks[i + 1] - marks[i] for i, phase in enumerate(PHASES)}


def saved_for_backward_mib(model, batch, device, loss_fn) -> float:
    """MiB that autograd keeps from one step's forward pass for its backward pass (each storage
    once): the activations backward needs. For a frozen linear layer it keeps the weight (a
    view) and never the layer's input, which only a weight gradient would need."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_fn(model, batch, device)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(n for ptr, n in storages.items() if ptr not in parameters) / 2**20


def profile_variants(
    setups: dict[str, tuple[torch.nn.Module, float, LogitsFn]],
    batches: list,
    device: torch.device,
    warmup: int = 10,
    timed: int = 50,
    profiled: int = 20,
) -> dict[str, dict]:
    """For each ``name: (model, lr, logits_fn)``: the median time of each phase over ``timed``
    steps, run interleaved (step i of every variant in turn, so that a slow spell of a shared
    machine slows them all alike), then the operators of ``profiled`` steps: self time and
    calls per step, and the operators per step that do the work (that call no other)."""
    if len(batches) < warmup + max(timed, profiled):
        raise ValueError(f"Need {warmup + max(timed, profiled)} batches, got {len(batches)}.")
    steps = {}
    for name, (model, lr, logits_fn) in setups.items():
        model.to(device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = adamw(params, lr, ft.FULL_FINETUNE.weight_decay, device)
        steps[name] = (model, params, optimizer, loss_with(logits_fn))
        for batch in batches[:warmup]:
            step_phases(*steps[name][:3], batch, device, steps[name][3])
    times: dict[str, list[dict[str, float]]] = {name: [] for name in setups}
    for batch in batches[warmup : warmup + timed]:
        for name, (model, params, optimizer, loss_fn) in steps.items():
            times[name].append(step_phases(model, params, optimizer, batch, device, loss_fn))
    profiles = {}
    for name, (model, params, optimizer, loss_fn) in steps.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for batch in batches[warmup : warmup + profiled]:
                step_phases(model, params, optimizer, batch, device, loss_fn)
        ops = [e for e in prof.events() if e.name.startswith("aten::")]
        leaves = [e for e in ops if not any(c.name.startswith("aten::") for c in e.cpu_children)]
        saved = saved_for_backward_mib(model, batches[warmup], device, loss_fn)
        profiles[name] = {
            "ms": {ph: 1e3 * statistics.median(t[ph] for t in times[name]) for ph in PHASES},
            "saved_mib": saved,
            "leaf_ops_per_step": len(leaves) / profiled,
            "ops": {  # name -> (self ms per step, calls per step)
                e.key: (e.self_cpu_time_total / 1e3 / profiled, e.count / profiled)
                for e in prof.key_averages()
                if e.key.startswith("aten::")
            },
        }
    return profiles


def format_profile(profiles: dict[str, dict], top: int = 8) -> str:
    """Two markdown tables: the phases, then the operators with the most self time."""
    names = list(profiles)
    lines = [
        "| per training step | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for phase in PHASES:
        cells = [f"{p['ms'][phase]:.2f}" for p in profiles.values()]
        lines.append(f"| {phase} (ms) | " + " | ".join(cells) + " |")
    total = [f"**{sum(p['ms'].values()):.2f}**" for p in profiles.values()]
    lines.append("| **sum (ms)** | " + " | ".join(total) + " |")
    leaves = [f"{p['leaf_ops_per_step']:,.0f}" for p in profiles.values()]
    lines.append("| operators doing the work | " + " | ".join(leaves) + " |")
    saved = [f"{p['saved_mib']:.1f}" for p in profiles.values()]
    lines.append("| kept for backward (MiB, first batch) | " + " | ".join(saved) + " |")
    ranked = Counter()
    for p in profiles.values():
        for name, (ms, _) in p["ops"].items():
            ranked[name] = max(ranked[name], ms)
    lines += [
        "",
        "| operator: self ms per step (calls) | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for name, _ in ranked.most_common(top):
        cells = []
        for p in profiles.values():
            ms, calls = p["ops"].get(name, (0.0, 0))
            cells.append(f"{ms:.2f} ({calls:.0f})" if calls else "–")
        lines.append(f"| `{name.removeprefix('aten::')}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def update_readme(table: str, readme: Path = README) -> None:
    """Put ``table`` between the profile markers of ``benchmarks/README.md``."""
    text = readme.read_text()
    start, end = text.index(START) + len(START), text.index(END)
    readme.write_text(text[:start] + "\n" + table + "\n" + text[end:])
