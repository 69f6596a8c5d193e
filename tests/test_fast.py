from dataclasses import replace

import pytest
import torch

from lora_helpers import fast
from lora_helpers import finetune as ft
from lora_helpers.data import PAD_ID, MessageDataset
from lora_helpers.model import GPTModel, MultiHeadAttention, gpt_config

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


class WordTokenizer:
    """One token per word: 'spam' words are odd ids, 'ham' words even ones."""

    def encode(self, text):
        return [int(w) for w in text.split()]


def toy_dataset(n=48, seed=0) -> MessageDataset:
    g = torch.Generator().manual_seed(seed)
    messages = []
    for i in range(n):
        label = "spam" if i % 2 else "ham"
        length = int(torch.randint(2, 14, (), generator=g)) + (6 if label == "spam" else 0)
        ids = 2 * torch.randint(0, 40, (length,), generator=g) + (label == "spam")
        messages.append((label, " ".join(map(str, ids.tolist()))))
    return MessageDataset(messages, WordTokenizer(), max_length=32)


@pytest.fixture
def base() -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(gpt_config("scratch-tiny", context_length=32)).eval()


def lora_model(base):
    return ft.prepare_variant(base, "lora-r8", ft.FULL_FINETUNE)


def test_levers_are_checked_and_naive_differs_from_fast_everywhere():
    with pytest.raises(ValueError, match="not both"):
        fast.Levers(cuda_graphs=True, compile=True)
    assert not fast.NAIVE.pad_per_batch and not fast.NAIVE.sdpa and not fast.NAIVE.bf16
    assert not fast.FAST.uses_bf16(CPU)


def test_lever_study_switches_one_lever_at_a_time():
    on_cpu = fast.lever_study_levers(fast.FAST, CPU)
    assert set(on_cpu) == {
        "without sdpa",
        "without per-batch padding",
        "without head at last token",
        "with length-sorted batches",
    }
    assert on_cpu["with length-sorted batches"] == replace(fast.FAST, sort_by_length=True)
    on_gpu = fast.lever_study_levers(fast.FAST_GRAPHED, CUDA)
    assert "without CUDA graphs" in on_gpu and "with CUDA graphs" not in on_gpu
    assert "without torch.compile" not in on_gpu and "without fused AdamW" in on_gpu
    assert on_gpu["without CUDA graphs"] == fast.FAST
    assert fast.lever_study_levers(fast.FAST, CUDA)["with CUDA graphs"] == fast.FAST_GRAPHED


def test_loaders_pad_as_the_levers_say():
    dataset = toy_dataset()
    longest = max(len(ids) for ids in dataset.ids)
    variants = {
        "longest": fast.NAIVE,
        "batch": fast.FAST,
        "sorted": replace(fast.FAST, sort_by_length=True),
    }
    widths, first_batches = {}, {}
    for name, levers in variants.items():
        loader = fast.classification_loader(dataset, 8, levers, True, longest, seed=1)
        batches = list(loader)
        assert len(batches) == len(loader) == 6
        widths[name] = sum(ids.shape[1] for ids, _, _ in batches)
        first_batches[name] = batches[0][2]
        for ids, lengths, _ in batches:
            assert ids.shape[1] == (longest if name == "longest" else lengths.max())
    assert widths["sorted"] < widths["batch"] < widths["longest"]
    assert torch.equal(first_batches["batch"], first_batches["longest"])  # the same batches
    loader = fast.classification_loader(dataset, 8, fast.FAST_GRAPHED, False)
    assert all(ids.shape[1] % 16 == 0 for ids, _, _ in loader)


def test_the_naive_head_reads_the_same_logits(base):
    model = ft.add_classification_head(base)
    input_ids = torch.full((2, 9), PAD_ID)
    input_ids[0, :4], input_ids[1, :9] = torch.arange(4), torch.arange(9)
    lengths = torch.tensor([4, 9])
    torch.testing.assert_close(
        fast.all_positions_logits(model, input_ids, lengths),
        ft.last_token_logits(model, input_ids, lengths),
    )


def test_set_sdpa_and_cast_frozen_base(base):
    model = lora_model(base)
    fast.set_sdpa(model, False)
    assert not any(m.use_sdpa for m in model.modules() if isinstance(m, MultiHeadAttention))
    assert fast.cast_frozen_base(model) == 6 * base.cfg.n_layers
    block = model.trf_blocks[0]
    assert block.att.W_query.linear.weight.dtype == torch.bfloat16
    assert block.att.W_query.lora.A.dtype == torch.float32  # the adapter stays fp32
    assert model.out_head.weight.dtype == model.tok_emb.weight.dtype == torch.float32


def train_once(base, levers, epochs=2):
    dataset = toy_dataset()
    longest = max(len(ids) for ids in dataset.ids)
    model = lora_model(base)
    loader = fast.classification_loader(dataset, 8, levers, True, longest)
    losses = fast.train_classifier(model, loader, CPU, epochs, 1e-2, levers)
    test_loader = fast.classification_loader(dataset, 8, levers, False, longest)
    return model, losses, fast.accuracy_percent(model, test_loader, CPU, levers)


def test_levers_change_how_not_what(base):
    """Same batches: the naive path and the fast one train the same model."""
    naive, naive_losses, naive_acc = train_once(base, fast.NAIVE)
    quick, quick_losses, quick_acc = train_once(base, fast.FAST)
    assert len(quick_losses) == 2 and quick_losses[1] < quick_losses[0]
    assert quick_losses == pytest.approx(naive_losses, rel=1e-4)
    for (name, a), b in zip(naive.named_parameters(), quick.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name)
    assert quick_acc == naive_acc and 0 <= quick_acc <= 100


def test_training_on_length_sorted_batches_learns(base):
    _, losses, acc = train_once(base, replace(fast.FAST, sort_by_length=True), epochs=4)
    assert losses[-1] < losses[0] and acc > 60


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_cuda_graphs_train_exactly_like_the_eager_fast_path(base):
    dataset = toy_dataset()
    results = []
    for levers in (replace(fast.FAST_GRAPHED, cuda_graphs=False), fast.FAST_GRAPHED):
        model = lora_model(base).to(CUDA)
        loader = fast.classification_loader(dataset, 8, levers, True)
        losses = fast.train_classifier(model, loader, CUDA, 3, 1e-2, levers)
        results.append((losses, [p.detach().float().cpu() for p in model.parameters()]))
    (eager_losses, eager_params), (graph_losses, graph_params) = results
    assert graph_losses == pytest.approx(eager_losses, rel=1e-2)
    for a, b in zip(eager_params, graph_params, strict=True):  # a lost step would move ~1e-2
        torch.testing.assert_close(a, b, rtol=1e-2, atol=2e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_frozen_base_computes_what_autocast_computes(base):
    input_ids = torch.randint(0, 100, (4, 12), device=CUDA)
    lengths = torch.tensor([12, 5, 7, 1], device=CUDA)
    model = lora_model(base).to(CUDA)
    with fast.autocast(fast.FAST, CUDA):
        before = ft.last_token_logits(model, input_ids, lengths)
        fast.cast_frozen_base(model)
        after = ft.last_token_logits(model, input_ids, lengths)
    torch.testing.assert_close(after, before)
