import pytest
import torch

from lora_helpers.model import GPTModel, gpt_config


@pytest.fixture
def tiny_model() -> GPTModel:
    """A small GPT (2 layers, 64 dims, 64-token context), seeded, in eval mode."""
    torch.manual_seed(0)
    return GPTModel(gpt_config("scratch-tiny", vocab_size=1000)).eval()
