"""QLoRA's 4-bit base, written out (notebook 11): NormalFloat4 (NF4) codes, block-wise absmax
scales, double quantization of those scales, and a frozen linear layer that stores its weight
in 4 bits and dequantizes it on the fly, with the collection's LoRA on top.

The formats are bitsandbytes' (Dettmers et al., 2023), so the tests can compare every byte:
two 4-bit codes per byte (the first in the high half), one fp32 absmax per block of 64
weights; with double quantization the absmax values, minus their mean, are stored as 8-bit
codes of bitsandbytes' dynamic map with one fp32 scale per block of 256.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

NF4_BLOCK = 64  # weights per absmax scale
SCALE_BLOCK = 256  # absmax values per second-level scale (double quantization)
NF4_OFFSET = 0.9677083  # 1 - (1/(2·15) + 1/(2·16)) / 2: the largest code value's quantile


@cache
def nf4_code(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NF4 values: quantiles of the standard normal, 8 for the positive half and 7 for
    the negative half (so that 0 is a code of its own), scaled into [-1, 1]. Built once: every
    dequantization reads it (do not modify the returned tensor)."""
    quantiles = torch.linspace(offset, 0.5, 9), torch.linspace(offset, 0.5, 8)  # fp32
    positive = torch.special.ndtri(quantiles[0][:-1].double())
    negative = -torch.special.ndtri(quantiles[1][:-1].double())
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).float()
    values = values.sort().values
    return values / values.max()  # in fp32, as bitsandbytes' table was made


@cache
def dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (256 values in [-1, 1]): for each power of ten
    from 1e-6 to 1, evenly spaced fractions, more of them for larger magnitudes; plus 0 and 1."""
    values = []
    for exponent in range(7):
        edges = torch.linspace(0.1, 1, 2**exponent + 1, dtype=torch.float32)
        means = ((edges[:-1] + edges[1:]) / 2 * 10 ** (exponent - 6)).tolist()
        values += means + [-m for m in means]
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


def nearest_code(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """The index of the code value nearest to each entry of ``x`` (``code`` sorted ascending):
    the code value at or below it, or the one above where that is strictly nearer (a tie goes
    down), as bitsandbytes decides it."""
    code = code.to(x.device)
    below = (torch.searchsorted(code, x, right=True) - 1).clamp(0, len(code) - 2)
    nearer_above = (x - code[below + 1]).abs() < (x - code[below]).abs()
    return (below + nearer_above).to(torch.uint8)


def check_weight(weight: torch.Tensor, block: int) -> None:
    """Refuse what block-wise quantization cannot take, saying what to do."""
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        kind = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise TypeError(f"Only floating-point weights can be quantized, got {kind}.")
    if weight.numel() == 0 or weight.numel() % block:
        raise ValueError(
            f"A weight of shape {tuple(weight.shape)} has {weight.numel()} values, not a positive "
            f"multiple of the block size {block}: choose a block size that divides it, or leave "
            "this layer in full precision."
        )


def quantize_blockwise(
    x: torch.Tensor, code: torch.Tensor, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (flat) in blocks of ``block``: each block scaled by its largest magnitude (absmax)
    into [-1, 1], each value then stored as the index of its nearest code value."""
    blocks = x.float().reshape(-1, block)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    return nearest_code(scaled, code).flatten(), absmax


def dequantize_blockwise(
    indices: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, block: int
) -> torch.Tensor:
    """The inverse of ``quantize_blockwise``: code values times their block's absmax (flat)."""
    values = code.to(indices.device)[indices.long()]  # the table lives on the CPU
    return (values.reshape(-1, block) * absmax[:, None]).flatten()


def pack_4bit(indices: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, the first of each pair in the high half (bitsandbytes' order)."""
    return (indices[0::2] << 4) | indices[1::2]


def unpack_4bit(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_4bit``."""
    return torch.stack([packed >> 4, packed & 0xF], dim=1).flatten()


@dataclass
class QuantizedWeight:
    """A weight in NF4: ``packed`` codes and one absmax per block; with double quantization the
    absmax values are themselves 8-bit codes (``absmax``, uint8) with one fp32 scale per
    ``SCALE_BLOCK`` of them (``scale``) and their mean (``offset``) added back."""

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, ...]
    block: int = NF4_BLOCK
    scale: torch.Tensor | None = None  # double quantization only
    offset: torch.Tensor | None = None  # double quantization only

    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything stored, by name (what the bytes per weight count)."""
        stored = {"packed": self.packed, "absmax": self.absmax}
        if self.scale is not None:
            stored |= {"scale": self.scale, "offset": self.offset}
        return stored

    def bits_per_weight(self) -> float:
        """Bits stored per weight, counted from the tensors' bytes."""
        stored = sum(t.numel() * t.element_size() for t in self.tensors().values())
        return 8 * stored / math.prod(self.shape)


def quantize_nf4(
    weight: torch.Tensor, block: int = NF4_BLOCK, double_quant: bool = False
) -> QuantizedWeight:
    """``weight`` in NF4 with one absmax per ``block`` weights (and, with ``double_quant``,
    those absmax values in 8 bits)."""
    check_weight(weight, block)
    indices, absmax = quantize_blockwise(weight.detach().flatten(), nf4_code(), block)
    quantized = QuantizedWeight(pack_4bit(indices), absmax, tuple(weight.shape), block)
    if double_quant:
        offset = absmax.mean()
        centred = F.pad(absmax - offset, (0, -len(absmax) % SCALE_BLOCK))
        codes, scale = quantize_blockwise(centred, dynamic_code(), SCALE_BLOCK)
        quantized.absmax, quantized.scale = codes[: len(absmax)], scale
        quantized.offset = offset
    return quantized


def dequantize_nf4(quantized: QuantizedWeight) -> torch.Tensor:
    """The fp32 weight that ``quantized`` stands for."""
    absmax = quantized.absmax
    if quantized.scale is not None:
        codes = F.pad(absmax, (0, -len(absmax) % SCALE_BLOCK))
        centred = dequantize_blockwise(codes, quantized.scale, dynamic_code(), SCALE_BLOCK)
        absmax = centred[: len(absmax)] + quantized.offset
    indices = unpack_4bit(quantized.packed)
    return dequantize_blockwise(indices, absmax, nf4_code(), quantized.block).view(quantized.shape)


class Linear4bit(nn.Module):
    """A frozen linear layer whose weight is stored in NF4 and dequantized at every call; the
    bias stays in full precision. ``weight`` gives the dequantized weight (computed, not
    stored: a LoRA update cannot be merged into it)."""

    def __init__(self, linear: nn.Linear, block: int = NF4_BLOCK, double_quant: bool = True):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        quantized = quantize_nf4(linear.weight, block, double_quant)
        self.shape, self.block = quantized.shape, block
        for name, tensor in quantized.tensors().items():
            self.register_buffer(name, tensor.to(linear.weight.device))
        if "scale" not in quantized.tensors():
            self.scale = self.offset = None
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), False)

    def quantized(self) -> QuantizedWeight:
        return QuantizedWeight(
            self.packed, self.absmax, self.shape, self.block, self.scale, self.offset
        )

    @property
    def weight(self) -> torch.Tensor:
        return dequantize_nf4(self.quantized())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, NF4"


def quantize_linears(model: nn.Module, names: list[str], double_quant: bool = True) -> int:
    """Replace the ``nn.Linear`` layers ``names`` of ``model`` by ``Linear4bit``; all or
    nothing (every layer is checked first). Returns how many were replaced."""
    layers = {name: model.get_submodule(name) for name in names}
    for name, layer in layers.items():
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"{name} is a {type(layer).__name__}, not an nn.Linear.")
        check_weight(layer.weight, NF4_BLOCK)
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, Linear4bit(layer, double_quant=double_quant))
    return len(layers)


def dequantize_linears(model: nn.Module) -> int:
    """Replace every ``Linear4bit`` of ``model`` by an ``nn.Linear`` holding its dequantized
    weight (what a merge into a 4-bit base needs first); returns how many."""
    names = [name for name, m in model.named_modules() if isinstance(m, Linear4bit)]
    for name in names:
        layer = model.get_submodule(name)
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        linear.to(layer.packed.device).requires_grad_(False)
        with torch.no_grad():
            linear.weight.copy_(layer.weight)
            if layer.bias is not None:
                linear.bias.copy_(layer.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)
    return len(names)
