import pytest
import torch

from lora_helpers import finetune as ft
from lora_helpers import trunk
from lora_helpers.data import message_loaders, sms_spam_split
from lora_helpers.model import GPTModel, gpt_config
from lora_helpers.tokenizer import get_tokenizer

CPU = torch.device("cpu")


@pytest.fixture
def base() -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(gpt_config("scratch-tiny", n_layers=3)).eval()


@pytest.fixture
def setting(base):
    recipe = ft.FinetuneRecipe(epochs=2, max_messages=40)
    split = ft.shrink_split(sms_spam_split(), recipe.max_messages)
    max_length = base.cfg.context_length
    loaders = message_loaders(split, get_tokenizer(), recipe.batch_size, max_length, CPU)
    return recipe, split, loaders


def test_cut_points_of_the_variants(base):
    recipe = ft.FULL_FINETUNE
    cuts = {v: trunk.cut_point(ft.prepare_variant(base, v, recipe)) for v in ft.VARIANTS}
    assert cuts == {
        "head": trunk.HEAD_ONLY,
        "last-block": 2,
        "full": None,
        "lora-r8": None,  # adapters in the first block: nothing frozen to cache
        "lora-r16": None,
    }
    dropout = GPTModel(gpt_config("scratch-tiny", drop_rate=0.1))
    assert trunk.cut_point(ft.prepare_variant(dropout, "head", recipe)) is None


@pytest.mark.parametrize("variant", ["head", "last-block"])
def test_cached_features_equal_the_full_forward(base, setting, variant):
    _, _, loaders = setting
    model = ft.prepare_variant(base, variant, ft.FULL_FINETUNE).eval()
    cut = trunk.cut_point(model)
    cached = trunk.cached_loaders(model, {"validation": loaders["validation"]}, CPU, cut)
    for (input_ids, lengths, _), batch in zip(
        loaders["validation"], cached["validation"], strict=True
    ):
        with torch.no_grad():
            expected = ft.last_token_logits(model, input_ids, lengths)
            got = trunk.top_logits(model, batch, CPU, cut)
            hidden = trunk.trunk_features(model, input_ids, trunk.HEAD_ONLY)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        if cut == trunk.HEAD_ONLY:
            last = hidden[torch.arange(len(lengths)), lengths - 1]
            torch.testing.assert_close(batch[0], last, rtol=0, atol=1e-5)
        else:
            assert torch.equal(batch[1], lengths)
            features = trunk.trunk_features(model, input_ids, cut)
            for row, n in enumerate(lengths.tolist()):
                torch.testing.assert_close(batch[0][row, :n], features[row, :n], rtol=0, atol=1e-5)
                assert not batch[0][row, n:].any()  # zero padding


def test_cached_train_loader_gives_the_same_batches(base, setting):
    _, _, loaders = setting
    model = ft.prepare_variant(base, "head", ft.FULL_FINETUNE)
    cached = trunk.cached_loaders(model, {"train": loaders["train"]}, CPU, trunk.HEAD_ONLY)
    for seed in (1, 2):
        loaders["train"].batch_sampler.generator.manual_seed(seed)
        labels = [b[-1] for b in loaders["train"]]
        cached["train"].batch_sampler.generator.manual_seed(seed)
        assert [b[-1].tolist() for b in cached["train"]] == [t.tolist() for t in labels]


@pytest.mark.parametrize("variant", ["head", "last-block"])
def test_training_on_the_cache_gives_the_same_model(base, setting, variant):
    recipe, split, loaders = setting
    runs = {}
    for cache in (False, True):
        model = ft.prepare_variant(base, variant, recipe)
        lr = recipe.learning_rate(variant)
        history = ft.finetune(model, loaders, CPU, recipe, lr, cache_trunk=cache)
        runs[cache] = model, history
    (plain, h_plain), (cached, h_cached) = runs[False], runs[True]
    for (name, a), b in zip(plain.named_parameters(), cached.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5, msg=name)
    assert h_cached.steps == h_plain.steps
    torch.testing.assert_close(h_cached.train_loss, h_plain.train_loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(h_cached.val_loss, h_plain.val_loss, rtol=0, atol=1e-5)
    assert h_cached.metrics == h_plain.metrics


def test_run_variant_caches_and_the_full_model_classifies_with_the_trained_top(base, setting):
    recipe, split, loaders = setting
    model, result = ft.run_variant(base, "last-block", loaders, split, CPU, recipe)
    assert model.trf_blocks[-1].att.W_query.weight.requires_grad
    assert not torch.equal(
        model.out_head.weight, ft.prepare_variant(base, "head", recipe).out_head.weight
    )
    assert result.seconds >= result.history.seconds > 0
    predictions, truth = ft.predict(model, loaders["validation"], CPU)
    val_acc = (predictions == truth).float().mean().item()
    assert val_acc == pytest.approx(result.history.metrics[-1]["val_acc"])
    label, prob = ft.classify(model, "WINNER!! Claim your prize now", get_tokenizer(), CPU)
    assert label in ("ham", "spam") and 0.5 <= prob <= 1.0
