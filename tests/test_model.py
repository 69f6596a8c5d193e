import pytest
import torch
import torch.nn.functional as F

from lora_helpers.model import (
    GPTModel,
    MultiHeadAttention,
    eval_mode,
    generate,
    gpt_config,
)


def test_output_shapes(tiny_model):
    idx = torch.randint(0, 1000, (3, 10))
    assert tiny_model(idx).shape == (3, 10, 1000)
    assert tiny_model.hidden_states(idx).shape == (3, 10, 64)


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_last_positions_only_equal_the_full_forward_there(tiny_model, use_sdpa):
    for m in tiny_model.modules():
        if isinstance(m, MultiHeadAttention):
            m.use_sdpa = use_sdpa
    torch.manual_seed(1)
    idx, last = torch.randint(0, 1000, (3, 9)), torch.tensor([8, 0, 4])
    rows = torch.arange(3)
    with torch.no_grad():
        full = tiny_model.hidden_states(idx)[rows, last]
        block = tiny_model.trf_blocks[-1]
        x = torch.randn(3, 9, 64)
        expected_block = block(x)[rows, last]
        got_block = block(x, last)
    assert tiny_model.hidden_states(idx, last).shape == (3, 64)
    torch.testing.assert_close(tiny_model.hidden_states(idx, last), full, rtol=0, atol=1e-5)
    assert got_block.shape == (3, 1, 64)
    torch.testing.assert_close(got_block[:, 0], expected_block, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("last", "message"),
    [
        (torch.tensor([9, 0, 4]), r"positions in \[0, 9\)"),
        (torch.tensor([-1, 0, 4]), r"positions in \[0, 9\)"),
        (torch.tensor([1, 2]), r"shape \(3,\)"),
        (torch.tensor([1.0, 2.0, 3.0]), "integer position"),
    ],
)
def test_bad_last_positions_are_refused(tiny_model, last, message):
    with pytest.raises(ValueError, match=message):
        tiny_model.hidden_states(torch.randint(0, 1000, (3, 9)), last)


def test_last_positions_of_an_empty_batch_give_an_empty_result(tiny_model):
    empty = torch.zeros(0, 9, dtype=torch.long)
    assert tiny_model.hidden_states(empty, torch.zeros(0, dtype=torch.long)).shape == (0, 64)


def test_too_long_input_is_an_error(tiny_model):
    with pytest.raises(ValueError, match="context_length is 64"):
        tiny_model(torch.zeros(1, 65, dtype=torch.long))


def test_causality_future_tokens_never_change_earlier_outputs(tiny_model):
    idx = torch.randint(0, 1000, (2, 20))
    changed = idx.clone()
    changed[:, 12:] = torch.randint(0, 1000, (2, 8))
    for use_sdpa in (True, False):
        for m in tiny_model.modules():
            if isinstance(m, MultiHeadAttention):
                m.use_sdpa = use_sdpa
        a, b = tiny_model(idx), tiny_model(changed)
        torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-6)
        assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_attention_matches_pytorch_sdpa():
    torch.manual_seed(0)
    att = MultiHeadAttention(48, 48, context_length=32, dropout=0.0, num_heads=4).eval()
    x = torch.randn(2, 32, 48)
    att.use_sdpa = False
    manual = att(x)
    # Reference: PyTorch's fused attention on the same projections.
    q, k, v = (
        p(x).view(2, 32, 4, 12).transpose(1, 2) for p in (att.W_query, att.W_key, att.W_value)
    )
    reference = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    reference = att.out_proj(reference.transpose(1, 2).reshape(2, 32, 48))
    torch.testing.assert_close(manual, reference, rtol=0, atol=1e-6)
    att.use_sdpa = True
    torch.testing.assert_close(att(x), manual, rtol=0, atol=1e-6)


def test_whole_model_same_logits_with_and_without_sdpa(tiny_model):
    idx = torch.randint(0, 1000, (2, 64))
    fast = tiny_model(idx)
    for m in tiny_model.modules():
        if isinstance(m, MultiHeadAttention):
            m.use_sdpa = False
    torch.testing.assert_close(tiny_model(idx), fast, rtol=0, atol=1e-5)


def test_weight_tying_shares_one_tensor(tiny_model):
    assert tiny_model.out_head.weight is tiny_model.tok_emb.weight
    untied = GPTModel(gpt_config("scratch-tiny", vocab_size=1000, tie_weights=False))
    assert untied.out_head.weight is not untied.tok_emb.weight


def test_unknown_preset_lists_the_choices():
    with pytest.raises(KeyError, match="gpt2-124M"):
        gpt_config("gpt5")


def test_greedy_generation_is_deterministic_and_extends(tiny_model):
    idx = torch.tensor([[1, 2, 3]])
    out = generate(tiny_model, idx, max_new_tokens=5)
    assert out.shape == (1, 8) and torch.equal(out[:, :3], idx)
    assert torch.equal(out, generate(tiny_model, idx, max_new_tokens=5))


def test_sampling_repeats_under_a_seed_and_differs_across_seeds(tiny_model):
    idx = torch.tensor([[1, 2, 3]])

    def sample(seed):
        g = torch.Generator().manual_seed(seed)
        return generate(tiny_model, idx, 30, temperature=1.5, top_k=50, generator=g)

    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))


def test_top_k_one_equals_greedy(tiny_model):
    idx = torch.tensor([[5, 6]])
    g = torch.Generator().manual_seed(0)
    sampled = generate(tiny_model, idx, 10, temperature=1.0, top_k=1, generator=g)
    assert torch.equal(sampled, generate(tiny_model, idx, 10))


def test_generation_stops_at_end_of_text(tiny_model):
    idx = torch.tensor([[1, 2, 3]])
    first = generate(tiny_model, idx, 1)[0, -1].item()
    out = generate(tiny_model, idx, 10, eos_id=first)
    assert out.shape == (1, 4) and out[0, -1].item() == first


def test_generation_restores_training_mode(tiny_model):
    tiny_model.train()
    generate(tiny_model, torch.tensor([[1]]), 2)
    assert tiny_model.training


@pytest.mark.parametrize("training", [True, False])
def test_eval_mode_switches_dropout_off_and_restores_the_mode_even_on_error(training):
    model = GPTModel(gpt_config("scratch-tiny", vocab_size=100)).train(training)
    with pytest.raises(RuntimeError), eval_mode(model):
        assert not model.training and not any(m.training for m in model.modules())
        raise RuntimeError("interrupted")
    assert all(m.training == training for m in model.modules())
