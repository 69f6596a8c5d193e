"""How fast does notebook 06's spam classifier fine-tune? Naive LoRA, ours (LoRA and full), PEFT.

One process, the same base, the same batches (one loader, sampler and seed), the same epochs,
every run through the notebooks' own loop, ``train.train``, as ``finetune.finetune`` calls it
(without its per-epoch accuracies), or, where bf16 autocast or CUDA graphs are off, through the
benchmark's copy of its steps (``benchmarks.levers.own_loop``; the library has no such switch):

1. ``naive-lora``: the LoRA layer exactly as notebook 05 first shows it (``alpha * (x @ A @ B)``)
   on every linear layer of the blocks, with every speed-up switched off
   (``benchmarks.levers.NAIVE``: explicit attention, every message padded to the training set's
   longest, the head on every position, plain AdamW, no autocast, no CUDA graphs);
2. ``ours-lora``: ``finetune.prepare_variant(base, "lora-r16")`` trained by ``finetune.finetune``
   (rank 16, alpha 16, every linear layer of the blocks, q/k/v as three layers; notebook 06's
   recipe also adapts the token embedding, left out here to compare like with like);
3. ``ours-full``: every weight, the same way;
4. ``peft-lora``: Hugging Face PEFT LoRA (rank 16, alpha 16) on ``transformers``'
   GPT2ForSequenceClassification holding the same base weights (``gpt2.to_transformers``)
   and our head's initial weights, trained with a loss that calls it
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
import statistics
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import levers as lv
from benchmarks import step_profile
from benchmarks.flops import matmul_gflops, matmul_params
from benchmarks.fused_qkv import fuse_qkv
from benchmarks.peft_baseline import peft_available, peft_logits, peft_lora_model
from benchmarks.report import (
    RESULTS_DIR,
    device_name,
    format_table,
    format_targets,
    slug,
    update_readme,
)
from lora_helpers import finetune as ft
from lora_helpers.data import message_loaders, sms_spam_split
from lora_helpers.device import PeakMemory, get_device
from lora_helpers.fast import adamw
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
RANK = ALPHA = lv.RANK


# --- measuring -------------------------------------------------------------------------------


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
    logits = peft_logits if variant == "peft-lora" else lv.logits_fn(levers)
    gc.collect()
    with PeakMemory(device) as peak:
        model = build_model(variant, base, recipe).to(device)
        if variant == "peft-lora":  # fused AdamW, bf16 autocast where it pays, no CUDA graphs
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = adamw(params, lr, recipe.weight_decay, device)
            loss_fn = lv.loss_with(peft_logits)
            history = lv.fit(model, loaders, device, recipe, optimizer, loss_fn, graphs=False)
        else:
            history = lv.finetune_with(model, loaders, device, recipe, lr, levers)
    unseen_acc = lv.unseen_accuracy(model, loaders["test"], context["split"], device, logits)
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
    recipe = replace(ft.FULL_FINETUNE.with_lora_targets("blocks"), epochs=args.epochs)
    base, base_note = base_model(args.preset, args.pretrain, recipe.seed)
    split = ft.shrink_split(sms_spam_split(), args.max_messages)
    max_length, tokenizer = base.cfg.context_length, get_tokenizer()
    loaders = message_loaders(split, tokenizer, recipe.batch_size, max_length, device, recipe.seed)
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
    """``benchmarks.step_profile`` on ours-lora, ours-full, peft-lora (when installed),
    notebook 06's LoRA (which also adapts the token embedding) and ours-lora with fused q/k/v
    (``benchmarks.fused_qkv``), on the benchmark's first batches; rewrites its README table."""
    device = get_device()
    recipe = ft.FULL_FINETUNE.with_lora_targets("blocks")
    base, base_note = base_model(args.preset, args.pretrain, recipe.seed)
    split = ft.shrink_split(sms_spam_split(), args.max_messages)
    max_length = base.cfg.context_length
    loaders = message_loaders(split, get_tokenizer(), recipe.batch_size, max_length, device)
    batches = list(loaders["train"])
    warm_up(device)
    models = {
        "ours-lora": build_model("ours-lora", base, recipe),
        "ours-full": build_model("ours-full", base, recipe),
        "notebook 06's LoRA (+ embedding)": ft.prepare_variant(base, "lora-r16", ft.FULL_FINETUNE),
        "ours-lora, fused q/k/v": build_model("ours-lora", base, recipe),
    }
    fuse_qkv(models["ours-lora, fused q/k/v"])
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
