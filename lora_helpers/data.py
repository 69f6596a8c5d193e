"""Real data, downloaded safely, and the datasets built from it.

Every file is checked against its sha256 before use. Downloads go to a temporary file that is
renamed into place only once complete and verified, so an interrupted download never leaves a
file that looks finished. Set ``LORA_DATA_DIR`` to a pre-filled copy to work offline.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from .device import capabilities, get_device
from .settings import artifacts_dir, data_dir


class DownloadError(RuntimeError):
    """A file could not be downloaded from any of its addresses."""


class CorruptFileError(RuntimeError):
    """A file's sha256 does not match the expected one."""


@dataclass(frozen=True)
class Resource:
    """A file the notebooks need: where it lives in the data folder and how to get it."""

    path: str  # relative to the data folder
    sha256: str
    urls: tuple[str, ...]  # tried in order: main address first, then backups
    zip_member: str | None = None  # set when the URLs serve a zip holding the file


RESOURCES = {
    "tinyshakespeare": Resource(
        path="corpus/tinyshakespeare.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        urls=(
            "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        ),
    ),
    "the-verdict": Resource(
        path="corpus/the-verdict.txt",
        sha256="b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f",
        urls=(
            "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/the-verdict.txt",
        ),
    ),
    "sms_spam": Resource(
        path="sms_spam/SMSSpamCollection",
        sha256="7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d",
        urls=(
            "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
            "https://f001.backblazeb2.com/file/LLMs-from-scratch/sms%2Bspam%2Bcollection.zip",
        ),
        zip_member="SMSSpamCollection",
    ),
}


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    """Raise CorruptFileError unless ``path`` has the expected sha256."""
    actual = sha256_of(path)
    if actual != expected:
        raise CorruptFileError(
            f"{path} is corrupt or not the expected file: sha256 is {actual}, expected "
            f"{expected}. Delete it and run again to download a fresh copy."
        )


def download_file(
    url: str,
    dest: Path,
    timeout: float = 30.0,
    expected_size: int | None = None,
    expected_sha256: str | None = None,
    deadline: float | None = None,
) -> None:
    """Download ``url`` to ``dest`` atomically (temporary file, then rename), with a progress bar.

    ``timeout`` bounds connecting and each wait for data (a server that accepts but never
    answers); ``deadline``, if given, the whole download (TimeoutError beyond it). If given,
    the size and sha256 are checked before the rename (CorruptFileError otherwise). On any
    failure the temporary file is removed and ``dest`` is left untouched.
    """
    start = time.monotonic()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
                # read1: whatever has arrived (up to 64 KiB), so the deadline is checked often
                for chunk in iter(lambda: response.read1(1 << 16), b""):
                    if deadline is not None and time.monotonic() - start > deadline:
                        raise TimeoutError(
                            f"the download took longer than its deadline of {deadline} s"
                        )
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            n_bytes = out.tell()
        if expected_size is not None and n_bytes != expected_size:
            raise CorruptFileError(
                f"Download of {url} is incomplete or not the expected file: its size is "
                f"{n_bytes} bytes, expected {expected_size}. Nothing was saved; run again."
            )
        if expected_sha256 is not None and digest.hexdigest() != expected_sha256:
            raise CorruptFileError(
                f"Download of {url} is corrupt or not the expected file: sha256 is "
                f"{digest.hexdigest()}, expected {expected_sha256}. Nothing was saved; run again."
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def safe_extract(archive: Path, member: str, dest: Path) -> None:
    """Extract one ``member`` of a zip file to ``dest``, refusing names that leave its folder."""
    target_dir = dest.parent.resolve()
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            resolved = (target_dir / info.filename).resolve()
            if not resolved.is_relative_to(target_dir):
                raise ValueError(
                    f"Refusing to extract {archive}: member {info.filename!r} would be written "
                    f"outside {target_dir}."
                )
        if member not in zf.namelist():
            raise CorruptFileError(f"{archive} has no member {member!r}: {zf.namelist()}")
        fd, tmp_name = tempfile.mkstemp(dir=target_dir, prefix=f".{dest.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, zf.open(member) as src:
                shutil.copyfileobj(src, out)
            os.replace(tmp_name, dest)
        finally:
            Path(tmp_name).unlink(missing_ok=True)


def _download_verified(
    resource: Resource, url: str, dest: Path, timeout: float, deadline: float
) -> None:
    """Fetch one address into ``dest``; only a file with the right sha256 is kept."""
    if resource.zip_member is None:  # checked while it streams, renamed only if right
        download_file(url, dest, timeout, expected_sha256=resource.sha256, deadline=deadline)
        return
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        archive, staged = Path(tmp) / "download.zip", Path(tmp) / dest.name
        download_file(url, archive, timeout, deadline=deadline)
        safe_extract(archive, resource.zip_member, staged)
        verify_sha256(staged, resource.sha256)
        os.replace(staged, dest)


def fetch(name: str, timeout: float = 5.0, deadline: float = 60.0) -> Path:
    """Return the verified local path of resource ``name``, downloading it if needed.

    A file already in the data folder is verified and used without any network call. Each
    address gets ``timeout`` seconds to connect and for each wait for data, and ``deadline``
    seconds in all, then the next is tried: a server that never answers costs 5 s, not minutes.
    """
    if name not in RESOURCES:
        raise KeyError(f"Unknown resource {name!r}; known: {sorted(RESOURCES)}")
    resource = RESOURCES[name]
    dest = data_dir() / resource.path
    if dest.exists():
        verify_sha256(dest, resource.sha256)
        return dest

    dest.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    for url in resource.urls:
        try:
            _download_verified(resource, url, dest, timeout, deadline)
            return dest
        except (OSError, urllib.error.URLError, CorruptFileError, zipfile.BadZipFile) as err:
            failures.append(f"  {url}: {err}")
    raise DownloadError(
        f"Could not download {name!r} (no network, or the file changed upstream):\n"
        + "\n".join(failures)
        + f"\nDownload it by hand and place it at {dest} (sha256 {resource.sha256}), or set "
        "LORA_DATA_DIR to a folder that already holds it (e.g. an offline copy)."
    )


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
    """The balanced split, read from ``artifacts/sms_spam_split/`` or made and saved there,
    so that every notebook uses the very same split."""
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
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(f"{label}\t{text}\n" for label, text in rows), encoding="utf-8")
    os.replace(tmp, path)


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
    min_length: int = 0,
    max_length: int | None = None,
):
    """Pad a batch to its own longest message (right padding), rounded up to a ``multiple``
    but never beyond ``max_length`` (the model's context).

    Returns ``(input_ids, lengths, labels)``; ``lengths - 1`` is the position of each message's
    last real token, the only position the classifier reads. ``multiple > 1`` leaves only a few
    possible batch shapes (what a CUDA graph, captured once per shape, needs); ``min_length``
    pads every batch to at least that length (e.g. the whole training set's longest message).
    """
    if empty := [row for row, (ids, _) in enumerate(batch) if len(ids) == 0]:
        raise ValueError(
            f"Rows {empty} of the batch have no tokens (empty messages): the classifier would "
            "read a padding position. Drop empty messages before batching."
        )
    longest = max(min_length, *(len(ids) for ids, _ in batch))
    longest = -(-longest // multiple) * multiple
    if max_length is not None:
        longest = min(longest, max(max_length, *(len(ids) for ids, _ in batch)))
    input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    for row, (ids, _) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    lengths = torch.tensor([len(ids) for ids, _ in batch])
    labels = torch.tensor([label for _, label in batch])
    return input_ids, lengths, labels


class LengthBucketSampler(Sampler[list[int]]):
    """Batches of messages of similar length, in a seeded random order (less padding).

    Each epoch: shuffle every message, cut the order into pools of ``pool_batches`` batches,
    sort each pool by length and cut it into batches, then shuffle the batches. Every message
    is used once per epoch; with ``drop_last`` the few left over after the last full batch
    (a different few each epoch) sit this epoch out, as with a shuffling DataLoader.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        pool_batches: int = 8,
        drop_last: bool = True,
        seed: int = 123,
    ):
        self.lengths = list(lengths)
        self.batch_size, self.pool_batches, self.drop_last = batch_size, pool_batches, drop_last
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n, size = len(self.lengths), self.batch_size
        return n // size if self.drop_last else -(-n // size)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        if self.drop_last:
            order = order[: len(self) * self.batch_size]
        pool, size = self.pool_batches * self.batch_size, self.batch_size
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
    seed: int = 123,
    pad_multiple: int | None = None,
) -> dict[str, DataLoader]:
    """Loaders for the train, validation and test messages, each batch padded to its longest
    message rounded up to ``pad_multiple`` (default: the best device's, ``get_device``: 16 on
    a CUDA GPU, so that few batch shapes occur and training steps replay as CUDA graphs; else 1).

    Training batches hold messages of similar length in a seeded random order
    (``LengthBucketSampler``): every message once per epoch, far less padding to compute.
    """
    if pad_multiple is None:
        pad_multiple = capabilities(get_device(verbose=False)).pad_multiple
    collate = partial(pad_collate, multiple=pad_multiple, max_length=max_length)
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
