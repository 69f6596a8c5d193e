"""How fast does our spam classifier fine-tune? Naive LoRA, our fast path, full, PEFT (issue 7).

One process, the same data, the same seed and the same base for every variant:

1. ``naive-lora``: the LoRA layer exactly as notebook 05 first shows it (``alpha * (x @ A @ B)``)
   on every linear layer of the blocks, fp32, explicit attention, every message padded to the
   training set's longest, the head on every position, plain AdamW, ``loss.item()`` each step
   (``lora_helpers.fast.NAIVE``);
2. ``fast-lora``: our default path, ``finetune.prepare_variant(base, "lora-r16")`` (rank 16,
   alpha 16, every linear layer of the blocks) trained with ``lora_helpers.fast.FAST``;
3. ``fast-full``: every weight trained on the same fast path;
4. ``peft-lora``: Hugging Face PEFT LoRA (rank 16, alpha 16 on c_attn, c_proj, c_fc) on
   transformers' GPT2ForSequenceClassification, given the same batches, bf16 autocast and fused
   AdamW as the fast path; skipped when peft or transformers is not installed.

The base is a freshly initialised GPT (speed does not depend on the weights' values) with a new
2-class head; batch size 8, AdamW with weight decay 0.01 and gradient clipping at 1, lr 1e-3
for LoRA and 1e-4 for full fine-tuning (notebook 06's recipe). ``seconds`` is the wall time from
the model sitting on the device to the end of its last optimizer step: optimizer creation, data
collation and copies, warm-up, graph capture and compilation included. ``test_acc`` (percent)
is measured afterwards on the test messages, ``peak_mem_mib`` over training and test.

    python -m benchmarks.finetune_speed                     # the issue's run (GPT-2 124M, GPU)
    python -m benchmarks.finetune_speed --cuda-graphs       # the fast path with CUDA graphs
    python -m benchmarks.finetune_speed --lever-study       # what each lever is worth
    python -m benchmarks.finetune_speed --preset scratch-30M --epochs 1 --out .../cpu.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import math
import re
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lora_helpers import finetune as ft
from lora_helpers.data import PAD_ID, MessageDataset, sms_spam_split
from lora_helpers.device import get_device
from lora_helpers.fast import (
    FAST,
    FAST_GRAPHED,
    NAIVE,
    Levers,
    accuracy_percent,
    classification_loader,
    lever_study_levers,
    train_classifier,
)
from lora_helpers.model import PRESETS, GPTModel, gpt_config
from lora_helpers.params import count_parameters
from lora_helpers.tokenizer import get_tokenizer
from lora_helpers.train import adamw

VARIANTS = ("naive-lora", "fast-lora", "fast-full", "peft-lora")
RESULT_KEYS = (
    "variant",
    "seconds",
    "examples_per_s",
    "peak_mem_mib",
    "trainable_params",
    "test_acc",
)
RESULTS_DIR = Path(__file__).resolve().parent / "results"
RANK = ALPHA = 16
BATCH_SIZE = 8
RECIPE = ft.FinetuneRecipe(batch_size=BATCH_SIZE)  # notebook 06's learning rates, seed 123


# --- the seed's LoRA layer, exactly as notebook 05 first shows it ----------------------------


class LoRALayer(torch.nn.Module):
    def __init__(self, in_dim, out_dim, rank, alpha):
        super().__init__()
        self.A = torch.nn.Parameter(torch.empty(in_dim, rank))
        torch.nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = torch.nn.Parameter(torch.zeros(rank, out_dim))
        self.alpha = alpha

    def forward(self, x):
        return self.alpha * (x @ self.A @ self.B)


class LinearWithLoRA(torch.nn.Module):
    def __init__(self, linear, rank, alpha):
        super().__init__()
        self.linear = linear
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha)

    def forward(self, x):
        return self.linear(x) + self.lora(x)


def replace_linear_with_lora(model, rank, alpha):
    for name, module in model.named_children():
        if isinstance(module, torch.nn.Linear):
            setattr(model, name, LinearWithLoRA(module, rank, alpha))
        else:
            replace_linear_with_lora(module, rank, alpha)


# --- the four variants -----------------------------------------------------------------------


def naive_lora_model(base: GPTModel, seed: int) -> GPTModel:
    """The seed's layer on every linear layer of the blocks; the new head trains too."""
    torch.manual_seed(seed)  # the same head as prepare_variant gives the fast variants
    model = ft.add_classification_head(copy.deepcopy(base))
    model.requires_grad_(False)
    replace_linear_with_lora(model.trf_blocks, RANK, ALPHA)
    model.out_head.requires_grad_(True)
    return model


def peft_available() -> bool:
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def peft_lora_model(base: GPTModel, seed: int) -> torch.nn.Module:
    """transformers' GPT-2 classifier with our base's shape (random init), PEFT LoRA on it."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2ForSequenceClassification

    cfg = base.cfg
    config = GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.context_length,
        n_embd=cfg.emb_dim,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        num_labels=2,
        pad_token_id=PAD_ID,
        use_cache=False,
    )
    torch.manual_seed(seed)
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    lora = LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        target_modules=["c_attn", "c_proj", "c_fc"],
        lora_dropout=0.0,
        fan_in_fan_out=True,  # GPT-2's Conv1D layers store their weights transposed
        modules_to_save=["score"],
        task_type="SEQ_CLS",
    )
    return get_peft_model(GPT2ForSequenceClassification(config), lora)


def peft_logits(model: torch.nn.Module, input_ids: torch.Tensor, lengths: torch.Tensor):
    """transformers pools at the last token that is not ``pad_token_id``; it gets the mask too."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    attention_mask = (positions < lengths[:, None]).long()
    return model(input_ids=input_ids, attention_mask=attention_mask).logits


# --- measuring -------------------------------------------------------------------------------


@dataclass
class Data:
    train: MessageDataset
    test: MessageDataset
    longest: int  # the training set's longest message, in tokens (naive padding)


def load_data(context_length: int, max_messages: int | None) -> Data:
    split = ft.shrink_split(sms_spam_split(), max_messages)
    tokenizer = get_tokenizer()
    train = MessageDataset(split["train"], tokenizer, context_length)
    test = MessageDataset(split["test"], tokenizer, context_length)
    return Data(train, test, max(len(ids) for ids in train.ids))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(device: torch.device) -> None:
    """Pay the process's one-time costs before the first variant: the CUDA context, the math
    libraries' handles, torch.optim's first use (about a second of imports). No variant is
    charged for them; each still pays for its own kernels' first use."""
    x = torch.randn(64, 64, device=device, requires_grad=True)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for t in (x, x.to(dtype)):
        (t @ t).sum().backward()
    q = torch.randn(1, 2, 16, 64, device=device, dtype=dtype)
    torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    torch.optim.AdamW([x]).step()
    adamw([x], 1e-3, 0.0, device).step()
    synchronize(device)


def measure(
    name: str,
    model: torch.nn.Module,
    levers: Levers,
    lr: float,
    data: Data,
    device: torch.device,
    epochs: int,
    seed: int,
    logits_fn=None,
) -> dict:
    """Fine-tune ``model`` on ``device`` with ``levers``; one result row."""
    train_loader = classification_loader(data.train, BATCH_SIZE, levers, True, data.longest, seed)
    test_loader = classification_loader(data.test, BATCH_SIZE, levers, False, data.longest)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model.to(device)
    synchronize(device)
    torch.manual_seed(seed)
    start = time.perf_counter()
    train_classifier(model, train_loader, device, epochs, lr, levers, logits_fn=logits_fn)
    synchronize(device)
    seconds = time.perf_counter() - start
    test_acc = accuracy_percent(model, test_loader, device, levers, logits_fn)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    examples = epochs * len(train_loader) * BATCH_SIZE
    row = {
        "variant": name,
        "seconds": round(seconds, 3),
        "examples_per_s": round(examples / seconds, 1),
        "peak_mem_mib": None if peak is None else round(peak, 1),
        "trainable_params": count_parameters(model, trainable_only=True),
        "test_acc": round(test_acc, 2),
    }
    print(f"  {name}: {row['seconds']:.2f} s, test accuracy {row['test_acc']:.2f} %", flush=True)
    return row


def run_variant(
    variant: str, base: GPTModel, data: Data, device: torch.device, fast: Levers, args
) -> dict:
    lora_lr, full_lr = RECIPE.learning_rate("lora-r16"), RECIPE.learning_rate("full")
    common = {"data": data, "device": device, "epochs": args.epochs, "seed": args.seed}
    if variant == "naive-lora":
        return measure(variant, naive_lora_model(base, args.seed), NAIVE, lora_lr, **common)
    if variant == "fast-lora":
        model = ft.prepare_variant(base, "lora-r16", RECIPE)
        return measure(variant, model, fast, lora_lr, **common)
    if variant == "fast-full":
        return measure(variant, ft.prepare_variant(base, "full", RECIPE), fast, full_lr, **common)
    if variant == "peft-lora":
        levers = replace(fast, cuda_graphs=False, compile=False, pad_multiple=1)
        model = peft_lora_model(base, args.seed)
        return measure(variant, model, levers, lora_lr, logits_fn=peft_logits, **common)
    raise ValueError(f"Unknown variant {variant!r}; choose from {VARIANTS}")


def lever_study(
    base: GPTModel, data: Data, device: torch.device, fast: Levers, args, all_on: dict | None
) -> list[dict]:
    """fast-lora as it is, then with each lever switched off (or on) on its own."""
    lr = RECIPE.learning_rate("lora-r16")
    common = {"data": data, "device": device, "epochs": args.epochs, "seed": args.seed}
    runs = lever_study_levers(fast, device)
    if all_on is None:
        model = ft.prepare_variant(base, "lora-r16", RECIPE)
        all_on = measure("fast-lora", model, fast, lr, **common)
    rows = [{**all_on, "variant": "fast-lora"}]
    for label, levers in runs.items():
        model = ft.prepare_variant(base, "lora-r16", RECIPE)
        rows.append(measure(label, model, levers, lr, **common))
    print(f"\nWhat each lever is worth (fast-lora, {args.preset}, {args.epochs} epoch(s)):")
    print(f"{'run':32s} {'seconds':>9s} {'x fast':>9s} {'peak MiB':>9s} {'test acc %':>11s}")
    for row in rows:
        slower = row["seconds"] / rows[0]["seconds"]
        peak = "-" if row["peak_mem_mib"] is None else f"{row['peak_mem_mib']:.0f}"
        print(
            f"{row['variant']:32s} {row['seconds']:9.2f} {slower:9.2f} {peak:>9s} "
            f"{row['test_acc']:11.2f}"
        )
    return rows


# --- reporting -------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def slug(name: str) -> str:
    """A file name from a device name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def format_table(rows: list[dict]) -> str:
    lines = [
        f"{'variant':12s} {'seconds':>9s} {'examples/s':>11s} {'peak MiB':>9s} "
        f"{'trainable':>12s} {'test acc %':>11s}"
    ]
    for r in rows:
        peak = "-" if r["peak_mem_mib"] is None else f"{r['peak_mem_mib']:.0f}"
        lines.append(
            f"{r['variant']:12s} {r['seconds']:9.2f} {r['examples_per_s']:11.1f} {peak:>9s} "
            f"{r['trainable_params']:12,} {r['test_acc']:11.2f}"
        )
    return "\n".join(lines)


def format_summary(rows: list[dict]) -> str:
    """Speed-ups against naive-lora (same run) and the issue's fast-lora comparisons."""
    by_name = {r["variant"]: r for r in rows}
    lines = []
    if "naive-lora" in by_name:
        ref = by_name["naive-lora"]["seconds"]
        others = [r for r in rows if r["variant"] != "naive-lora"]
        speedups = [f"{r['variant']} {ref / r['seconds']:.1f}x" for r in others]
        lines.append("Speed-up vs naive-lora (same run): " + ", ".join(speedups))
    fast = by_name.get("fast-lora")
    for other in ("naive-lora", "fast-full", "peft-lora"):
        if fast and other in by_name:
            faster = by_name[other]["seconds"] / fast["seconds"]
            line = f"fast-lora vs {other}: {faster:.2f}x faster"
            if fast["peak_mem_mib"] and by_name[other]["peak_mem_mib"]:
                share = fast["peak_mem_mib"] / by_name[other]["peak_mem_mib"]
                line += f", {100 * share:.0f}% of its peak memory"
            line += f", test accuracy {fast['test_acc'] - by_name[other]['test_acc']:+.2f} points"
            lines.append(line)
    return "\n".join(lines)


def format_markdown(rows: list[dict], device: torch.device, args) -> str:
    """The README table: the date, device and torch version, then one row per variant."""
    date = datetime.date.today().isoformat()
    head = (
        f"{date} · {device_name(device)} · torch {torch.__version__} · {args.preset}, "
        f"{args.epochs} epoch(s), batch {BATCH_SIZE}, LoRA r={RANK}, alpha={ALPHA}"
    )
    lines = [
        head,
        "",
        "| variant | seconds | examples/s | peak MiB | trainable params | test acc % |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        peak = "–" if r["peak_mem_mib"] is None else f"{r['peak_mem_mib']:.0f}"
        lines.append(
            f"| {r['variant']} | {r['seconds']:.2f} | {r['examples_per_s']:.0f} | {peak} | "
            f"{r['trainable_params']:,} | {r['test_acc']:.1f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="gpt2-124M", choices=sorted(PRESETS))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--max-messages", type=int, default=None, help="per split (smoke runs)")
    parser.add_argument("--out", type=Path, default=None, help="default: results/<device>.json")
    parser.add_argument("--lever-study", action="store_true", help="fast-lora, one lever off")
    parser.add_argument(
        "--cuda-graphs", action="store_true", help="fast path with CUDA graphs (CUDA only)"
    )
    parser.add_argument(
        "--pad-multiple",
        type=int,
        default=None,
        help="round batch lengths up (default 16 with --cuda-graphs, else 1)",
    )
    parser.add_argument("--compile", action="store_true", help="fast path with torch.compile")
    parser.add_argument("--seed", type=int, default=RECIPE.seed)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark; returns the result rows (also written as JSON to ``--out``)."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> list[dict]:
    device = get_device()
    if args.cuda_graphs and device.type != "cuda":
        print("--cuda-graphs needs a CUDA GPU: running the fast path without them")
    fast = FAST_GRAPHED if args.cuda_graphs and device.type == "cuda" else FAST
    fast = replace(fast, compile=args.compile, pad_multiple=args.pad_multiple or fast.pad_multiple)
    torch.manual_seed(args.seed)
    base = GPTModel(gpt_config(args.preset, drop_rate=0.0))  # random init; stays on the CPU
    data = load_data(base.cfg.context_length, args.max_messages)
    print(
        f"{args.preset}: {len(data.train)} training and {len(data.test)} test messages, "
        f"{args.epochs} epoch(s); fast path: {fast}"
    )
    warm_up(device)
    rows = []
    for variant in args.variants:
        if variant == "peft-lora" and not peft_available():
            print("  peft-lora: skipped (pip install peft transformers to include it)")
            continue
        rows.append(run_variant(variant, base, data, device, fast, args))
    print()
    print(format_table(rows))
    print(format_summary(rows))
    print()
    print(format_markdown(rows, device, args))
    out = args.out or RESULTS_DIR / f"{slug(device_name(device))}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([{k: r[k] for k in RESULT_KEYS} for r in rows], indent=2) + "\n")
    print(f"\nWrote {out}")
    if args.lever_study:
        all_on = next((r for r in rows if r["variant"] == "fast-lora"), None)
        lever_study(base, data, device, fast, args, all_on)
    return rows


if __name__ == "__main__":
    main()
