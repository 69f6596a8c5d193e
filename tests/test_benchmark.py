"""A smoke run of benchmarks/finetune_speed.py and tests of its levers (benchmarks/levers.py).
Speed itself is never asserted (it depends on the machine)."""

import copy
import json
from dataclasses import fields, replace

import pytest
import torch

from benchmarks import finetune_speed as bench
from benchmarks import levers as lv
from benchmarks import report
from benchmarks.fused_qkv import fuse_qkv
from lora_helpers import finetune as ft
from lora_helpers.data import PAD_ID, message_loaders
from lora_helpers.device import capabilities
from lora_helpers.lora import LoRAConfig
from lora_helpers.model import GPTModel, MultiHeadAttention, gpt_config

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


def test_benchmark_writes_one_row_per_variant_with_exactly_the_required_keys(tmp_path, capsys):
    out = tmp_path / "results.json"
    argv = ["--preset", "scratch-tiny", "--epochs", "1", "--max-messages", "24", "--threads", "1"]
    argv += ["--seeds", "2"]
    variants = list(bench.VARIANTS) if bench.peft_available() else list(bench.VARIANTS[:3])
    returned = bench.main([*argv, "--out", str(out), "--variants", *variants])
    result = json.loads(out.read_text())
    assert result == returned
    assert {"device", "torch", "threads", "date", "preset", "epochs"} <= set(result["metadata"])
    assert result["metadata"]["seeds"] == [123, 124]
    assert result["metadata"]["base"] == "fresh init" and result["metadata"]["threads"] == 1
    rows = result["rows"]
    assert [row["variant"] for row in rows] == variants
    for row in rows:
        assert list(row) == list(bench.RESULT_KEYS)
        assert row["seconds"] > 0 and row["examples_per_s"] > 0 and row["useful_gflops"] > 0
        assert row["peak_mem_mib"] is None or row["peak_mem_mib"] >= 0
        low, high = row["unseen_test_acc_range"]
        assert 0 <= low <= row["unseen_test_acc"] <= high <= 100
        assert len(row["seconds_per_run"]) == 2
        assert min(row["seconds_per_run"]) <= row["seconds"] <= max(row["seconds_per_run"])
    by = {row["variant"]: row["trainable_params"] for row in rows}
    assert by["naive-lora"] == by["ours-lora"] < by["ours-full"]
    cfg = gpt_config("scratch-tiny")
    d, layers, r = cfg.emb_dim, cfg.n_layers, bench.RANK
    assert by["ours-lora"] == layers * 18 * r * d + 2 * d + 2  # q, k, v: three adapters
    if "peft-lora" in by:
        assert by["peft-lora"] == layers * 16 * r * d + 2 * d  # fused c_attn, head without bias
    printed = capsys.readouterr().out
    assert "calibration: matmul" in printed and "ours-lora >= 5.0x naive-lora" in printed
    table = report.format_markdown(result)
    assert "| ours-lora |" in table and "| calibration: matmul |" in table
    study = [{**rows[1], "variant": "ours-lora"}, {**rows[1], "variant": "without sdpa"}]
    assert "| without sdpa | " in report.format_markdown({**result, "lever_study": study})


def test_the_readme_table_is_what_the_committed_results_give():
    readme = report.README.read_text()
    start = readme.index(report.TABLE_START) + len(report.TABLE_START)
    section = readme[start : readme.index(report.TABLE_END)].strip()
    assert section == report.readme_table(), "run: python -m benchmarks.finetune_speed --table"


def test_device_names_become_file_names():
    assert report.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert report.slug("cpu") == "cpu"


def test_targets_report_the_measured_ratio():
    def row(name, speed, acc, peak):
        return {"variant": name, "examples_per_s": speed, "unseen_test_acc": acc,
                "peak_mem_mib": peak}  # fmt: skip

    rows = [
        row("naive-lora", 10, 90, 50),
        row("ours-lora", 60, 91, 20),
        row("ours-full", 50, 92, 40),
    ]
    met = {
        target.split(" examples")[0]: (ok, measured)
        for target, ok, measured in report.targets(rows)
    }
    assert met["ours-lora >= 5.0x naive-lora"] == (True, "6.00x, accuracy +1.00 points")
    assert met["ours-lora >= 1.5x peft-lora"] == (None, "not measured")
    assert met["ours-lora >= 1.3x ours-full"][0] is False  # 1.2x


# --- the levers ------------------------------------------------------------------------------


def test_lever_study_flips_one_lever_at_a_time():
    on_cpu = lv.lever_study_levers(CPU)
    assert set(on_cpu) == {
        "without sdpa",
        "without pad_per_batch",
        "without length_buckets",
        "without last_token_head",
        "without last_token_block",
        "without fused_adamw",
        "with compile",
        "with fused_qkv",
    }
    for levers in on_cpu.values():
        changed = [
            f.name for f in fields(lv.Levers) if getattr(levers, f.name) != getattr(lv.OURS, f.name)
        ]
        assert len(changed) == 1
    assert not any(
        getattr(lv.NAIVE, f.name) for f in fields(lv.Levers) if f.name != "length_buckets"
    )


class WordTokenizer:
    """One token per word: 'spam' words are odd ids, 'ham' words even ones."""

    def encode(self, text):
        return [int(w) for w in text.split()]


def toy_split(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    messages = []
    for i in range(n):
        label = "spam" if i % 2 else "ham"
        length = int(torch.randint(2, 14, (), generator=g)) + (6 if label == "spam" else 0)
        ids = 2 * torch.randint(0, 40, (length,), generator=g) + (label == "spam")
        messages.append((label, " ".join(map(str, ids.tolist()))))
    return {"train": messages, "validation": messages[:16], "test": messages[:16]}


@pytest.fixture
def base() -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(gpt_config("scratch-tiny", context_length=32)).eval()


def test_loaders_pad_as_the_levers_say():
    loaders = message_loaders(toy_split(), WordTokenizer(), 8, 32, CPU)
    longest = max(len(ids) for ids in loaders["train"].dataset.ids)
    widths, first = {}, {}
    for name, levers in (("ours", lv.OURS), ("naive", lv.NAIVE)):
        loaders["train"].batch_sampler.generator.manual_seed(1)  # as finetune does
        batches = list(lv.loaders_for(loaders, levers, longest, seed=1)["train"])
        widths[name] = sum(ids.shape[1] for ids, _, _ in batches)
        first[name] = batches[0][2]
        for ids, lengths, _ in batches:
            assert ids.shape[1] == (longest if name == "naive" else lengths.max())
    assert widths["ours"] < widths["naive"]
    assert torch.equal(first["ours"], first["naive"])  # the same batches
    random_batches = replace(lv.OURS, length_buckets=False)
    unsorted = lv.loaders_for(loaders, random_batches, longest, seed=1)["train"]
    assert isinstance(unsorted.batch_sampler, lv.ShuffledBatches)
    epoch = list(unsorted.batch_sampler)
    assert len(epoch) == 6 and sorted(i for b in epoch for i in b) == list(range(48))


def test_the_naive_head_reads_the_same_logits(base):
    model = ft.add_classification_head(base)
    input_ids = torch.full((2, 9), PAD_ID)
    input_ids[0, :4], input_ids[1, :9] = torch.arange(4), torch.arange(9)
    lengths = torch.tensor([4, 9])
    ours = ft.last_token_logits(model, input_ids, lengths)
    torch.testing.assert_close(lv.all_positions_logits(model, input_ids, lengths), ours)
    torch.testing.assert_close(lv.every_position_logits(model, input_ids, lengths), ours)


def test_levers_change_how_not_what(base):
    """The same batches: the naive switches and ours train the same model (through train)."""
    split = toy_split()
    recipe = ft.FinetuneRecipe(epochs=2)
    results = []
    for levers in (lv.NAIVE, lv.OURS):
        loaders = message_loaders(split, WordTokenizer(), 8, 32, CPU)
        longest = max(len(ids) for ids in loaders["train"].dataset.ids)
        loaders = lv.loaders_for(loaders, levers, longest, recipe.seed)
        model = ft.prepare_variant(base, "lora-r8", recipe)
        history = lv.finetune_with(model, loaders, CPU, recipe, 1e-2, levers)
        results.append((history, model))
    (naive, naive_model), (ours, ours_model) = results
    assert not any(m.use_sdpa for m in naive_model.modules() if isinstance(m, MultiHeadAttention))
    assert ours.train_loss == pytest.approx(naive.train_loss, rel=1e-4)
    assert ours.val_loss == pytest.approx(naive.val_loss, rel=1e-4)
    for (name, a), b in zip(naive_model.named_parameters(), ours_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name)


def test_matmul_params_count_what_every_token_and_the_last_token_need(base):
    lora = ft.prepare_variant(base, "lora-r8", ft.FULL_FINETUNE)
    every, every_trainable, last, last_trainable = bench.matmul_params(lora)
    d, layers, r = base.cfg.emb_dim, base.cfg.n_layers, 8
    # per block: q, k, v, out 4 d², the MLP 8 d²; adapters r(in + out): 18 r d
    # the last block's q, out and MLP (10 d², adapters 14 r d) serve its last token alone
    assert last == 10 * d * d + 14 * r * d and last_trainable == 14 * r * d
    assert every_trainable == layers * 18 * r * d - 14 * r * d
    assert every == layers * 12 * d * d - 10 * d * d + every_trainable
    full = bench.matmul_params(ft.prepare_variant(base, "full", ft.FULL_FINETUNE))
    assert full == (every - every_trainable, every - every_trainable, 10 * d * d, 10 * d * d)
    assert bench.matmul_gflops(16, CPU, tokens=16) > 0


@pytest.fixture
def lora_model() -> ft.GPTModel:
    torch.manual_seed(0)
    base = GPTModel(gpt_config("scratch-tiny", context_length=32)).eval()
    return ft.prepare_variant(base, "lora-r8", ft.FULL_FINETUNE)


def test_cast_frozen_base_keeps_the_adapters_in_fp32(lora_model):
    n_layers = lora_model.cfg.n_layers
    assert lv.cast_frozen_base(lora_model) == 6 * n_layers
    block = lora_model.trf_blocks[0]
    assert block.att.W_query.linear.weight.dtype == torch.bfloat16
    assert block.att.W_query.lora.A.dtype == torch.float32
    assert lora_model.out_head.weight.dtype == lora_model.tok_emb.weight.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_frozen_base_computes_what_autocast_computes(lora_model):
    input_ids = torch.randint(0, 100, (4, 12), device=CUDA)
    lengths = torch.tensor([12, 5, 7, 1], device=CUDA)
    model = lora_model.to(CUDA)
    assert capabilities(CUDA).cuda_graphs and capabilities(CUDA).pad_multiple == 16
    with capabilities(CUDA).autocast(cache_enabled=False):
        before = ft.last_token_logits(model, input_ids, lengths)
        lv.cast_frozen_base(model)
        after = ft.last_token_logits(model, input_ids, lengths)
    torch.testing.assert_close(after, before)


def test_step_profile_times_each_phase_and_counts_the_operators(base, tmp_path):
    from benchmarks import step_profile

    split = toy_split()
    loaders = message_loaders(split, WordTokenizer(), 8, 32, CPU)
    batches = list(loaders["train"])
    setups = {
        variant: (ft.prepare_variant(base, variant, ft.FULL_FINETUNE), 1e-3, ft.last_token_logits)
        for variant in ("lora-r8", "full")
    }
    profiles = step_profile.profile_variants(setups, batches, CPU, warmup=1, timed=2, profiled=2)
    assert list(profiles) == ["lora-r8", "full"]
    for profile in profiles.values():
        assert set(profile["ms"]) == set(step_profile.PHASES)
        assert all(ms > 0 for ms in profile["ms"].values())
        assert profile["leaf_ops_per_step"] > 10 and "aten::mm" in profile["ops"]
        assert profile["saved_mib"] > 0
    # LoRA's adapters add matrix products: more mm calls per step than full fine-tuning
    assert profiles["lora-r8"]["ops"]["aten::mm"][1] > profiles["full"]["ops"]["aten::mm"][1]
    with pytest.raises(ValueError, match="Need 13 batches"):
        step_profile.profile_variants(setups, batches[:5], CPU, warmup=3, timed=10, profiled=4)
    table = step_profile.format_profile(profiles, top=1000)  # all: their order is timing
    assert "| per training step | lora-r8 | full |" in table and "| `mm` |" in table
    assert "| kept for backward (MiB, first batch) |" in table
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{step_profile.START}\nold\n{step_profile.END}\nrest\n")
    step_profile.update_readme(table, readme)
    assert readme.read_text() == f"intro\n{step_profile.START}\n{table}\n{step_profile.END}\nrest\n"


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_fused_qkv_computes_what_the_separate_layers_compute(qkv_bias):
    """The fused path's logits (at every position and at the last tokens) and the LoRA and
    head gradients equal the library's separate layers' within 1e-5."""
    torch.manual_seed(0)
    base = GPTModel(gpt_config("scratch-tiny", context_length=32, qkv_bias=qkv_bias)).eval()
    recipe = ft.FULL_FINETUNE.with_lora_targets("blocks")
    plain = ft.prepare_variant(base, "lora-r8", recipe)
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if name.endswith(".B"):
                p.normal_(std=0.1)
    fused = copy.deepcopy(plain)
    assert fuse_qkv(fused) == base.cfg.n_layers
    input_ids = torch.randint(0, 100, (3, 12))
    lengths = torch.tensor([12, 5, 1])
    torch.testing.assert_close(fused(input_ids), plain(input_ids), rtol=0, atol=1e-5)
    for model in (plain, fused):
        model.zero_grad()
        ft.classification_loss(model, (input_ids, lengths, torch.tensor([0, 1, 1])), CPU).backward()
    grads = {n: p.grad for n, p in fused.named_parameters() if p.grad is not None}
    expected = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    assert len(grads) == len(expected) == 2 + 12 * base.cfg.n_layers  # head + 6 adapters/block
    for (name, grad), want in zip(grads.items(), expected.values(), strict=True):
        torch.testing.assert_close(grad, want, rtol=0, atol=1e-5, msg=name)


def test_fused_qkv_refuses_dropout_and_olora(base):
    recipe = replace(ft.FULL_FINETUNE, lora_variants={"lora-r8": LoRAConfig(8, 8, dropout=0.1)})
    with pytest.raises(ValueError, match="without dropout"):
        fuse_qkv(ft.prepare_variant(base, "lora-r8", recipe))
