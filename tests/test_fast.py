"""The training loop's speed-ups (lora_helpers.fast) and the device decision behind them."""

import torch

from lora_helpers import fast
from lora_helpers.device import capabilities

CPU = torch.device("cpu")


def test_the_cpu_gets_fused_adamw_and_no_cuda_tools():
    caps = capabilities("cpu")
    assert caps is capabilities(CPU)  # decided once per device
    assert caps.fused_adamw and not caps.cuda_graphs and not caps.bf16_autocast
    assert caps.pad_multiple == 1
    optimizer = fast.adamw([torch.nn.Parameter(torch.zeros(2))], 1e-3, 0.0, CPU)
    assert optimizer.defaults["fused"]
    with caps.autocast():
        assert not torch.is_autocast_enabled("cpu")
