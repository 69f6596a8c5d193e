"""What pretraining buys (notebook 06): the same fine-tuning from the pretrained base and from
the same architecture with random weights, on labelled training sets of several sizes.

Every run takes the same number of optimizer steps whatever the size of its training set (a
small set is seen for many epochs, the whole split for a few), so each comparison is at equal
compute; validation and test messages are always the whole splits.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import tiktoken
import torch
from tqdm.auto import tqdm

from .data import Message, message_loaders
from .fast import adamw
from .finetune import FinetuneRecipe, accuracy_on_test, classification_loss, prepare_variant
from .model import GPTModel
from .settings import is_quick
from .train import Schedule, train

# What trains in each method: notebook 06's variant and LoRA targets.
METHODS: dict[str, tuple[str, str | tuple[str, ...]]] = {
    "LoRA, blocks": ("lora-r8", "blocks"),
    "LoRA, blocks + embedding": ("lora-r8", ("tok_emb", "blocks")),
    "full fine-tuning": ("full", "blocks"),
}
BASES = ("pretrained", "random")


@dataclass(frozen=True)
class TransferRecipe:
    """Labelled-set sizes (``None``: every training message), seeds and steps per run."""

    sizes: tuple[int | None, ...] = (32, 128, None)
    seeds: tuple[int, ...] = (123, 124, 125)
    steps: int = 200


FULL_TRANSFER = TransferRecipe()
QUICK_TRANSFER = TransferRecipe(sizes=(16, None), seeds=(123, 124), steps=6)


def transfer_recipe() -> TransferRecipe:
    """QUICK_TRANSFER when ``LORA_QUICK=1``, else FULL_TRANSFER."""
    return QUICK_TRANSFER if is_quick() else FULL_TRANSFER


def labelled_subset(train_split: list[Message], size: int | None, seed: int) -> list[Message]:
    """``size`` training messages, half spam and half ham, drawn with ``seed`` (the whole
    split for ``None`` or a size at least as large)."""
    if size is None or size >= len(train_split):
        return list(train_split)
    if size < 2:
        raise ValueError(f"size must be at least 2 (one message of each class), got {size}")
    rng = random.Random(seed)
    spam = [m for m in train_split if m[0] == "spam"]
    ham = [m for m in train_split if m[0] != "spam"]
    picked = rng.sample(spam, size // 2) + rng.sample(ham, size - size // 2)
    rng.shuffle(picked)
    return picked


def random_base(like: GPTModel, seed: int) -> GPTModel:
    """A model of ``like``'s architecture with fresh random weights (GPT-2's init)."""
    torch.manual_seed(seed)
    return GPTModel(like.cfg)


@dataclass
class TransferResult:
    """One fine-tuning run of the experiment."""

    method: str
    base: str  # "pretrained" or "random"
    size: int  # labelled training messages
    seed: int
    test_acc: float
    unseen_test_acc: float


def transfer_run(
    base: GPTModel,
    method: str,
    split: dict[str, list[Message]],
    tokenizer: tiktoken.Encoding,
    device: torch.device,
    recipe: FinetuneRecipe,
    steps: int,
) -> tuple[float, float]:
    """Fine-tune a copy of ``base`` with ``method`` for ``steps`` steps on ``split["train"]``;
    the accuracy on the test split and on its unseen messages."""
    variant, targets = METHODS[method]
    model = prepare_variant(base, variant, recipe.with_lora_targets(targets))
    model = model.to(device)
    loaders = message_loaders(
        split, tokenizer, recipe.batch_size, base.cfg.context_length, device, recipe.seed
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, recipe.learning_rate(variant), recipe.weight_decay, device)
    train(
        model,
        loaders["train"],
        loaders["validation"],
        optimizer,
        device,
        Schedule(steps, steps, eval_batches=1),  # the history is unused: one short evaluation
        loss_fn=classification_loss,
        progress=False,
    )
    return accuracy_on_test(model, loaders, split, device)


def run_transfer(
    pretrained: GPTModel,
    split: dict[str, list[Message]],
    tokenizer: tiktoken.Encoding,
    device: torch.device,
    recipe: FinetuneRecipe,
    transfer: TransferRecipe,
) -> list[TransferResult]:
    """Every method × base × labelled-set size × seed, with one progress bar. A seed draws the
    labelled subset, the random base's weights and the head's (and LoRA's) initialisation."""
    seeded = [dataclasses.replace(recipe, seed=seed) for seed in transfer.seeds]
    bar = tqdm(total=len(seeded) * len(BASES) * len(transfer.sizes) * len(METHODS), desc="runs")
    results = []
    for run_recipe in seeded:
        seed = run_recipe.seed
        for base_name in BASES:
            base = pretrained if base_name == "pretrained" else random_base(pretrained, seed)
            for size in transfer.sizes:
                subset = {**split, "train": labelled_subset(split["train"], size, seed)}
                for method in METHODS:
                    accs = transfer_run(
                        base, method, subset, tokenizer, device, run_recipe, transfer.steps
                    )
                    n = len(subset["train"])
                    results.append(TransferResult(method, base_name, n, seed, *accs))
                    bar.update()
    bar.close()
    return results


def accuracies(results: list[TransferResult], method: str, base: str, size: int) -> list[float]:
    """The test accuracies of one cell of the experiment, one per seed, in seed order."""
    rows = [r for r in results if (r.method, r.base, r.size) == (method, base, size)]
    return [r.test_acc for r in sorted(rows, key=lambda r: r.seed)]
