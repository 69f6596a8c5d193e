import pytest
import torch

from lora_helpers import adapters as ad
from lora_helpers.lora import AdapterWrapper
from lora_helpers.model import GPTModel, gpt_config


@pytest.fixture
def tiny_model() -> GPTModel:
    """A small GPT (2 layers, 64 dims, 64-token context), seeded, in eval mode."""
    torch.manual_seed(0)
    return GPTModel(gpt_config("scratch-tiny", vocab_size=1000)).eval()


def _snapshot(model) -> dict:
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return {
        "tensors": {n: t.detach().clone() for n, t in tensors},
        "trainable": {n: p.requires_grad for n, p in model.named_parameters()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "merged": {n: m.merged for n, m in model.named_modules() if isinstance(m, AdapterWrapper)},
        "adapters": ad.adapter_names(model),
        "active": ad.active_adapter(model),
    }


@pytest.fixture
def unchanged():
    """``check = unchanged(model)`` records the model; ``check()`` asserts it is exactly as it was:
    every parameter and buffer (torch.equal), adapters, active adapter, train/eval mode of every
    module, requires_grad flags, merged state."""

    def record(model):
        before = _snapshot(model)

        def check():
            after = _snapshot(model)
            tensors, expected = after.pop("tensors"), before["tensors"]
            assert after == {k: v for k, v in before.items() if k != "tensors"}
            assert tensors.keys() == expected.keys()
            assert all(torch.equal(tensors[n], t) for n, t in expected.items())

        return check

    return record
