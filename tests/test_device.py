import time

import pytest
import torch

from lora_helpers import device as device_module
from lora_helpers.device import (
    PeakMemory,
    capabilities,
    get_device,
    has_native_bf16,
    median_ms,
    resident_mib,
)
from lora_helpers.train import lm_loss


@pytest.fixture
def pretended_device():
    """Capabilities are decided once per device: forget them around a test that pretends."""
    device_module._capabilities.cache_clear()
    yield
    device_module._capabilities.cache_clear()


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


CAPABILITIES = [((7, 5), False), ((8, 0), True), ((9, 0), True)]  # T4, A100, H100


@pytest.mark.parametrize(("capability", "native"), CAPABILITIES)
@pytest.mark.filterwarnings("ignore:CUDA is not available")  # a CPU-only machine pretends here
def test_bf16_autocast_only_with_bf16_in_hardware(
    monkeypatch, pretended_device, capability, native
):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    cuda = torch.device("cuda")
    assert has_native_bf16(cuda) is native
    assert isinstance(capabilities(cuda).autocast(), torch.autocast) is native


@pytest.mark.parametrize("native", [False, True])
def test_on_a_cpu_only_the_language_model_loss_runs_in_bf16(
    monkeypatch, pretended_device, native, tiny_model
):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    cpu = torch.device("cpu")
    assert has_native_bf16(cpu) is native
    assert not isinstance(capabilities(cpu).autocast(), torch.autocast)  # small products: fp32
    large = capabilities(cpu).autocast(large_products=True)
    assert isinstance(large, torch.autocast) is native
    dtypes = []
    tiny_model.out_head.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    idx = torch.randint(0, 1000, (2, 8))
    loss = lm_loss(tiny_model, (idx, idx), cpu)
    assert dtypes == [torch.bfloat16 if native else torch.float32]
    assert loss.dtype == torch.float32


@pytest.mark.skipif(resident_mib() is None, reason="resident memory is read from /proc (Linux)")
def test_peak_memory_on_the_cpu_sees_a_short_lived_allocation():
    cpu = torch.device("cpu")
    with PeakMemory(cpu, interval=0.001) as idle:
        time.sleep(0.02)
    with PeakMemory(cpu, interval=0.001) as busy:
        x = torch.ones(50_000_000)  # 191 MiB, touched
        time.sleep(0.05)
        del x
    assert idle.mib is not None and idle.mib < 20
    assert 170 < busy.mib < 260
