"""How fast does notebook 06's spam classifier fine-tune? Naive LoRA, ours (LoRA and full), PEFT.

One process, the same base, the same batches (one loader, sampler and seed), the same epochs,
every run through the notebooks' own loop (``finetune.finetune`` → ``train.train``):

1. ``naive-lora``: the LoRA layer exactly as notebook 05 first shows it (``alpha * (x @ A @ B)``)
   on every linear layer of the blocks, with every speed-up switched off
   (``benchmarks.levers.NAIVE``: explicit attention, every message padded to the training set's
   longest, the head on every position, plain AdamW, no autocast, no CUDA graphs);
2. ``ours-lora``: ``finetune.prepare_variant(base, "lora-r16")`` trained by ``finetune.finetune``
   (rank 16, alpha 16, every linear layer of the blocks, q/k/v as three layers; notebook 06's
   recipe also adapts the token embedding, left out here to compare like with like);
3. ``ours-full``: every weight, the same way;
4. ``peft-lora``: Hugging Face PEFT LoRA (rank 16, alpha 16) on ``transformers``'
   GPT2ForSequenceClassification holding the same base weights (``peft_format.to_transformers``)
   and our head's initial weights, trained by ``finetune.finetune`` with a loss that calls it
   (fused AdamW, bf16 autocast on a CUDA GPU, no CUDA graphs). Like for like: PEFT targets every
   linear layer of the blocks too, ``c_attn``, ``attn.c_proj``, ``c_fc`` and ``mlp.c_proj``,
   but GPT-2 fuses q/k/v into one ``c_attn`` (d → 3d), whose adapter has r·(d + 3d) parameters
   where our three separate ones have 3·r·(d + d): per block 16·r·d trainable against our 18·r·d
   (and its head has no bias). Skipped when peft or transformers is not installed.

Recipe: notebook 06's (``finetune.FinetuneRecipe``: batch 8, AdamW with weight decay 0.01,
gradient clipping at 1, lr 1e-3 for LoRA, 1e-4 for full fine-tuning, 5 epochs), with seeds
123, 124, 125 (``--seeds``: the head's and adapters' initialisation and the batch order), every
variant once per seed in turn, so that a slow spell of the machine hits them all alike. The
base is the notebooks' pretrained one (``pretrain.load_base_model``) when its checkpoint is in
the artifacts folder (``--pretrain`` pretrains it first when it is not); otherwise a fresh
initialisation, and the output says so: speed does not depend on the weights, accuracy does.

Columns: ``seconds`` is ``train.train``'s wall time (every step, and each epoch's validation
loss), the fastest of the seeds' runs (on a shared machine, interference only ever adds
time: the fastest run is the closest to what the code costs; every run's time is in the
JSON); ``examples_per_s`` the training examples over it;
``peak_mem_mib`` what the run added at its peak (``device.PeakMemory``: resident memory on a
CPU, the allocator on a GPU), the highest over the seeds; ``unseen_test_acc`` the accuracy on
the test messages whose text occurs in no training message (``finetune.unseen_test_mask``),
the mean over the seeds, and its range. Calibration: ``matmul_gflops`` is the best throughput
of the model's own matrix products (tokens × d by d × d, d × 4d and 4d × d; fp32, or bf16 where the
fast path autocasts) measured in the same run on the same threads; each variant's useful FLOP
rate counts the work the result needs, on the real, unpadded tokens it trained on:

    useful FLOPs = tokens × (4·N + 2·N_trainable) + messages × (4·M + 2·M_trainable)

with N the weights of the matrix products every token passes through (the blocks' linear
layers and adapters; not the embeddings), M those only each message's last token needs (the
head reads that token alone: the last block's query, output projection and feed-forward; a
variant that computes them at every token does work the result does not need): 2·N for the
forward pass, 2·N for the gradients flowing back through every layer, 2·N_trainable for the
gradients of the trained weights (so 6·N for full fine-tuning). Attention's own products are
left out (short messages). ``pct_of_matmul`` is that rate over ``matmul_gflops``.

    python -m benchmarks.finetune_speed                    # the CPU run (scratch-7M, 5 epochs)
    python -m benchmarks.finetune_speed --lever-study      # and what each lever is worth
    python -m benchmarks.finetune_speed --profile          # where one step's time goes
    python -m benchmarks.finetune_speed --table            # README table from results/*.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import re
import statistics
import time
import warnings
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import levers as lv
from benchmarks import step_profile
from lora_helpers import finetune as ft
from lora_helpers.data import message_loaders, sms_spam_split
from lora_helpers.device import PeakMemory, capabilities, get_device
from lora_helpers.fast import adamw
from lora_helpers.lora import EmbeddingWithLoRA
from lora_helpers.model import PRESETS, GPTModel, gpt_config
from lora_helpers.params import count_parameters
from lora_helpers.pretrain import FULL_RECIPE, base_checkpoint_path, load_base_model
from lora_helpers.tokenizer import get_tokenizer

VARIANTS = ("naive-lora", "ours-lora", "ours-full", "peft-lora")
RESULT_KEYS = (
    "variant",
    "seconds",
    "examples_per_s",
    "peak_mem_mib",
    "trainable_params",
    "unseen_test_acc",
    "unseen_test_acc_range",
    "useful_gflops",
    "pct_of_matmul",
    "seconds_per_run",
)
ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
README = ROOT / "benchmarks" / "README.md"
TABLE_START, TABLE_END = "<!-- benchmark:start -->", "<!-- benchmark:end -->"
RANK = ALPHA = lv.RANK


# --- PEFT ------------------------------------------------------------------------------------


def peft_available() -> bool:
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def peft_lora_model(base: GPTModel, head: torch.nn.Linear) -> torch.nn.Module:
    """transformers' GPT-2 classifier holding ``base``'s weights and ``head``'s initial weight,
    with PEFT LoRA on every linear layer of the blocks."""
    from peft import LoraConfig, get_peft_model

    from lora_helpers.peft_format import to_transformers

    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    hf_model = to_transformers(base, num_labels=2)
    with torch.no_grad():
        hf_model.score.weight.copy_(head.weight)
    lora = LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        target_modules=["c_attn", "c_proj", "c_fc"],  # c_proj: attn.c_proj and mlp.c_proj
        lora_dropout=0.0,
        fan_in_fan_out=True,  # GPT-2's Conv1D layers store their weights transposed
        modules_to_save=["score"],
        task_type="SEQ_CLS",
    )
    return get_peft_model(hf_model, lora)


def peft_logits(model: torch.nn.Module, input_ids: torch.Tensor, lengths: torch.Tensor):
    """transformers pools at the last token that is not ``pad_token_id``; it gets the mask too."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    attention_mask = (positions < lengths.to(input_ids.device)[:, None]).long()
    return model(input_ids=input_ids, attention_mask=attention_mask).logits


# --- measuring -------------------------------------------------------------------------------


def matmul_params(model: torch.nn.Module) -> tuple[int, int, int, int]:
    """Weights of the matrix products a message's tokens pass through (2-D parameters outside
    embeddings and the classification head, ``out_head`` or ``score``): (all, trainable) that
    every token needs, then (all, trainable) that only the last token needs, because the head
    reads it alone: the last block's query, output projection and feed-forward (with their
    adapters; of GPT-2's fused ``c_attn`` the query's third)."""
    tokens, tokens_trainable, last, last_trainable = 0, 0, 0, 0
    lookup = (torch.nn.Embedding, EmbeddingWithLoRA)  # lookups (LoRA on them too): no products
    lookups = [n for n, m in model.named_modules() if isinstance(m, lookup)]
    blocks = [n for n, m in model.named_modules() if re.fullmatch(r".*(trf_blocks|\.h)\.\d+", n)]
    last_block = f"{blocks[-1]}."
    for name, p in model.named_parameters():
        in_lookup = any(name.startswith(f"{n}.") for n in lookups)
        if p.dim() != 2 or in_lookup or set(name.split(".")) & {"out_head", "score"}:
            continue
        share = 0.0  # of this weight, the part only the last token needs
        if name.startswith(last_block):
            inner = name.removeprefix(last_block)
            if inner.startswith(("att.W_query", "att.out_proj", "ff.", "attn.c_proj", "mlp.")):
                share = 1.0
            elif inner.startswith("attn.c_attn") and not inner.endswith("lora_A.default.weight"):
                share = 1 / 3  # q of q|k|v (the adapter's A reads the input every token needs)
        n_last = round(share * p.numel())
        tokens += p.numel() - n_last
        last += n_last
        if p.requires_grad:
            tokens_trainable += p.numel() - n_last
            last_trainable += n_last
    return tokens, tokens_trainable, last, last_trainable


def matmul_gflops(emb_dim: int, device: torch.device, tokens: int = 512) -> float:
    """The best throughput, in GFLOP/s, of the model's own matrix products (tokens × d by
    d × d, d × 4d and 4d × d), in the dtype the fast path computes in."""
    dtype = torch.bfloat16 if capabilities(device).bf16_autocast else torch.float32
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = 0.0
    for k, n in ((emb_dim, emb_dim), (emb_dim, 4 * emb_dim), (4 * emb_dim, emb_dim)):
        a = torch.randn(tokens, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        flops = 2 * tokens * k * n
        repeats = max(1, int(2e8 // flops))  # about 0.2 GFLOP a timing
        a @ b
        for _ in range(5):
            sync()
            start = time.perf_counter()
            for _ in range(repeats):
                a @ b
            sync()
            best = max(best, repeats * flops / (time.perf_counter() - start) / 1e9)
    return best


def warm_up(device: torch.device) -> None:
    """Pay the process's one-time costs before the first variant: the CUDA context, the math
    libraries' handles, torch.optim's first use. No variant is charged for them."""
    x = torch.randn(64, 64, device=device, requires_grad=True)
    (x @ x).sum().backward()
    q = torch.randn(1, 2, 16, 64, device=device)
    F.scaled_dot_product_attention(q, q, q, is_causal=True)
    torch.optim.AdamW([x]).step()
    adamw([x], 1e-3, 0.0, device).step()


def build_model(variant: str, base: GPTModel, recipe: ft.FinetuneRecipe) -> torch.nn.Module:
    if variant == "naive-lora":
        return lv.naive_lora_model(base, recipe.seed)
    if variant in ("ours-lora", "ours-full"):
        return ft.prepare_variant(base, "lora-r16" if variant == "ours-lora" else "full", recipe)
    if variant == "peft-lora":
        head = ft.prepare_variant(base, "head", recipe).out_head  # our head's initial weights
        return peft_lora_model(base, head)
    raise ValueError(f"Unknown variant {variant!r}; choose from {VARIANTS}")


def measure(
    name: str,
    variant: str,
    levers: lv.Levers,
    base: GPTModel,
    context: dict,
    device: torch.device,
    recipe: ft.FinetuneRecipe,
) -> dict:
    """Build, fine-tune and test one variant on ``device`` with ``levers`` (one seed: the
    recipe's); its time, useful work, peak memory and unseen test accuracy."""
    loaders = lv.loaders_for(context["loaders"], levers, context["longest"], recipe.seed)
    lr = recipe.learning_rate("full" if variant == "ours-full" else "lora")
    gc.collect()
    with PeakMemory(device) as peak:
        model = build_model(variant, base, recipe).to(device)
        if variant == "peft-lora":
            history = ft.finetune(
                model, loaders, device, recipe, lr, accuracies=False, cuda_graphs=False,
                loss_fn=partial(ft.classification_loss, logits_fn=peft_logits), progress=False,
            )  # fmt: skip
        else:
            history = lv.finetune_with(model, loaders, device, recipe, lr, levers)
    logits_fn = peft_logits if variant == "peft-lora" else lv.logits_fn(levers)
    _, unseen_acc = ft.accuracy_on_test(model, loaders, context["split"], device, logits_fn)
    examples = recipe.epochs * len(loaders["train"]) * recipe.batch_size
    every, every_trainable, last, last_trainable = matmul_params(model)
    flops = examples * context["mean_length"] * (4 * every + 2 * every_trainable)
    flops += examples * (4 * last + 2 * last_trainable)
    run = {
        "seconds": history.seconds,
        "examples": examples,
        "flops": flops,
        "peak_mem_mib": peak.mib,
        "trainable_params": count_parameters(model, trainable_only=True),
        "unseen_test_acc": 100 * unseen_acc,
    }
    print(
        f"  {name}, seed {recipe.seed}: {run['seconds']:.2f} s, "
        f"{examples / run['seconds']:.1f} examples/s, "
        f"unseen test accuracy {run['unseen_test_acc']:.2f} %",
        flush=True,
    )
    return run


def combine(name: str, runs: list[dict], matmul: float) -> dict:
    """One result row from a variant's runs (one per seed): the fastest run's time, the peak
    memory's maximum, the mean unseen test accuracy and its range."""
    seconds = min(r["seconds"] for r in runs)
    useful = runs[0]["flops"] / seconds / 1e9
    peaks = [r["peak_mem_mib"] for r in runs if r["peak_mem_mib"] is not None]
    accuracies = [r["unseen_test_acc"] for r in runs]
    return {
        "variant": name,
        "seconds": round(seconds, 2),
        "examples_per_s": round(runs[0]["examples"] / seconds, 1),
        "peak_mem_mib": round(max(peaks), 1) if peaks else None,
        "trainable_params": runs[0]["trainable_params"],
        "unseen_test_acc": round(statistics.mean(accuracies), 2),
        "unseen_test_acc_range": [round(min(accuracies), 2), round(max(accuracies), 2)],
        "useful_gflops": round(useful, 2),
        "pct_of_matmul": round(100 * useful / matmul, 1),
        "seconds_per_run": [round(r["seconds"], 2) for r in runs],
    }


# --- the base --------------------------------------------------------------------------------


def base_model(preset: str, pretrain: bool, seed: int) -> tuple[GPTModel, str]:
    """The notebooks' pretrained base when it is there (or ``pretrain``), else a fresh one."""
    cpu = torch.device("cpu")  # the base stays on the CPU: each variant copies it over
    if preset == FULL_RECIPE.preset and (pretrain or base_checkpoint_path(FULL_RECIPE).exists()):
        return load_base_model(cpu, FULL_RECIPE).eval(), "pretrained (notebook 04's base)"
    torch.manual_seed(seed)
    note = "fresh initialisation: no pretrained base"
    if preset == FULL_RECIPE.preset:
        note += " (pass --pretrain to make one); the accuracy column means little"
    return GPTModel(gpt_config(preset, drop_rate=0.0)).eval(), note


# --- reporting -------------------------------------------------------------------------------


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


# --- the run ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default=FULL_RECIPE.preset, choices=sorted(PRESETS))
    parser.add_argument("--pretrain", action="store_true", help="pretrain the base if missing")
    parser.add_argument("--epochs", type=int, default=ft.FULL_FINETUNE.epochs)
    parser.add_argument("--seeds", type=int, default=3, help="runs per variant, seeds 123, ...")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--max-messages", type=int, default=None, help="per split (smoke runs)")
    parser.add_argument("--out", type=Path, default=None, help="default: results/<device>.json")
    parser.add_argument("--lever-study", action="store_true", help="ours-lora, one lever flipped")
    parser.add_argument("--table", action="store_true", help="only rewrite the README table")
    parser.add_argument("--profile", action="store_true", help="profile one step, update README")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    """Run the benchmark; returns what it writes as JSON to ``--out``."""
    args = parse_args(argv)
    if args.table:
        print("README updated" if update_readme() else "README already up to date")
        return None
    threads = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.profile:
            return profile_steps(args)
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> dict:
    device = get_device()
    # LoRA on the blocks only, where naive-lora and PEFT adapt too (notebook 06 also adapts
    # the token embedding: a lookup, whose cost hardly counts next to the blocks').
    recipe = replace(ft.FULL_FINETUNE, epochs=args.epochs, lora_targets="blocks")
    base, base_note = base_model(args.preset, args.pretrain, recipe.seed)
    split = ft.shrink_split(sms_spam_split(), args.max_messages)
    max_length = base.cfg.context_length
    loaders = message_loaders(split, get_tokenizer(), recipe.batch_size, max_length, recipe.seed)
    train_lengths = [len(ids) for ids in loaders["train"].dataset.ids]
    warm_up(device)
    context = {
        "loaders": loaders,
        "split": split,
        "longest": max(train_lengths),
        "mean_length": sum(train_lengths) / len(train_lengths),
        "matmul_gflops": matmul_gflops(base.cfg.emb_dim, device),
    }
    print(
        f"{args.preset}, {base_note}: {len(split['train'])} training messages, {args.epochs} "
        f"epoch(s), {torch.get_num_threads()} thread(s); matmul {context['matmul_gflops']:.2f} "
        "GFLOP/s",
        flush=True,
    )
    variants = [v for v in args.variants if v != "peft-lora" or peft_available()]
    if len(variants) < len(args.variants):
        print("  peft-lora: skipped (pip install peft transformers to include it)")
    runs: dict[str, list[dict]] = {variant: [] for variant in variants}
    for seed in range(recipe.seed, recipe.seed + args.seeds):  # every variant once per seed
        for variant in variants:
            levers = lv.NAIVE if variant == "naive-lora" else lv.OURS
            seeded = replace(recipe, seed=seed)
            runs[variant].append(measure(variant, variant, levers, base, context, device, seeded))
    rows = [combine(variant, r, context["matmul_gflops"]) for variant, r in runs.items()]
    print()
    print(format_table(rows, context["matmul_gflops"]))
    print()
    print(format_targets(rows))
    result = {
        "metadata": {
            "device": device_name(device),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "date": datetime.date.today().isoformat(),
            "preset": args.preset,
            "base": "pretrained" if base_note.startswith("pretrained") else "fresh init",
            "epochs": args.epochs,
            "seeds": list(range(recipe.seed, recipe.seed + args.seeds)),
            "batch_size": recipe.batch_size,
            "train_messages": len(split["train"]),
            "matmul_gflops": round(context["matmul_gflops"], 2),
        },
        "rows": [{k: r[k] for k in RESULT_KEYS} for r in rows],
    }
    if args.lever_study:
        result["lever_study"] = lever_study(base, context, device, recipe)
    out = args.out or RESULTS_DIR / f"{slug(device_name(device))}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nWrote {out}; python -m benchmarks.finetune_speed --table updates the README.")
    return result


def profile_steps(args: argparse.Namespace) -> dict:
    """``benchmarks.step_profile`` on ours-lora, ours-full, peft-lora (when installed) and
    notebook 06's LoRA (which also adapts the token embedding), on the benchmark's first
    batches; rewrites its README table."""
    device = get_device()
    recipe = replace(ft.FULL_FINETUNE, lora_targets="blocks")
    base, base_note = base_model(args.preset, args.pretrain, recipe.seed)
    split = ft.shrink_split(sms_spam_split(), args.max_messages)
    loaders = message_loaders(split, get_tokenizer(), recipe.batch_size, base.cfg.context_length)
    batches = list(loaders["train"])
    warm_up(device)
    models = {
        "ours-lora": build_model("ours-lora", base, recipe),
        "ours-full": build_model("ours-full", base, recipe),
        "notebook 06's LoRA (+ embedding)": ft.prepare_variant(base, "lora-r16", ft.FULL_FINETUNE),
    }
    if peft_available():
        models["peft-lora"] = build_model("peft-lora", base, recipe)
    setups = {
        name: (
            model,
            recipe.learning_rate("full" if name == "ours-full" else "lora"),
            peft_logits if name == "peft-lora" else ft.last_token_logits,
        )
        for name, model in models.items()
    }
    profiles = step_profile.profile_variants(setups, batches, device)
    for name, profile in profiles.items():
        print(f"  {name}: {sum(profile['ms'].values()):.2f} ms per step", flush=True)
    header = (
        f"{datetime.date.today().isoformat()} · {device_name(device)} · torch {torch.__version__} "
        f"· {torch.get_num_threads()} thread(s) · {args.preset} ({base_note.split(' (')[0]}), "
        f"batch {recipe.batch_size}, LoRA r={RANK}; each phase the median of 50 steps after 10, "
        "the variants' steps interleaved; operators from 20 profiled steps"
    )
    table = header + "\n\n" + step_profile.format_profile(profiles)
    print("\n" + table)
    step_profile.update_readme(table)
    return profiles


def lever_study(base, context, device, recipe, rounds: int = 2) -> list[dict]:
    """ours-lora as it is, then with each lever flipped on its own (seed 123): every run once
    per round in turn, each row the fastest of its ``rounds`` runs (as the seeds above)."""
    threads = torch.get_num_threads()
    flipped = {"ours-lora": lv.OURS, **lv.lever_study_levers(device)}
    study = {label: (levers, threads) for label, levers in flipped.items()}
    if device.type == "cpu" and threads > 1:
        study[f"with 1 thread, not {threads}"] = (lv.OURS, 1)
    runs: dict[str, list[dict]] = {label: [] for label in study}
    for _ in range(rounds):
        for label, (levers, n_threads) in study.items():
            torch.set_num_threads(n_threads)
            try:
                runs[label].append(
                    measure(label, "ours-lora", levers, base, context, device, recipe)
                )
            except Exception as err:  # torch.compile needs a working compiler toolchain
                print(f"  {label}: failed ({type(err).__name__}: {str(err)[:200]})")
            finally:
                torch.set_num_threads(threads)
    rows = [combine(label, r, context["matmul_gflops"]) for label, r in runs.items() if r]
    ours = rows[0]
    print("\nWhat each lever is worth (ours-lora; x ours: its seconds over ours'):")
    for row in rows:
        slower = row["seconds"] / ours["seconds"]
        print(
            f"  {row['variant']:28s} {row['seconds']:8.2f} s {slower:6.2f}x ours, "
            f"unseen test accuracy {row['unseen_test_acc']:.2f} %"
        )
    return rows


if __name__ == "__main__":
    main()
