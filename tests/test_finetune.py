import dataclasses

import pytest
import torch

from lora_helpers import data
from lora_helpers import finetune as ft
from lora_helpers.checkpoints import Saving
from lora_helpers.data import PAD_ID, MessageDataset, message_loaders, pad_collate, sms_spam_split
from lora_helpers.device import capabilities, resident_mib
from lora_helpers.model import GPTModel, MultiHeadAttention, gpt_config
from lora_helpers.params import count_parameters
from lora_helpers.tokenizer import get_tokenizer


@pytest.fixture
def base() -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(gpt_config("scratch-tiny")).eval()


def test_pad_collate_pads_to_the_longest_in_the_batch():
    input_ids, lengths, labels = pad_collate([([1, 2, 3], 0), ([4], 1), ([5, 6], 1)])
    assert input_ids.tolist() == [[1, 2, 3], [4, PAD_ID, PAD_ID], [5, 6, PAD_ID]]
    assert lengths.tolist() == [3, 1, 2] and labels.tolist() == [0, 1, 1]


def test_message_dataset_truncates_and_maps_labels():
    tokenizer = get_tokenizer()
    ds = MessageDataset([("spam", "WIN " * 50), ("ham", "ok")], tokenizer, max_length=10)
    assert len(ds[0][0]) == 10 and ds[0][1] == 1
    assert ds[1] == (tokenizer.encode("ok"), 0)


def test_loaders_sizes_and_seeded_order():
    tokenizer = get_tokenizer()
    split = sms_spam_split()
    loaders = message_loaders(split, tokenizer, batch_size=8, max_length=256, device="cpu")
    assert len(loaders["train"]) == 1045 // 8  # drop_last
    assert len(loaders["validation"].dataset) == 149 and len(loaders["test"].dataset) == 300
    first = next(iter(loaders["train"]))[0]
    again = next(iter(message_loaders(split, tokenizer, 8, 256, "cpu")["train"]))[0]
    assert torch.equal(first, again)
    epoch = list(loaders["train"])
    assert sum(len(lengths) for _, lengths, _ in epoch) == 1045 // 8 * 8
    padded = sum(ids.numel() for ids, _, _ in epoch)
    real = sum(lengths.sum().item() for _, lengths, _ in epoch)
    assert padded < 1.2 * real  # batches of similar lengths: little padding
    batch_ids, lengths, _ = next(iter(loaders["test"]))
    assert batch_ids.shape[1] == lengths.max().item()  # padded to this batch's longest


def test_loaders_pad_as_the_training_device_does(monkeypatch):
    """A device that pads to multiples of 16 (a CUDA GPU, pretended here) gets few batch shapes;
    the CPU pads each batch to its own longest message."""
    by_16 = dataclasses.replace(capabilities("cpu"), pad_multiple=16)
    monkeypatch.setattr(data, "capabilities", lambda device: by_16 if device == "gpu" else None)
    split = sms_spam_split()
    loaders = message_loaders(split, get_tokenizer(), 8, max_length=40, device="gpu")
    shapes = {ids.shape[1] for ids, lengths, _ in loaders["train"]}
    assert shapes <= {16, 32, 40}  # multiples of 16, but never beyond the context
    for ids, lengths, _ in loaders["test"]:
        assert lengths.max() <= ids.shape[1] < lengths.max() + 16
    monkeypatch.undo()
    for ids, lengths, _ in message_loaders(split, get_tokenizer(), 8, 40, "cpu")["test"]:
        assert ids.shape[1] == lengths.max()


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_logits_do_not_depend_on_the_amount_of_padding(base, use_sdpa):
    for m in base.modules():
        if isinstance(m, MultiHeadAttention):
            m.use_sdpa = use_sdpa
    model = ft.add_classification_head(base)
    message = [464, 2068, 7586, 21831, 18045]
    logits = []
    for total in (5, 9, 40):
        ids = torch.full((1, total), PAD_ID)
        ids[0, :5] = torch.tensor(message)
        logits.append(ft.last_token_logits(model, ids, torch.tensor([5])))
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[2], logits[0], rtol=0, atol=1e-5)
    # the pitfall: reading the last position instead would depend on the padding
    padded = torch.full((1, 40), PAD_ID)
    padded[0, :5] = torch.tensor(message)
    naive = model.out_head(model.hidden_states(padded)[:, -1])
    assert not torch.allclose(naive, logits[0], atol=1e-3)


def test_batched_logits_equal_one_message_at_a_time(base):
    model = ft.add_classification_head(base)
    batch = [([1, 2, 3, 4, 5, 6], 0), ([7, 8], 1), ([9, 10, 11], 0)]
    input_ids, lengths, _ = pad_collate(batch)
    together = ft.last_token_logits(model, input_ids, lengths)
    for row, (ids, _) in enumerate(batch):
        alone = ft.last_token_logits(model, torch.tensor([ids]), torch.tensor([len(ids)]))
        torch.testing.assert_close(together[row : row + 1], alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", ["lora-r8", "full"])
def test_last_block_at_one_position_gives_the_same_logits_and_gradients(base, variant):
    """``last_token_logits`` runs the last block at the last real token only; reading every
    position's output and picking that token must give the same logits and gradients."""
    model = ft.prepare_variant(base, variant, ft.FULL_FINETUNE)
    with torch.no_grad():  # make the LoRA updates non-zero
        for name, p in model.named_parameters():
            if name.endswith((".B", ".A")):
                p.normal_(std=0.1)
    input_ids, lengths, labels = pad_collate([([1, 2, 3, 4, 5, 6], 0), ([7, 8], 1), ([9], 0)])
    rows = torch.arange(3)

    def logits_and_grads(every_position: bool):
        model.zero_grad(set_to_none=True)
        if every_position:
            logits = model.out_head(model.hidden_states(input_ids)[rows, lengths - 1])
        else:
            logits = ft.last_token_logits(model, input_ids, lengths)
        torch.nn.functional.cross_entropy(logits, labels).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return logits.detach(), grads

    fast_logits, fast_grads = logits_and_grads(every_position=False)
    slow_logits, slow_grads = logits_and_grads(every_position=True)
    torch.testing.assert_close(fast_logits, slow_logits, rtol=0, atol=1e-5)
    assert fast_grads.keys() == slow_grads.keys() and len(fast_grads) > 2
    for name, grad in fast_grads.items():
        torch.testing.assert_close(grad, slow_grads[name], rtol=0, atol=1e-5, msg=name)


def test_new_head_is_untied_and_two_class(base):
    model = ft.add_classification_head(base)
    assert model.out_head.weight.shape == (2, 64)
    assert model.out_head.weight is not model.tok_emb.weight


def test_variants_train_exactly_the_expected_parameters(base):
    recipe = ft.FULL_FINETUNE
    emb, head = 64, 64 * 2 + 2
    block = count_parameters(base.trf_blocks[-1])
    with torch.no_grad():
        total = count_parameters(ft.add_classification_head(GPTModel(base.cfg)))
    expected = {
        "head": head,
        "last-block": block + 2 * emb + head,
        "full": total,
        # the blocks' six linear layers, and the token embedding (vocabulary × r + r × width)
        "lora-r8": 2 * 8 * (4 * (emb + emb) + 2 * (emb + 4 * emb)) + 8 * (50257 + emb) + head,
        "lora-r16": 2 * 16 * (4 * (emb + emb) + 2 * (emb + 4 * emb)) + 16 * (50257 + emb) + head,
    }
    for variant, count in expected.items():
        model = ft.prepare_variant(base, variant, recipe)
        assert count_parameters(model, trainable_only=True) == count, variant
    assert all(p.requires_grad for p in base.parameters())  # the base itself is untouched
    with pytest.raises(ValueError, match="Unknown variant"):
        ft.prepare_variant(base, "lora", recipe)


def test_every_variant_starts_from_the_same_head(base):
    heads = [ft.prepare_variant(base, v, ft.FULL_FINETUNE).out_head.weight for v in ft.VARIANTS]
    assert all(torch.equal(h, heads[0]) for h in heads)


def test_unseen_test_messages():
    split = sms_spam_split()
    mask = ft.unseen_test_mask(split)
    train_texts = {t for _, t in split["train"]}
    assert mask.shape == (300,)
    assert int((~mask).sum()) == sum(t in train_texts for _, t in split["test"]) > 0


def test_quick_run_of_a_variant_reports_everything(base):
    tokenizer = get_tokenizer()
    recipe = ft.FinetuneRecipe(epochs=2, max_messages=16)
    split = ft.shrink_split(sms_spam_split(), recipe.max_messages)
    loaders = message_loaders(split, tokenizer, recipe.batch_size, base.cfg.context_length, "cpu")
    device = torch.device("cpu")
    model, result = ft.run_variant(base, "lora-r8", loaders, split, device, recipe)
    assert result.history.steps == [2, 4]
    assert set(result.history.metrics[0]) == {"train_acc", "val_acc"}
    assert 0.0 <= result.test_acc <= 1.0
    if resident_mib() is not None:  # at least the run's own copy of the model
        assert result.peak_mem_mib > count_parameters(model) * 4 / 2**20
    trainable = ft.trainable_state_dict(model)
    assert result.trainable_params == sum(t.numel() for t in trainable.values())
    assert result.saved_mib * 2**20 > 4 * result.trainable_params  # fp32 + a small header
    label, prob = ft.classify(model, "WINNER!! Claim your prize now", tokenizer, device)
    assert label in ("ham", "spam") and 0.5 <= prob <= 1.0


def test_results_are_saved_for_later_notebooks(monkeypatch, tmp_path, base):
    monkeypatch.setenv("LORA_ARTIFACTS_DIR", str(tmp_path))
    assert ft.load_results() is None
    result = ft.VariantResult("lora-r8", 0.9, 0.85, 100, None, 1.5, 0.01, history=None)
    ft.save_results([result], torch.device("cpu"))
    saved = ft.load_results()
    assert saved["device"] == "cpu"
    assert saved["results"] == [
        {
            "variant": "lora-r8",
            "test_acc": 0.9,
            "unseen_test_acc": 0.85,
            "trainable_params": 100,
            "peak_mem_mib": None,
            "seconds": 1.5,
            "saved_mib": 0.01,
        }
    ]


def test_runs_on_the_same_loaders_see_the_same_batches(base):
    recipe = ft.FinetuneRecipe(epochs=1, max_messages=16)
    split = ft.shrink_split(sms_spam_split(), recipe.max_messages)
    loaders = message_loaders(
        split, get_tokenizer(), recipe.batch_size, base.cfg.context_length, "cpu"
    )
    device = torch.device("cpu")
    first = ft.run_variant(base, "lora-r8", loaders, split, device, recipe)[0]
    second = ft.run_variant(base, "lora-r8", loaders, split, device, recipe)[0]
    for (name, a), b in zip(first.named_parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_by_length_reads_every_message_once_sorted_without_touching_the_shuffle():
    split = ft.shrink_split(sms_spam_split(), 100)
    loaders = message_loaders(split, get_tokenizer(), 8, 128, "cpu")
    sampler = loaders["train"].batch_sampler
    state = sampler.generator.get_state()
    evaluation = ft.by_length(loaders["train"], batch_size=32)
    batches = list(evaluation.batch_sampler)
    assert [len(b) for b in batches] == [32, 32, 32, 4]
    order = [i for batch in batches for i in batch]
    assert sorted(order) == list(range(100))  # every message once
    lengths = [len(loaders["train"].dataset.ids[i]) for i in order]
    assert lengths == sorted(lengths)
    padded = sum(ids.numel() for ids, _, _ in evaluation)
    assert padded < sum(ids.numel() for ids, _, _ in ft.in_order(loaders["train"], 32))
    assert torch.equal(sampler.generator.get_state(), state)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            ft.by_length(loaders["train"], batch_size=bad)


@pytest.mark.parametrize("variant", ["lora-r8", "head"])  # "head" trains on the cached trunk
def test_measuring_accuracies_leaves_the_training_batches_as_they_were(base, variant, monkeypatch):
    """The training accuracy reads the training messages in a fixed order: a pass through the
    shuffling loader would draw a shuffle from its generator and change every later epoch."""
    recipe = ft.FinetuneRecipe(epochs=3, max_messages=24)
    split = ft.shrink_split(sms_spam_split(), recipe.max_messages)
    loaders = message_loaders(
        split, get_tokenizer(), recipe.batch_size, base.cfg.context_length, "cpu"
    )
    device, runs, train = torch.device("cpu"), {}, ft.train

    def without_accuracies(*args, eval_metrics=None, **kwargs):
        return train(*args, **kwargs)

    for accuracies in (False, True):
        if not accuracies:
            monkeypatch.setattr(ft, "train", without_accuracies)
        model = ft.prepare_variant(base, variant, recipe)
        lr = recipe.learning_rate(variant)
        runs[accuracies] = model, ft.finetune(model, loaders, device, recipe, lr)
        monkeypatch.undo()
    (plain, h_plain), (measured, h_measured) = runs[False], runs[True]
    assert h_measured.steps == [3, 6, 9] and len(h_measured.metrics) == 3
    assert h_measured.train_loss == h_plain.train_loss
    for (name, a), b in zip(plain.named_parameters(), measured.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_a_killed_fine_tuning_run_resumes_to_the_same_weights(base, tmp_path, monkeypatch):
    """Killed in its second epoch, after a resume file was written: started again, the run
    ends with exactly the weights of a run never interrupted (the shuffle of the epoch it was
    killed in, drawn by the batch sampler's generator, is restored)."""
    from lora_helpers import train as train_module

    recipe = ft.FinetuneRecipe(epochs=2, max_messages=48)  # 6 steps per epoch
    split = ft.shrink_split(sms_spam_split(), recipe.max_messages)

    def run(resume):
        loaders = message_loaders(split, get_tokenizer(), 8, base.cfg.context_length, "cpu")
        model = ft.prepare_variant(base, "lora-r8", recipe)
        saving = Saving(resume_path=resume, save_every=2)
        ft.finetune(
            model, loaders, torch.device("cpu"), recipe, 1e-2, saving=saving, progress=False
        )
        return model

    expected = run(None).state_dict()
    step, calls = train_module.optimizer_step, []

    def interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 10:  # step 10: the resume file of step 8 holds 2 batches of epoch 2
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    resume = tmp_path / "run.resume.pt"
    monkeypatch.setattr(train_module, "optimizer_step", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(resume)
    monkeypatch.setattr(train_module, "optimizer_step", step)
    assert resume.exists()
    state = run(resume).state_dict()
    assert all(torch.equal(state[k], v) for k, v in expected.items())
    assert not resume.exists()  # deleted once the run completed


def tiny_base() -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(gpt_config("scratch-tiny", vocab_size=100)).eval()


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_classify_refuses_an_empty_message(text):
    model = ft.add_classification_head(tiny_base())
    with pytest.raises(ValueError, match="empty or whitespace-only message"):
        ft.classify(model, text, get_tokenizer(), torch.device("cpu"))
