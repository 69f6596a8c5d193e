"""Trunk caching: run the frozen bottom of the network once, train only the top.

When only the top of the classifier trains (notebook 06's "head" and "last-block" variants),
every step would recompute the same frozen layers on the same messages. Instead, one pass
without gradients stores, per message, what the trained top reads:

- the head alone: the final-norm output at the message's last real token, ``(emb_dim,)``;
- the top blocks (+ final norm + head): the hidden states entering the first trained block,
  at the message's real tokens only, ``(length, emb_dim)``. Causal attention means padding
  never changes a real position, so each batch is padded again, with zeros. The last block
  then runs only what the head reads (``TransformerBlock(x, last)``): its output at the last
  token.

Training then runs the usual loop (``train.train``) on loaders of these features, with the
same batches in the same order; the trained modules are the full model's own, so the full
model classifies with them afterwards. Dropout in the frozen part would make every pass
differ, so such a model is not cached (``cut_point`` returns None).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .data import PAD_ID, MessageDataset
from .device import capabilities
from .model import GPTModel, at_positions, eval_mode

HEAD_ONLY = -1  # the cut point when only the head trains: cache the final-norm output


def cut_point(model: nn.Module) -> int | None:
    """Index of the first trained block (``n_layers``: final norm and head; ``HEAD_ONLY``: the
    head alone), or None when caching saves nothing or would change the math: a trained
    embedding or first block, dropout in the frozen part, a model that is not a GPTModel."""
    if type(model) is not GPTModel or trains(model.tok_emb) or trains(model.pos_emb):
        return None
    blocks = model.trf_blocks
    first = next((i for i, block in enumerate(blocks) if trains(block)), len(blocks))
    if first == len(blocks) and not trains(model.final_norm):
        first = HEAD_ONLY if trains(model.out_head) else None
    if first is None or first == 0:
        return None
    frozen = [model.drop_emb, *blocks[: len(blocks) if first == HEAD_ONLY else first]]
    if any(m.p > 0 for part in frozen for m in part.modules() if isinstance(m, nn.Dropout)):
        return None  # a dropout pass differs every step: the frozen part's output is not fixed
    return first


def trains(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is trainable."""
    return any(p.requires_grad for p in module.parameters())


@torch.no_grad()
def trunk_features(model: GPTModel, input_ids: torch.Tensor, cut: int) -> torch.Tensor:
    """The frozen part's output at every position, (batch, n_tokens, emb_dim): the hidden
    states entering block ``cut``, or (``HEAD_ONLY``) the final-norm output."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    x = model.drop_emb(model.tok_emb(input_ids) + model.pos_emb(positions))
    if cut == HEAD_ONLY:
        return model.final_norm(model.trf_blocks(x))
    return model.trf_blocks[:cut](x)


class CachedFeatures(Dataset):
    """Per message: its cached features and its label id (indexed like its MessageDataset)."""

    def __init__(self, features: list[torch.Tensor], labels: list[int]):
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.features[i], self.labels[i]


@torch.no_grad()
def cache_features(
    model: GPTModel, dataset: MessageDataset, device: torch.device, cut: int, batch_size: int = 64
) -> CachedFeatures:
    """Run the frozen part once over ``dataset``'s messages, in batches of similar length."""
    caps = capabilities(device)
    lengths = [len(ids) for ids in dataset.ids]
    by_length = sorted(range(len(lengths)), key=lengths.__getitem__)
    features: list[torch.Tensor] = [None] * len(lengths)  # type: ignore[list-item]
    with eval_mode(model):
        for start in range(0, len(by_length), batch_size):
            rows = by_length[start : start + batch_size]
            input_ids = torch.full((len(rows), lengths[rows[-1]]), PAD_ID, dtype=torch.long)
            for r, i in enumerate(rows):
                input_ids[r, : lengths[i]] = torch.tensor(dataset.ids[i])
            with caps.autocast():
                hidden = trunk_features(model, input_ids.to(device), cut).float()
            for r, i in enumerate(rows):
                n = lengths[i]
                features[i] = (hidden[r, n - 1] if cut == HEAD_ONLY else hidden[r, :n]).clone()
    return CachedFeatures(features, list(dataset.labels))


def collate_features(batch: list[tuple[torch.Tensor, int]], multiple: int = 1):
    """``(features, labels)`` for one vector per message; ``(hidden, lengths, labels)`` for
    hidden states, zero-padded to the batch's longest message rounded up to ``multiple``."""
    features, labels = [f for f, _ in batch], torch.tensor([label for _, label in batch])
    if features[0].dim() == 1:
        return torch.stack(features), labels
    lengths = torch.tensor([len(f) for f in features])
    longest = -(-int(lengths.max()) // multiple) * multiple
    hidden = features[0].new_zeros(len(batch), longest, features[0].shape[-1])
    for row, f in enumerate(features):
        hidden[row, : len(f)] = f
    return hidden, lengths, labels


def cached_loader(loader: DataLoader, features: CachedFeatures, multiple: int) -> DataLoader:
    """A loader of ``features`` with ``loader``'s own batch sampler (the same batches in the
    same order; reseeding its generator reseeds both), padded to a ``multiple``."""
    collate = lambda batch: collate_features(batch, multiple)  # noqa: E731
    return DataLoader(features, batch_sampler=loader.batch_sampler, collate_fn=collate)


def cached_loaders(
    model: GPTModel, loaders: dict[str, DataLoader], device: torch.device, cut: int
) -> dict[str, DataLoader]:
    """``loaders`` (of MessageDatasets) as loaders of the frozen part's cached features, padded
    as the device pads (``capabilities(device).pad_multiple``, as ``data.message_loaders``)."""
    multiple = capabilities(device).pad_multiple
    return {
        name: cached_loader(loader, cache_features(model, loader.dataset, device, cut), multiple)
        for name, loader in loaders.items()
    }


def top_logits(
    model: GPTModel, batch: tuple[torch.Tensor, ...], device: torch.device, cut: int
) -> torch.Tensor:
    """Class logits from cached features: the head alone, or the blocks from ``cut`` on (the
    last one at the last real token only), the final norm and the head."""
    features = batch[0].to(device, non_blocking=True)
    if cut == HEAD_ONLY:
        return model.out_head(features)
    lengths, blocks = batch[1].to(device, non_blocking=True), model.trf_blocks
    if cut < len(blocks):
        features = blocks[-1](blocks[cut:-1](features), lengths - 1).squeeze(1)
    else:  # only the final norm and the head train
        features = at_positions(features, lengths - 1)
    return model.out_head(model.final_norm(features))


def cached_loss(
    model: GPTModel, batch: tuple[torch.Tensor, ...], device: torch.device, cut: int
) -> torch.Tensor:
    """Cross-entropy of ``top_logits`` against the labels (bind ``cut`` for a train.LossFn)."""
    logits = top_logits(model, batch, device, cut)
    return F.cross_entropy(logits.float(), batch[-1].to(device, non_blocking=True))


@torch.no_grad()
def cached_accuracy(model: GPTModel, loader: DataLoader, device: torch.device, cut: int) -> float:
    """Share of correctly classified messages of a cached loader."""
    caps = capabilities(device)
    predictions, truth = [], []
    with eval_mode(model):
        for batch in loader:
            with caps.autocast():
                predictions.append(top_logits(model, batch, device, cut).argmax(dim=-1).cpu())
            truth.append(batch[-1])
    return (torch.cat(predictions) == torch.cat(truth)).float().mean().item()
