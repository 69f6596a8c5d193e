"""Levers for a stronger base in the same wall time: each pretrains notebook 04's model from the
same initialisation for the same number of seconds, then measures the validation loss over the
whole vocabulary on both corpora (the lower, the better the base), against the reference recipe
(batch 32) in the same run. The ``batch 16`` lever paid and is notebook 04's recipe now
(``PretrainRecipe``); ``results/pretrain_levers_cpu.md`` holds the table measured on a 2-core CPU.

    python -m benchmarks.pretrain_levers                 # 240 s per lever
    python -m benchmarks.pretrain_levers --seconds 710   # notebook 04's whole budget

The learning-rate schedule (warm-up, then cosine) follows the elapsed share of the budget, so
every lever gets a complete schedule however many steps it fits. The levers:

- ``corpus-vocabulary head``: during training the softmax runs over the token ids that occur in
  the training text only (the others are never a target), a third of the 50,257-way product;
  evaluation still uses the whole vocabulary;
- ``batch 16``: twice the steps of half as many tokens;
- ``learning rate 3e-3``: a higher peak learning rate.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from lora_helpers.device import capabilities, get_device
from lora_helpers.fast import adamw
from lora_helpers.model import GPTModel, gpt_config
from lora_helpers.pretrain import PretrainRecipe, pretraining_corpora, pretraining_loaders
from lora_helpers.tokenizer import get_tokenizer
from lora_helpers.train import evaluate

REFERENCE = PretrainRecipe(batch_size=32, max_steps=200, warmup_steps=20, eval_every=25)
LEVERS = {
    "batch 32 (reference)": {},
    "corpus-vocabulary head": {"corpus_head": True},
    "batch 16": {"batch_size": 16},
    "learning rate 3e-3": {"lr": 3e-3},
}


def corpus_head_loss(model: GPTModel, inputs, targets, keep: torch.Tensor, index: torch.Tensor):
    """Cross-entropy over the kept token ids only (``index`` maps a token id to its column)."""
    weight = model.out_head.weight.index_select(0, keep)
    logits = F.linear(model.hidden_states(inputs), weight)
    return F.cross_entropy(logits.flatten(0, 1).float(), index[targets].flatten())


def pretrain_for(
    seconds: float, recipe: PretrainRecipe, corpus_head: bool, device: torch.device
) -> tuple[int, dict[str, float]]:
    """Pretrain from the recipe's initialisation for ``seconds``; the steps taken and the
    validation loss per corpus and over both."""
    torch.manual_seed(recipe.seed)
    model = GPTModel(gpt_config(recipe.preset, drop_rate=recipe.dropout)).to(device)
    corpora = pretraining_corpora(get_tokenizer(), recipe)
    train_loader, val_loaders = pretraining_loaders(corpora, model.cfg.context_length, recipe)
    keep = torch.cat([c["train"] for c in corpora.values()]).unique().to(device)
    index = torch.zeros(model.cfg.vocab_size, dtype=torch.long, device=device)
    index[keep] = torch.arange(len(keep), device=device)
    optimizer = adamw(model.parameters(), recipe.lr, recipe.weight_decay, device)
    warmup = recipe.warmup_steps / recipe.max_steps  # the same share of the run as the recipe's
    model.train()
    caps, step, start = capabilities(device), 0, time.perf_counter()
    batches = iter(train_loader)
    while (elapsed := time.perf_counter() - start) < seconds:
        progress = elapsed / seconds
        factor = (
            progress / warmup
            if progress < warmup
            else 0.1 + 0.45 * (1 + math.cos(math.pi * (progress - warmup) / (1 - warmup)))
        )
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr * max(factor, 0.01)
        try:
            inputs, targets = (t.to(device) for t in next(batches))
        except StopIteration:
            batches = iter(train_loader)
            continue
        with caps.autocast(large_products=True):
            if corpus_head:
                loss = corpus_head_loss(model, inputs, targets, keep, index)
            else:
                loss = F.cross_entropy(model(inputs).flatten(0, 1).float(), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
    losses = {name: evaluate(model, loader, device) for name, loader in val_loaders.items()}
    sizes = {name: len(loader.dataset) for name, loader in val_loaders.items()}
    losses["both"] = sum(losses[n] * sizes[n] for n in sizes) / sum(sizes.values())
    return step, losses


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=240.0, help="wall time per lever")
    parser.add_argument("--only", nargs="*", default=None, help="levers to run (names)")
    args = parser.parse_args(argv)
    device = get_device()
    base = REFERENCE
    rows = []
    for name, change in LEVERS.items():
        if args.only and name not in args.only and change:
            continue
        corpus_head = change.get("corpus_head", False)
        recipe = replace(base, **{k: v for k, v in change.items() if k != "corpus_head"})
        steps, losses = pretrain_for(args.seconds, recipe, corpus_head, device)
        rows.append((name, steps, steps * recipe.batch_size * 128, losses))
        print(f"  {name}: {steps} steps, validation loss {losses['both']:.3f}", flush=True)
    reference = rows[0][3]["both"]
    print(f"\nSame wall time per lever: {args.seconds:.0f} s on {device.type}")
    print(f"| lever | steps | tokens | val loss, both | SMS | Shakespeare | vs {rows[0][0]} |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, steps, tokens, losses in rows:
        print(
            f"| {name} | {steps} | {tokens:,} | {losses['both']:.3f} | {losses['sms']:.3f} | "
            f"{losses['shakespeare']:.3f} | {losses['both'] - reference:+.3f} |"
        )


if __name__ == "__main__":
    main()
