"""The from-scratch base model of the collection: its recipe, its data, and how to get it.

Notebook 04 walks through these steps one by one; later notebooks call ``load_base_model()``,
which loads the saved checkpoint or, if there is none, pretrains it again with a progress bar.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import tiktoken
import torch
from torch.utils.data import ConcatDataset, DataLoader

from .checkpoints import Saving, load_checkpoint, read_checkpoint_metadata
from .data import NextTokenDataset, load_text, sms_pretraining_texts, sms_spam_split
from .downloads import DownloadError
from .fast import adamw
from .gpt2 import load_gpt2
from .model import GPTModel, gpt_config
from .params import count_parameters
from .settings import artifacts_dir, display_path, is_quick
from .tokenizer import END_OF_TEXT, get_tokenizer
from .train import History, Schedule, cosine_schedule, train


@dataclass(frozen=True)
class PretrainRecipe:
    """Model size and training budget for pretraining the base model.

    The default is the collection's base, sized so that a 2-core CPU pretrains it in about ten
    minutes (notebook 04 shows the candidates measured); a GPU runs the very same recipe.
    """

    preset: str = "scratch-7M"
    dropout: float = 0.0  # about four passes over the text: little to regularise (notebook 04)
    # Twice the steps of batch 32 for the same tokens: a lower validation loss (6.205 against
    # 6.233; ``benchmarks/results/pretrain_levers_cpu.md``).
    batch_size: int = 16
    max_steps: int = 400
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 40
    eval_every: int = 50
    val_fraction: float = 0.1
    max_train_tokens: int | None = 105_000  # per corpus: as much Shakespeare as SMS text
    corpora: tuple[str, ...] = ("shakespeare", "sms")  # notebook 06 ablates this choice
    seed: int = 123

    def __post_init__(self) -> None:
        """Refuse values that could only fail later, and unclearly; a list of corpora becomes a
        tuple (a list would name another checkpoint, and pretrain a base that exists)."""
        if isinstance(self.corpora, str) or not self.corpora:
            raise ValueError(
                f"corpora must be a non-empty tuple of names, e.g. ('sms',), got {self.corpora!r}."
            )
        object.__setattr__(self, "corpora", tuple(self.corpora))
        lowest = {"batch_size": 1, "max_steps": 1, "eval_every": 1, "warmup_steps": 0}
        wrong = [
            f"{name} must be an integer >= {low}, got {getattr(self, name)!r}"
            for name, low in lowest.items()
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= low)
        ]
        if not 0 < self.val_fraction < 1:
            wrong.append(f"val_fraction must be between 0 and 1, got {self.val_fraction!r}")
        if self.max_train_tokens is not None and not self.max_train_tokens > 0:
            wrong.append(f"max_train_tokens must be None or positive, got {self.max_train_tokens}")
        if wrong:
            raise ValueError(f"This PretrainRecipe cannot be trained: {'; '.join(wrong)}.")


FULL_RECIPE = PretrainRecipe()
QUICK_RECIPE = PretrainRecipe(
    preset="scratch-tiny",
    batch_size=8,
    max_steps=40,
    lr=3e-3,
    warmup_steps=5,
    eval_every=20,
    max_train_tokens=20_000,
)
# The larger from-scratch base for a GPU (about 3,000 steps of 32 x 256 tokens).
LARGE_RECIPE = PretrainRecipe(
    preset="scratch-30M",
    dropout=0.2,
    max_steps=3000,
    lr=6e-4,
    warmup_steps=100,
    eval_every=100,
    max_train_tokens=None,
)


def pretrain_recipe() -> PretrainRecipe:
    """QUICK_RECIPE when ``LORA_QUICK=1``, else FULL_RECIPE."""
    return QUICK_RECIPE if is_quick() else FULL_RECIPE


def ablation_recipe(corpora: tuple[str, ...]) -> PretrainRecipe:
    """The base's recipe on ``corpora`` with a quarter of its steps: what notebook 04's
    exercises compare, like with like, at a quarter of the cost."""
    recipe = pretrain_recipe()
    return replace(recipe, corpora=corpora, max_steps=recipe.max_steps // 4)


def base_checkpoint_path(recipe: PretrainRecipe | None = None) -> Path:
    """Where the pretrained base model is saved (``artifacts/``, or ``artifacts/quick/``).

    The collection's base is ``gpt_base_scratch``; a base pretrained with another preset,
    other corpora or another number of steps is named after them, e.g.
    ``gpt_base_shakespeare_100steps`` or ``gpt_base_scratch-30M``.
    """
    recipe = recipe or pretrain_recipe()
    default = QUICK_RECIPE if recipe.preset == QUICK_RECIPE.preset else FULL_RECIPE
    name = "scratch" if recipe.corpora == default.corpora else "+".join(recipe.corpora)
    if recipe.preset != default.preset:
        name = recipe.preset if name == "scratch" else f"{recipe.preset}_{name}"
    if recipe.max_steps != default.max_steps and recipe.preset == default.preset:
        name += f"_{recipe.max_steps}steps"
    return artifacts_dir() / f"gpt_base_{name}.safetensors"


def resume_checkpoint_path(recipe: PretrainRecipe | None = None) -> Path:
    """Where an unfinished pretraining run keeps what it needs to continue (deleted once done)."""
    path = base_checkpoint_path(recipe)
    return path.with_name(f"{path.stem}.resume.pt")


def sms_corpus_text() -> str:
    """The unlabelled SMS text, one message after another, each ended by ``<|endoftext|>``.

    Only training messages and the ham left out of the balanced split: no validation or test
    message of notebook 06 is ever seen in pretraining.
    """
    return "".join(text + END_OF_TEXT for text in sms_pretraining_texts(sms_spam_split()))


def pretraining_corpora(
    tokenizer: tiktoken.Encoding, recipe: PretrainRecipe
) -> dict[str, dict[str, torch.Tensor]]:
    """Token ids of each corpus, split into ``train`` (first part) and ``val`` (last part)."""
    texts = {"shakespeare": lambda: load_text("tinyshakespeare"), "sms": sms_corpus_text}
    unknown = set(recipe.corpora) - texts.keys()
    if unknown:
        raise ValueError(f"Unknown pretraining corpora {sorted(unknown)}; known: {sorted(texts)}")
    corpora = {}
    for name in recipe.corpora:
        text = texts[name]()
        ids = torch.tensor(tokenizer.encode(text, allowed_special={END_OF_TEXT}))
        n_train = int(len(ids) * (1 - recipe.val_fraction))
        train_ids, val_ids = ids[:n_train], ids[n_train:]
        if recipe.max_train_tokens is not None:
            train_ids = train_ids[: recipe.max_train_tokens]
            val_ids = val_ids[: recipe.max_train_tokens // 8]
        corpora[name] = {"train": train_ids, "val": val_ids}
    return corpora


def pretraining_loaders(
    corpora: dict[str, dict[str, torch.Tensor]], context_length: int, recipe: PretrainRecipe
) -> tuple[DataLoader, dict[str, DataLoader]]:
    """One shuffled training loader over both corpora (windows overlapping by half), and one
    validation loader per corpus (non-overlapping windows)."""
    train_sets = [
        NextTokenDataset(c["train"], context_length, context_length // 2) for c in corpora.values()
    ]
    generator = torch.Generator().manual_seed(recipe.seed)
    train_loader = DataLoader(
        ConcatDataset(train_sets),
        batch_size=recipe.batch_size,
        shuffle=True,
        drop_last=True,
        generator=generator,
    )
    val_loaders = {
        name: DataLoader(
            NextTokenDataset(c["val"], context_length, context_length), batch_size=recipe.batch_size
        )
        for name, c in corpora.items()
    }
    return train_loader, val_loaders


def run_pretraining(
    model: GPTModel,
    train_loader: DataLoader,
    val_loaders: dict[str, DataLoader],
    device: torch.device,
    recipe: PretrainRecipe,
    save_every: int | None = None,
) -> History:
    """AdamW with warm-up and cosine decay, gradient clipping, bf16 on GPUs; the checkpoint with
    the best validation loss (all corpora together) is saved to ``base_checkpoint_path()``.

    Every ``save_every`` steps (default: a tenth of the run, at least ``eval_every``) the run
    saves ``resume_checkpoint_path()``; run again with the same recipe after an interruption
    and it continues from there to the same weights."""
    both = ConcatDataset([loader.dataset for loader in val_loaders.values()])
    optimizer = adamw(model.parameters(), recipe.lr, recipe.weight_decay, device)
    return train(
        model,
        train_loader,
        DataLoader(both, batch_size=recipe.batch_size),
        optimizer,
        device,
        Schedule(
            recipe.max_steps,
            recipe.eval_every,
            lr_schedule=cosine_schedule(recipe.max_steps, recipe.warmup_steps),
        ),
        saving=Saving(
            checkpoint_path=base_checkpoint_path(recipe),
            checkpoint_metadata={"recipe": asdict(recipe)},
            resume_path=resume_checkpoint_path(recipe),
            save_every=save_every or max(recipe.eval_every, recipe.max_steps // 10),
        ),
    )


def pretrain_base(device: torch.device, recipe: PretrainRecipe | None = None) -> GPTModel:
    """Pretrain the base model exactly as notebook 04 does and return the best checkpoint."""
    recipe = recipe or pretrain_recipe()
    torch.manual_seed(recipe.seed)
    cfg = gpt_config(recipe.preset, drop_rate=recipe.dropout)
    model = GPTModel(cfg).to(device)
    corpora = pretraining_corpora(get_tokenizer(), recipe)
    train_loader, val_loaders = pretraining_loaders(corpora, cfg.context_length, recipe)
    run_pretraining(model, train_loader, val_loaders, device, recipe)
    return load_checkpoint(base_checkpoint_path(recipe), device=device)[0]


def load_base_model(device: torch.device, recipe: PretrainRecipe | None = None) -> GPTModel:
    """The pretrained base from notebook 04: loaded if a completed run saved it, otherwise
    pretrained now (an interrupted run resumes where it stopped)."""
    recipe = recipe or pretrain_recipe()
    path = base_checkpoint_path(recipe)
    if reason := why_pretrain(path, recipe):
        print(reason)
        pretrain_base(device, recipe)
    model, meta = load_checkpoint(path, device=device)
    print(
        f"Loaded the base model ({count_parameters(model):,} parameters, step {meta['step']}, "
        f"validation loss {meta['val_loss']:.3f}) from {display_path(path)}"
    )
    return model


def why_pretrain(path: Path, recipe: PretrainRecipe) -> str | None:
    """Why the checkpoint at ``path`` is not the finished base of ``recipe``; None if it is."""
    shown, resume = display_path(path), resume_checkpoint_path(recipe)
    if not path.exists():
        return f"No base checkpoint at {shown}: pretraining it now, exactly as notebook 04 does."
    meta = read_checkpoint_metadata(path)
    if meta.get("recipe") != json.loads(json.dumps(asdict(recipe))):
        return (
            f"The base checkpoint at {shown} was pretrained with another recipe: pretraining again."
        )
    if is_finished(meta, recipe):
        return None
    if resume.exists():  # the checkpoint is the best so far of a run that was interrupted
        return f"Pretraining was interrupted ({display_path(resume)} is left): resuming it."
    return (
        f"The base checkpoint at {shown} is from a run that did not finish (step "
        f"{meta.get('step')} of {recipe.max_steps}, no completion mark, and no resume file to "
        "continue from): pretraining again."
    )


def is_finished(meta: dict, recipe: PretrainRecipe) -> bool:
    """Whether a base checkpoint's run completed: ``train`` marked it so, or it was saved at
    the run's last step, after which nothing changed the weights."""
    # The step is the one sign a checkpoint saved before the mark existed gives: one whose best
    # step came earlier cannot be told from an interrupted run's, and is pretrained again.
    return meta.get("finished") is True or meta.get("step") == recipe.max_steps


BASES = ("scratch", "scratch-30M", "gpt2-124M", "gpt2-355M", "gpt2-774M", "gpt2-1558M")


def choose_base(name: str, device: torch.device) -> tuple[GPTModel, str]:
    """The base model called ``name`` and the name actually used.

    ``"scratch"`` is notebook 04's model; ``"scratch-30M"`` a larger one pretrained the same way
    for longer (``LARGE_RECIPE``: minutes on a GPU, hours on a CPU); ``"gpt2-124M"`` etc. are
    OpenAI's GPT-2 weights, which need the network once: offline, this says so in one line and
    returns the scratch base.
    """
    if name not in BASES:
        raise ValueError(f"Unknown base {name!r}; choose one of {BASES}")
    if name == "scratch-30M":
        return load_base_model(device, QUICK_RECIPE if is_quick() else LARGE_RECIPE), name
    if name != "scratch":
        try:
            return load_gpt2(name.removeprefix("gpt2-"), device), name
        except DownloadError:
            print(
                f"{name} needs the network to download its weights once (unreachable here): "
                "continuing with the from-scratch base."
            )
    return load_base_model(device), "scratch"
