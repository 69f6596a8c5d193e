import time

import torch

from lora_helpers.device import get_device, median_ms


def test_device_report(capsys):
    device = get_device()
    assert device.type in ("cuda", "mps", "cpu")
    assert capsys.readouterr().out.startswith("Using ")


def test_median_ms_measures_the_call():
    calls = []

    def sleep_5ms():
        calls.append(1)
        time.sleep(0.005)

    ms = median_ms(sleep_5ms, torch.device("cpu"), repeats=5)
    assert len(calls) == 6  # one warm-up + 5 timed
    assert ms >= 5.0  # time.sleep never returns early
