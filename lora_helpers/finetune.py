"""Fine-tuning the GPT as a spam classifier (notebook 06).

The vocabulary head is replaced by a 2-class head that reads the hidden state of each message's
last real token. Five ways to fine-tune are compared on the same split and budget: the head
only, the last block + head, every weight, and LoRA at rank 8 and 16 (+ head) on the blocks
and the token embedding.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import tiktoken
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader

from .data import LABEL_IDS, Message, MessageDataset
from .device import PeakMemory, capabilities
from .fast import adamw
from .lora import LoRAConfig
from .lora_model import apply_lora, freeze_except_lora
from .model import GPTModel, eval_mode
from .params import count_parameters
from .settings import artifacts_dir, is_quick
from .train import History, LossFn, Schedule, train
from .trunk import cached_accuracy, cached_loaders, cached_loss, cut_point

# Every linear layer of the blocks, and the token embedding: in a small model the embedding
# table holds most weights and what single words ("FREE", "£") mean (notebook 06).
LORA_TARGETS = ("tok_emb", "blocks")
LORA_VARIANTS = {  # alpha = rank: the update is scaled by 1 at either rank
    "lora-r8": LoRAConfig(rank=8, alpha=8, targets=LORA_TARGETS),
    "lora-r16": LoRAConfig(rank=16, alpha=16, targets=LORA_TARGETS),
}
VARIANTS = ("head", "last-block", "full", *LORA_VARIANTS)
EVAL_BATCH_SIZE = 64  # evaluation stores no activations for backward: larger batches fit
LABEL_NAMES = {index: name for name, index in LABEL_IDS.items()}


@dataclass(frozen=True)
class FinetuneRecipe:
    """The budget shared by every variant, each variant's learning rate, and the LoRA variants'
    configurations (rank, alpha, targets)."""

    epochs: int = 5
    batch_size: int = 8
    weight_decay: float = 0.01
    learning_rates: dict[str, float] = field(
        default_factory=lambda: {"head": 1e-3, "last-block": 3e-4, "full": 1e-4, "lora": 1e-3}
    )
    lora_variants: dict[str, LoRAConfig] = field(default_factory=lambda: dict(LORA_VARIANTS))
    max_messages: int | None = None  # per split (quick mode only)
    seed: int = 123

    def learning_rate(self, variant: str) -> float:
        return self.learning_rates["lora" if variant in self.lora_variants else variant]

    def with_lora_targets(self, targets: str | tuple[str, ...]) -> FinetuneRecipe:
        """This recipe with every LoRA variant on other ``targets`` (e.g. ``"blocks"``)."""
        lora = {name: replace(c, targets=targets) for name, c in self.lora_variants.items()}
        return replace(self, lora_variants=lora)


FULL_FINETUNE = FinetuneRecipe()
QUICK_FINETUNE = FinetuneRecipe(epochs=1, max_messages=48)


def finetune_recipe() -> FinetuneRecipe:
    """QUICK_FINETUNE when ``LORA_QUICK=1``, else FULL_FINETUNE."""
    return QUICK_FINETUNE if is_quick() else FULL_FINETUNE


def shrink_split(
    split: dict[str, list[Message]], max_messages: int | None
) -> dict[str, list[Message]]:
    """The first ``max_messages`` of every part of the split (quick mode), or the split itself."""
    if max_messages is None:
        return split
    return {name: rows[:max_messages] for name, rows in split.items()}


def add_classification_head(model: GPTModel, num_classes: int = 2) -> GPTModel:
    """Replace the vocabulary head by a fresh ``num_classes`` head (no longer tied), in place."""
    model.out_head = nn.Linear(model.cfg.emb_dim, num_classes).to(model.tok_emb.weight.device)
    return model


def last_token_logits(
    model: GPTModel, input_ids: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """Class logits read at each message's last real token, never at a padding position.

    With causal attention, that position has seen the whole message and none of the padding
    after it, so the result does not depend on how much padding the batch needed. The last
    block computes only that position (``hidden_states(ids, last)``): the same logits, about a
    fifth less work in a 4-block model.
    """
    last = lengths.to(input_ids.device, non_blocking=True) - 1
    return model.out_head(model.hidden_states(input_ids, last))


def classification_loss(
    model: nn.Module,
    batch: tuple[torch.Tensor, ...],
    device: torch.device,
) -> torch.Tensor:
    """Cross-entropy of the last-token logits (``last_token_logits``) against the labels."""
    input_ids, lengths, labels = batch
    logits = last_token_logits(model, input_ids.to(device, non_blocking=True), lengths)
    return F.cross_entropy(logits.float(), labels.to(device, non_blocking=True))


@torch.inference_mode()
def predict(
    model: nn.Module, loader: DataLoader, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted and true label ids for every message of ``loader``, in order (in eval mode;
    the model's mode is restored afterwards)."""
    caps = capabilities(device)
    predictions, truth = [], []
    with eval_mode(model):
        for input_ids, lengths, labels in loader:
            with caps.autocast():
                logits = last_token_logits(model, input_ids.to(device), lengths)
            predictions.append(logits.argmax(dim=-1).cpu())
            truth.append(labels)
    return torch.cat(predictions), torch.cat(truth)


def accuracy(model: GPTModel, loader: DataLoader, device: torch.device) -> float:
    """Share of correctly classified messages."""
    predictions, truth = predict(model, loader, device)
    return (predictions == truth).float().mean().item()


def classify(
    model: GPTModel, text: str, tokenizer: tiktoken.Encoding, device: torch.device
) -> tuple[str, float]:
    """The predicted label of one message and the model's probability for it."""
    if not text.strip():
        raise ValueError(
            f"Cannot classify an empty or whitespace-only message ({text!r}): there is no token "
            "to read the prediction from. Pass the message's text."
        )
    ids = tokenizer.encode(text)[: model.cfg.context_length]
    input_ids = torch.tensor([ids], device=device)
    with torch.no_grad(), eval_mode(model):
        probs = torch.softmax(last_token_logits(model, input_ids, torch.tensor([len(ids)])), -1)
    label = int(probs.argmax())
    return LABEL_NAMES[label], probs[0, label].item()


def prepare_variant(base: GPTModel, variant: str, recipe: FinetuneRecipe) -> GPTModel:
    """A copy of ``base`` with a new 2-class head and only ``variant``'s parameters trainable."""
    known = ("head", "last-block", "full", *recipe.lora_variants)
    if variant not in known:
        raise ValueError(f"Unknown variant {variant!r}; choose one of {known}")
    torch.manual_seed(recipe.seed)  # the same head (and LoRA) initialisation for every variant
    model = add_classification_head(copy.deepcopy(base))
    if variant == "full":
        model.requires_grad_(True)
    elif variant == "head":
        freeze_except_lora(model, also_train=["out_head"])
    elif variant == "last-block":
        last = f"trf_blocks.{model.cfg.n_layers - 1}"
        freeze_except_lora(model, also_train=[last, "final_norm", "out_head"])
    else:
        apply_lora(model, recipe.lora_variants[variant], also_train=["out_head"])
    return model


def in_order(loader: DataLoader, batch_size: int) -> DataLoader:
    """A loader of ``loader``'s whole dataset in its stored order, with its collate function:
    for evaluating on training data without drawing from the generator training shuffles with."""
    return DataLoader(loader.dataset, batch_size=batch_size, collate_fn=loader.collate_fn)


def by_length(loader: DataLoader, batch_size: int = EVAL_BATCH_SIZE) -> DataLoader:
    """A loader of ``loader``'s messages sorted by length, in batches of ``batch_size``: for a
    loss or an accuracy over all of them, which the order does not change, with the least
    padding and few batches. Draws nothing from the training shuffle's generator."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    lengths = [len(ids) for ids in loader.dataset.ids]
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return DataLoader(loader.dataset, batch_sampler=batches, collate_fn=loader.collate_fn)


def finetune(
    model: nn.Module,
    loaders: dict[str, DataLoader],
    device: torch.device,
    recipe: FinetuneRecipe,
    lr: float,
    loss_fn: LossFn = classification_loss,
    cache_trunk: bool = True,
    **train_options,
) -> History:
    """AdamW (``fast.adamw``) on the trainable parameters for ``recipe.epochs`` epochs with
    ``train.train``, evaluating every epoch: the validation loss, and the training/validation
    accuracy in ``history.metrics`` (under torchrun, rank 0 measures them, the training
    accuracy on every training message). Both
    read the messages sorted by length (``by_length``), never through the shuffling loader:
    that would draw a shuffle from its generator and change every later epoch's batches (under
    torchrun, on rank 0 alone). ``train_options`` go to ``train`` (``progress=False``,
    ``saving=Saving(...)``).

    When only the top trains (head only, last block) and ``cache_trunk``, the frozen part runs
    once per message (``lora_helpers.trunk``) and the top trains on its cached output: the
    same batches and the same math, far fewer computations. ``history.seconds`` includes that
    pass."""
    start = time.perf_counter()
    cacheable = isinstance(loaders["train"].dataset, MessageDataset)  # messages, not features
    use_cache = cache_trunk and cacheable and loss_fn is classification_loss
    cut = cut_point(model) if use_cache else None
    score = accuracy
    if cut is not None:
        loaders = cached_loaders(
            model, {k: loaders[k] for k in ("train", "validation")}, device, cut
        )
        loss_fn, score = partial(cached_loss, cut=cut), partial(cached_accuracy, cut=cut)
    if cacheable and cut is None:
        train_eval, validation = by_length(loaders["train"]), by_length(loaders["validation"])
    else:
        train_eval = in_order(loaders["train"], recipe.batch_size)
        validation = loaders["validation"]
    cache_seconds = time.perf_counter() - start
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, lr, recipe.weight_decay, device)
    steps_per_epoch = len(loaders["train"])
    loaders["train"].batch_sampler.generator.manual_seed(recipe.seed)  # same batches, same order

    def measure_accuracies(m: nn.Module) -> dict[str, float]:
        return {
            "train_acc": score(m, train_eval, device),
            "val_acc": score(m, validation, device),
        }

    history = train(
        model,
        loaders["train"],
        validation,
        optimizer,
        device,
        Schedule(recipe.epochs * steps_per_epoch, steps_per_epoch),
        loss_fn=loss_fn,
        eval_metrics=measure_accuracies,
        **train_options,
    )
    history.seconds += cache_seconds  # the frozen part's one pass is part of the run's cost
    return history


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a fine-tuning run must save: the trainable parameters (the rest is the base)."""
    return {
        n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad
    }


def saved_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Size on disk of ``tensors`` written as a safetensors file."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weights.safetensors"
        save_file(tensors, str(path))
        return path.stat().st_size


def unseen_test_mask(split: dict[str, list[Message]]) -> torch.Tensor:
    """True for test messages whose exact text occurs in no training message (the collection
    has many duplicates). Pretraining never sees test texts (see ``sms_pretraining_texts``)."""
    seen = {text for _, text in split["train"]}
    return torch.tensor([text not in seen for _, text in split["test"]])


def accuracy_on_test(
    model: nn.Module,
    loaders: dict[str, DataLoader],
    split: dict[str, list[Message]],
    device: torch.device,
) -> tuple[float, float]:
    """Accuracy on every test message, and on the unseen ones (``unseen_test_mask``)."""
    predictions, truth = predict(model, loaders["test"], device)
    correct = predictions == truth
    return correct.float().mean().item(), correct[unseen_test_mask(split)].float().mean().item()


@dataclass
class VariantResult:
    """One row of notebook 06's comparison table."""

    variant: str
    test_acc: float
    unseen_test_acc: float
    trainable_params: int
    peak_mem_mib: float | None  # above the start: allocator peak on a GPU, RSS on a CPU
    seconds: float
    saved_mib: float
    history: History


def run_variant(
    base: GPTModel,
    variant: str,
    loaders: dict[str, DataLoader],
    split: dict[str, list[Message]],
    device: torch.device,
    recipe: FinetuneRecipe,
) -> tuple[GPTModel, VariantResult]:
    """Prepare, fine-tune and measure one variant. Keep ``base`` on the CPU: the peak memory
    measured (``PeakMemory``: the GPU allocator's, or the CPU's resident memory) is then what
    this variant adds, from its copy of the model to its gradients, optimizer and activations."""
    with PeakMemory(device) as peak:
        model = prepare_variant(base, variant, recipe).to(device)
        history = finetune(model, loaders, device, recipe, recipe.learning_rate(variant))
    test_acc, unseen_test_acc = accuracy_on_test(model, loaders, split, device)
    result = VariantResult(
        variant=variant,
        test_acc=test_acc,
        unseen_test_acc=unseen_test_acc,
        trainable_params=count_parameters(model, trainable_only=True),
        peak_mem_mib=peak.mib,
        seconds=history.seconds,
        saved_mib=saved_bytes(trainable_state_dict(model)) / 2**20,
        history=history,
    )
    return model, result


def spam_adapter_dir() -> Path:
    """Where notebook 06 saves its LoRA spam filter as an adapter (used by notebook 08)."""
    return artifacts_dir() / "adapters" / "spam-filter"


def results_path() -> Path:
    """Where notebook 06 saves its comparison for later notebooks (``artifacts/``)."""
    return artifacts_dir() / "finetune_results.json"


def save_results(results: list[VariantResult], device: torch.device) -> Path:
    """Save the comparison's runs (without training histories) and the device they ran on."""
    rows = [{k: v for k, v in asdict(r).items() if k != "history"} for r in results]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    path = results_path()
    path.write_text(json.dumps({"device": name, "results": rows}, indent=2))
    return path


def load_results() -> dict | None:
    """The comparison saved by notebook 06, or None if it has not been run here."""
    path = results_path()
    return json.loads(path.read_text()) if path.exists() else None
