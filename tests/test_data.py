import pytest
import torch

from lora_helpers import data
from lora_helpers.data import MessageDataset, pad_collate
from lora_helpers.tokenizer import get_tokenizer


def test_next_token_windows_are_shifted_by_one():
    ids = list(range(20))
    ds = data.NextTokenDataset(ids, context_length=4, stride=4)
    assert len(ds) == 4  # starts 0, 4, 8, 12 (16 would need token 20)
    x, y = ds[1]
    assert x.tolist() == [4, 5, 6, 7] and y.tolist() == [5, 6, 7, 8]
    overlapping = data.NextTokenDataset(ids, context_length=4, stride=1)
    assert len(overlapping) == 16
    with pytest.raises(ValueError, match="context_length"):
        data.NextTokenDataset(ids[:4], context_length=4, stride=1)


def test_dataloader_batches_and_seeded_shuffle():
    ids = torch.arange(1000)
    batches = [x for x, _ in data.create_dataloader(ids, batch_size=8, context_length=16, seed=1)]
    again = [x for x, _ in data.create_dataloader(ids, batch_size=8, context_length=16, seed=1)]
    assert batches[0].shape == (8, 16)
    assert len(batches) == (1000 - 16 + 15) // 16 // 8  # 62 windows, drop_last
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))


def test_sms_spam_counts_and_balanced_split():
    messages = data.load_sms_spam()
    assert len(messages) == 5574
    assert sum(label == "spam" for label, _ in messages) == 747
    assert any('"' in text for _, text in messages)  # quotes kept, lines never merged
    split = data.split_sms_spam(messages, seed=123)
    assert {k: len(v) for k, v in split.items()} == {
        "train": 1045,
        "validation": 149,
        "test": 300,
        "unused": 4827 - 747,
    }
    balanced = split["train"] + split["validation"] + split["test"]
    assert sum(label == "spam" for label, _ in balanced) == 747
    assert split == data.split_sms_spam(messages, seed=123)
    assert split["train"] != data.split_sms_spam(messages, seed=7)["train"]


def test_split_is_saved_and_reloaded_identically(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_ARTIFACTS_DIR", str(tmp_path))
    first = data.sms_spam_split()
    assert list(tmp_path.rglob("train.tsv"))
    assert data.sms_spam_split() == first


def test_pretraining_texts_exclude_every_validation_and_test_text():
    split = data.split_sms_spam(data.load_sms_spam(), seed=123)
    texts = data.sms_pretraining_texts(split)
    held_out = {t for name in ("validation", "test") for _, t in split[name]}
    assert texts and held_out.isdisjoint(texts)
    train_only = {t for _, t in split["train"]} - held_out
    assert train_only <= set(texts)


def test_pad_collate_rounds_up_to_a_multiple_within_the_context():
    batch = [([1, 2, 3], 0), ([4], 1)]
    assert data.pad_collate(batch, multiple=4)[0].shape == (2, 4)
    assert data.pad_collate(batch, multiple=2)[0].shape == (2, 4)
    assert data.pad_collate(batch, multiple=4, max_length=3)[0].shape == (2, 3)  # the context
    assert data.pad_collate(batch, multiple=4, max_length=2)[0].shape == (2, 3)  # never too short


def _bucket_epochs(lengths, seed=5, epochs=2, **kwargs):
    sampler = data.LengthBucketSampler(lengths, batch_size=4, seed=seed, **kwargs)
    return sampler, [list(sampler) for _ in range(epochs)]


def test_length_buckets_use_every_message_once_per_epoch():
    lengths = [(7 * i) % 23 + 1 for i in range(50)]
    sampler, epochs = _bucket_epochs(lengths, drop_last=False)
    assert len(sampler) == 13
    for batches in epochs:
        assert len(batches) == 13
        assert sorted(i for b in batches for i in b) == list(range(50))
    sampler, epochs = _bucket_epochs(lengths, drop_last=True)
    assert len(sampler) == 12
    for batches in epochs:
        used = [i for b in batches for i in b]
        assert len(batches) == 12 and all(len(b) == 4 for b in batches)
        assert len(used) == len(set(used)) == 48


def test_length_buckets_group_similar_lengths_and_repeat_under_a_seed():
    lengths = [(7 * i) % 23 + 1 for i in range(48)]
    _, epochs = _bucket_epochs(lengths)
    for batch in epochs[0]:
        assert [lengths[i] for i in batch] == sorted(lengths[i] for i in batch)
    # batches come from length-sorted pools: far less spread in a batch than a plain shuffle
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in epochs[0])
    shuffled = torch.randperm(48, generator=torch.Generator().manual_seed(0)).tolist()
    plain = sum(
        max(lengths[i] for i in shuffled[k : k + 4]) - min(lengths[i] for i in shuffled[k : k + 4])
        for k in range(0, 48, 4)
    )
    assert spread < plain / 2
    assert epochs == _bucket_epochs(lengths)[1]  # same seed, same batches, epoch after epoch
    assert epochs[0] != epochs[1]  # a new order every epoch
    assert epochs[0] != _bucket_epochs(lengths, seed=6)[1][0]


def test_the_batch_builders_refuse_an_empty_message():
    messages = [("ham", "hello"), ("spam", " "), ("ham", "")]
    with pytest.raises(ValueError, match=r"Messages \[1, 2\] are empty or whitespace-only"):
        MessageDataset(messages, get_tokenizer(), max_length=16)
    with pytest.raises(ValueError, match=r"Rows \[1\] of the batch have no tokens"):
        pad_collate([([1, 2], 0), ([], 1)])
