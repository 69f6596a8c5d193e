"""The training loop's speed-ups (lora_helpers.fast) and the device decision behind them."""

import pytest
import torch

from lora_helpers import fast
from lora_helpers import finetune as ft
from lora_helpers.device import capabilities
from lora_helpers.model import GPTModel, gpt_config

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


@pytest.fixture
def lora_model() -> ft.GPTModel:
    torch.manual_seed(0)
    base = GPTModel(gpt_config("scratch-tiny", context_length=32)).eval()
    return ft.prepare_variant(base, "lora-r8", ft.FULL_FINETUNE)


def test_the_cpu_gets_fused_adamw_and_no_cuda_tools():
    caps = capabilities("cpu")
    assert caps is capabilities(CPU)  # decided once per device
    assert caps.fused_adamw and not caps.cuda_graphs and not caps.bf16_autocast
    assert caps.pad_multiple == 1
    optimizer = fast.adamw([torch.nn.Parameter(torch.zeros(2))], 1e-3, 0.0, CPU)
    assert optimizer.defaults["fused"]
    with fast.autocast_for(CPU):
        assert not torch.is_autocast_enabled("cpu")


def test_cast_frozen_base_keeps_the_adapters_in_fp32(lora_model):
    n_layers = lora_model.cfg.n_layers
    assert fast.cast_frozen_base(lora_model) == 6 * n_layers
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
    with fast.autocast_for(CUDA, cache_enabled=False):
        before = ft.last_token_logits(model, input_ids, lengths)
        fast.cast_frozen_base(model)
        after = ft.last_token_logits(model, input_ids, lengths)
    torch.testing.assert_close(after, before)
