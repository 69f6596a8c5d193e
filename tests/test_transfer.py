import collections

import pytest
import torch

from lora_helpers import finetune as ft
from lora_helpers import transfer as tr
from lora_helpers.model import GPTModel, gpt_config
from lora_helpers.tokenizer import get_tokenizer

SPAM = ["WIN a FREE prize now, text WIN to 80888", "URGENT! Call 0800 now to claim £2000"]
HAM = ["Are we still on for lunch?", "ok see you at home", "Can you pick up some milk?"]


def toy_split(n: int = 12) -> dict[str, list[tuple[str, str]]]:
    """``n`` spam and ``n`` ham training messages; validation and test texts never seen."""
    rows = [("spam", f"{SPAM[i % 2]} {i}") for i in range(3 * n)]
    rows += [("ham", f"{HAM[i % 3]} {i}") for i in range(3 * n)]
    split = {"train": rows[:n] + rows[3 * n : 4 * n], "validation": rows[n : 2 * n]}
    return split | {"test": rows[2 * n : 3 * n] + rows[5 * n :]}


@pytest.fixture
def base() -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(gpt_config("scratch-tiny")).eval()


def test_labelled_subset_is_balanced_seeded_and_drawn_from_the_split():
    train = toy_split()["train"]
    subset = tr.labelled_subset(train, 7, seed=1)
    assert len(subset) == 7 and set(subset) <= set(train)
    assert collections.Counter(label for label, _ in subset) == {"spam": 3, "ham": 4}
    assert tr.labelled_subset(train, 7, seed=1) == subset
    assert tr.labelled_subset(train, 7, seed=2) != subset
    assert tr.labelled_subset(train, None, seed=1) == train
    assert tr.labelled_subset(train, 10_000, seed=1) == train


@pytest.mark.parametrize("size", [0, 1, -3])
def test_labelled_subset_refuses_fewer_than_one_message_per_class(size):
    with pytest.raises(ValueError, match="at least 2"):
        tr.labelled_subset(toy_split()["train"], size, seed=1)


def test_random_base_has_the_architecture_and_fresh_seeded_weights(base):
    first, again = tr.random_base(base, seed=5), tr.random_base(base, seed=5)
    assert first.cfg == base.cfg
    assert not torch.equal(first.tok_emb.weight, base.tok_emb.weight)
    assert all(
        torch.equal(a, b) for a, b in zip(first.parameters(), again.parameters(), strict=True)
    )


@pytest.mark.parametrize("method", list(tr.METHODS))
def test_transfer_run_trains_a_copy_and_leaves_the_base_untouched(base, method):
    before = {k: v.clone() for k, v in base.state_dict().items()}
    accs = tr.transfer_run(
        base, method, toy_split(), get_tokenizer(), torch.device("cpu"), ft.QUICK_FINETUNE, 3
    )
    assert all(0.0 <= acc <= 1.0 for acc in accs) and len(accs) == 2
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_run_transfer_covers_every_cell_once_per_seed(base):
    recipe = tr.TransferRecipe(sizes=(8, None), seeds=(1, 2), steps=2)
    results = tr.run_transfer(
        base, toy_split(), get_tokenizer(), torch.device("cpu"), ft.QUICK_FINETUNE, recipe
    )
    assert len(results) == 2 * len(tr.BASES) * 2 * len(tr.METHODS)
    assert {r.size for r in results} == {8, 24}
    for method in tr.METHODS:
        for kind in tr.BASES:
            accs = tr.accuracies(results, method, kind, 8)
            assert len(accs) == 2 and all(0.0 <= a <= 1.0 for a in accs)


def test_a_labelled_set_smaller_than_one_batch_is_refused(base):
    split = {**toy_split(), "train": tr.labelled_subset(toy_split()["train"], 4, seed=1)}
    with pytest.raises(ValueError, match="empty"):
        tr.transfer_run(
            base, "full fine-tuning", split, get_tokenizer(), torch.device("cpu"),
            ft.QUICK_FINETUNE, 2,
        )  # fmt: skip
