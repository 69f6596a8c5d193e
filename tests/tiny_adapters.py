"""The tiny base and its two named adapters that tests/test_adapters.py and
tests/test_adapter_files.py share (their fixtures ``base`` and ``two_adapters`` use these)."""

import copy

import torch
from torch import nn

from lora_helpers import adapters as ad
from lora_helpers.lora import LoRAConfig
from lora_helpers.lora_model import lora_layers
from lora_helpers.model import GPTModel, gpt_config

IDX = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(1))


def make_base(seed=0, **overrides) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(gpt_config("scratch-tiny", vocab_size=1000, **overrides)).eval()


def randomise(model, name):
    """Stand-in for training: give adapter `name` (and the modules it owns) random values."""
    torch.manual_seed(hash(name) % 1000)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            if name in layer.adapters:
                layer.adapters[name].B.normal_(std=0.1)
        for module in model.modules():
            if isinstance(module, ad.PerAdapterModule) and name in module.versions:
                for p in module.versions[name].parameters():
                    p.normal_(std=0.1)


def with_two_adapters(base: GPTModel) -> GPTModel:
    """'chat': rank 2 on attention, vocabulary head; 'spam': rank 4 on all blocks + 2-class head."""
    model = copy.deepcopy(base)
    ad.add_adapter(model, "chat", LoRAConfig(rank=2, alpha=4, targets="attention"))
    randomise(model, "chat")
    ad.add_adapter(
        model,
        "spam",
        LoRAConfig(rank=4, alpha=4, targets="blocks"),
        modules_to_save={"out_head": nn.Linear(64, 2)},
    )
    randomise(model, "spam")
    return model.eval()
