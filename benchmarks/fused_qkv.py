"""A candidate of the lever study, kept out of the library until it pays: the frozen query, key
and value products of an attention layer in one matrix product, over their weights concatenated
once (they never change), and the three LoRA A factors in one product too. The layers stay
three separately trained adapters; the math is the same (tests check logits and gradients).

``fuse_qkv(model)`` puts ``FusedProjection`` modules in the place of every attention layer's
``W_query``, ``W_key`` and ``W_value``: whichever of them is called first on an input computes
all of its layers' outputs at once and the others read theirs. The attention code is the
model's own (``model.MultiHeadAttention``): with ``last`` it calls the query on the last rows
alone, which then runs as one layer, and the key and value on every position, fused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lora_helpers.lora import LinearWithLoRA
from lora_helpers.model import KEY, QUERY, VALUE, MultiHeadAttention

PROJECTIONS = tuple(name.rsplit(".", 1)[-1] for name in (QUERY, KEY, VALUE))


class FusedQKV:
    """The three LoRA projections of one attention layer, computed together per input."""

    def __init__(self, layers: list[LinearWithLoRA]):
        loras = [layer.lora for layer in layers]
        if any(lora.A0 is not None or isinstance(lora.dropout, nn.Dropout) for lora in loras):
            raise ValueError("fuse_qkv takes LoRA without dropout or OLoRA's starting factors.")
        self.layers = layers
        with torch.no_grad():  # frozen: concatenated once
            self.weight = torch.cat([layer.linear.weight for layer in layers])
            biases = [layer.linear.bias for layer in layers]
            self.bias = None if biases[0] is None else torch.cat(biases)
        self.input: torch.Tensor | None = None
        self.outputs: dict[int, torch.Tensor] = {}

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Layer ``index``'s output for ``x``. On a new input it is computed together with the
        layers after it (attention calls q, k, v in that order: all three on one input, or q
        on the last rows alone, then k and v together); the others read theirs, once."""
        if x is not self.input or index not in self.outputs:
            self.input, self.outputs = x, self.compute(x, index)
        return self.outputs.pop(index)

    def compute(self, x: torch.Tensor, start: int) -> dict[int, torch.Tensor]:
        """The outputs of layers ``start``, ``start + 1``, ... for ``x``: one product for the
        frozen weights, one for the A factors, then each layer's B."""
        loras = [layer.lora for layer in self.layers[start:]]
        d = self.weight.shape[0] // len(self.layers)
        bias = None if self.bias is None else self.bias[start * d :]
        base = F.linear(x, self.weight[start * d :], bias).split(d, dim=-1)
        a = torch.cat([lora.A for lora in loras], dim=1)
        xa = (x @ a).split([lora.rank for lora in loras], dim=-1)
        outputs = {}
        for i, (b, h, lora) in enumerate(zip(base, xa, loras, strict=True), start):
            update = h @ lora.B
            outputs[i] = b + (update if lora.scaling == 1 else lora.scaling * update)
        return outputs


class FusedProjection(nn.Module):
    """One of the three projections, answering from its layer's ``FusedQKV``; it keeps its
    ``LinearWithLoRA`` (and so the adapter's parameters) as a submodule."""

    def __init__(self, layer: LinearWithLoRA, fused: FusedQKV, index: int):
        super().__init__()
        self.layer, self.index = layer, index
        self.fused = [fused]  # a list: not a submodule, shared by the three

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused[0].output(self.index, x)


def fuse_qkv(model: nn.Module) -> int:
    """Fuse the q/k/v projections of every attention layer whose three are LoRA layers;
    returns how many attention layers were fused."""
    fused = 0
    for module in model.modules():
        if not isinstance(module, MultiHeadAttention):
            continue
        layers = [getattr(module, name) for name in PROJECTIONS]
        if all(isinstance(layer, LinearWithLoRA) for layer in layers):
            shared = FusedQKV(layers)
            for index, (name, layer) in enumerate(zip(PROJECTIONS, layers, strict=True)):
                setattr(module, name, FusedProjection(layer, shared, index))
            fused += 1
    return fused
