"""The datasets the notebooks build from the downloaded files (see ``downloads``): corpus text,
next-token windows, and the SMS Spam Collection with its balanced split and batches.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .device import capabilities
from .downloads import CorruptFileError, fetch
from .files import atomic_write
from .settings import artifacts_dir


def load_text(name: str) -> str:
    """The verified text of a corpus resource, e.g. ``load_text("tinyshakespeare")``."""
    return fetch(name).read_text(encoding="utf-8")


# --- next-token prediction -------------------------------------------------------------------


class NextTokenDataset(Dataset):
    """Sliding windows over a token stream: input ``ids[i:i+n]``, target ``ids[i+1:i+n+1]``.

    ``stride`` is how far the window moves; ``stride == context_length`` gives
    non-overlapping windows (every token is predicted once per epoch).
    """

    def __init__(self, token_ids: list[int] | torch.Tensor, context_length: int, stride: int):
        ids = torch.as_tensor(token_ids, dtype=torch.long)
        if len(ids) <= context_length:
            raise ValueError(
                f"Need more than context_length={context_length} tokens to make one window, "
                f"got {len(ids)}. Use more text or a shorter context."
            )
        self.ids = ids
        self.context_length = context_length
        self.starts = range(0, len(ids) - context_length, stride)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.starts[i]
        window = self.ids[start : start + self.context_length + 1]
        return window[:-1], window[1:]


def create_dataloader(
    token_ids: list[int] | torch.Tensor,
    batch_size: int,
    context_length: int,
    stride: int | None = None,
    shuffle: bool = True,
    drop_last: bool = True,
    seed: int = 123,
) -> DataLoader:
    """A DataLoader of (input, target) windows; shuffling is seeded so runs repeat."""
    dataset = NextTokenDataset(token_ids, context_length, stride or context_length)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, generator=generator
    )


# --- SMS Spam Collection ---------------------------------------------------------------------

Message = tuple[str, str]  # (label, text), label is "ham" or "spam"
SPLIT_NAMES = ("train", "validation", "test", "unused")


def load_sms_spam() -> list[Message]:
    """All 5,574 (label, text) pairs, read as plain tab-separated lines (quotes are text)."""
    lines = fetch("sms_spam").read_text(encoding="utf-8").splitlines()
    messages = []
    for number, line in enumerate(lines, start=1):
        label, sep, text = line.partition("\t")
        if not sep or label not in ("ham", "spam"):
            raise CorruptFileError(f"SMSSpamCollection line {number} is malformed: {line[:80]!r}")
        messages.append((label, text))
    return messages


def split_sms_spam(messages: list[Message], seed: int = 123) -> dict[str, list[Message]]:
    """Balance by undersampling ham to the spam count, shuffle, split 70/10/20 (seeded).

    The ham left out by undersampling is kept as ``unused`` (unlabelled pretraining text).
    """
    rng = random.Random(seed)
    ham = [m for m in messages if m[0] == "ham"]
    spam = [m for m in messages if m[0] == "spam"]
    rng.shuffle(ham)
    balanced = ham[: len(spam)] + spam
    rng.shuffle(balanced)
    n_train, n_val = int(0.7 * len(balanced)), int(0.1 * len(balanced))
    return {
        "train": balanced[:n_train],
        "validation": balanced[n_train : n_train + n_val],
        "test": balanced[n_train + n_val :],
        "unused": ham[len(spam) :],
    }


def sms_spam_split(seed: int = 123) -> dict[str, list[Message]]:
    """The balanced split, read from ``artifacts/sms_spam_split_seed{seed}/`` or made and saved
    there, so that every notebook uses the very same split."""
    folder = artifacts_dir() / f"sms_spam_split_seed{seed}"
    if all((folder / f"{name}.tsv").exists() for name in SPLIT_NAMES):
        return {name: _read_tsv(folder / f"{name}.tsv") for name in SPLIT_NAMES}
    split = split_sms_spam(load_sms_spam(), seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in split.items():
        _write_tsv(folder / f"{name}.tsv", rows)
    return split


def sms_pretraining_texts(split: dict[str, list[Message]]) -> list[str]:
    """Unlabelled SMS text that is safe to pretrain on: the training messages and the unused
    ham, minus every message whose exact text also occurs in the validation or test split."""
    held_out = {text for name in ("validation", "test") for _, text in split[name]}
    return [text for name in ("train", "unused") for _, text in split[name] if text not in held_out]


def _write_tsv(path: Path, rows: list[Message]) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text("".join(f"{label}\t{text}\n" for label, text in rows), encoding="utf-8")


def _read_tsv(path: Path) -> list[Message]:
    rows = [line.partition("\t") for line in path.read_text(encoding="utf-8").splitlines()]
    return [(label, text) for label, _, text in rows]


# --- SMS classification batches --------------------------------------------------------------

LABEL_IDS = {"ham": 0, "spam": 1}
PAD_ID = 50256  # GPT-2's <|endoftext|>; padded positions are never read (see pad_collate)


class MessageDataset(Dataset):
    """Token ids and label ids of (label, text) messages, cut to at most ``max_length`` tokens."""

    def __init__(self, messages: list[Message], tokenizer, max_length: int):
        if empty := [i for i, (_, text) in enumerate(messages) if not text.strip()]:
            raise ValueError(
                f"Messages {empty[:10]} are empty or whitespace-only: a classifier reads a "
                "message's last token, and these have none. Drop them before building batches."
            )
        self.messages = messages
        self.ids = [tokenizer.encode(text)[:max_length] for _, text in messages]
        self.labels = [LABEL_IDS[label] for label, _ in messages]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[list[int], int]:
        return self.ids[i], self.labels[i]


def pad_collate(
    batch: list[tuple[list[int], int]],
    pad_id: int = PAD_ID,
    multiple: int = 1,
    max_length: int | None = None,
):
    """Pad a batch to its own longest message (right padding), rounded up to a ``multiple``
    but never beyond ``max_length`` (the model's context).

    Returns ``(input_ids, lengths, labels)``; ``lengths - 1`` is the position of each message's
    last real token, the only position the classifier reads. ``multiple > 1`` leaves only a few
    possible batch shapes (what a CUDA graph, captured once per shape, needs).
    """
    if empty := [row for row, (ids, _) in enumerate(batch) if len(ids) == 0]:
        raise ValueError(
            f"Rows {empty} of the batch have no tokens (empty messages): the classifier would "
            "read a padding position. Drop empty messages before batching."
        )
    longest = max(len(ids) for ids, _ in batch)
    longest = -(-longest // multiple) * multiple
    if max_length is not None:
        longest = min(longest, max(max_length, *(len(ids) for ids, _ in batch)))
    input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    for row, (ids, _) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    lengths = torch.tensor([len(ids) for ids, _ in batch])
    labels = torch.tensor([label for _, label in batch])
    return input_ids, lengths, labels


POOL_BATCHES = 8  # batches of similar length are cut from pools of this many (less padding)


class LengthBucketSampler(Sampler[list[int]]):
    """Batches of messages of similar length, in a seeded random order (less padding).

    Each epoch: shuffle every message, cut the order into pools of ``POOL_BATCHES`` batches,
    sort each pool by length and cut it into batches, then shuffle the batches. Every message
    is used once per epoch; with ``drop_last`` the few left over after the last full batch
    (a different few each epoch) sit this epoch out, as with a shuffling DataLoader.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        drop_last: bool = True,
        seed: int = 123,
    ):
        self.lengths = list(lengths)
        self.batch_size, self.drop_last = batch_size, drop_last
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n, size = len(self.lengths), self.batch_size
        return n // size if self.drop_last else -(-n // size)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        if self.drop_last:
            order = order[: len(self) * self.batch_size]
        pool, size = POOL_BATCHES * self.batch_size, self.batch_size
        batches = []
        for start in range(0, len(order), pool):
            by_length = sorted(order[start : start + pool], key=self.lengths.__getitem__)
            batches += [by_length[i : i + size] for i in range(0, len(by_length), size)]
        for i in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[i]


def message_loaders(
    split: dict[str, list[Message]],
    tokenizer,
    batch_size: int,
    max_length: int,
    device: torch.device | str,
    seed: int = 123,
) -> dict[str, DataLoader]:
    """Loaders for the train, validation and test messages, each batch padded to its longest
    message rounded up to the ``device``'s pad multiple (``capabilities(device)``: 16 on a CUDA
    GPU, so that few batch shapes occur and training steps replay as CUDA graphs; else 1).

    Training batches hold messages of similar length in a seeded random order
    (``LengthBucketSampler``): every message once per epoch, far less padding to compute.
    """
    multiple = capabilities(device).pad_multiple
    collate = partial(pad_collate, multiple=multiple, max_length=max_length)
    loaders = {}
    for name in ("train", "validation", "test"):
        dataset = MessageDataset(split[name], tokenizer, max_length)
        if name == "train":
            lengths = [len(ids) for ids in dataset.ids]
            sampler = LengthBucketSampler(lengths, batch_size, seed=seed)
            loaders[name] = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
        else:
            loaders[name] = DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    return loaders
