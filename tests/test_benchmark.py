"""A smoke run of benchmarks/finetune_speed.py: it runs and writes what the issue asks for.
Speed itself is never asserted (it depends on the machine)."""

import json

from benchmarks import finetune_speed as bench


def test_benchmark_writes_one_row_per_variant_with_exactly_the_required_keys(tmp_path, capsys):
    out = tmp_path / "results.json"
    variants = ["naive-lora", "fast-lora", "fast-full"]
    argv = ["--preset", "scratch-tiny", "--epochs", "1", "--max-messages", "24", "--threads", "1"]
    returned = bench.main([*argv, "--out", str(out), "--variants", *variants])
    rows = json.loads(out.read_text())
    assert [row["variant"] for row in rows] == variants
    for row in rows:
        assert list(row) == list(bench.RESULT_KEYS)
        assert row["seconds"] > 0 and row["examples_per_s"] > 0
        assert row["peak_mem_mib"] is None or row["peak_mem_mib"] > 0
        assert 0 <= row["test_acc"] <= 100
    naive, lora, full = (row["trainable_params"] for row in rows)
    assert naive == lora < full
    assert [r["variant"] for r in returned] == variants
    printed = capsys.readouterr().out
    assert "Speed-up vs naive-lora" in printed and "| fast-lora |" in printed


def test_device_names_become_file_names():
    assert bench.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert bench.slug("cpu") == "cpu"
