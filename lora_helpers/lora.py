"""LoRA: a trainable low-rank update ``scaling · (x A) B`` added to a frozen linear layer.

Layout as in notebook 05: ``A`` is (in_features, rank), ``B`` is (rank, out_features), so the
update of an ``nn.Linear`` weight (out × in) is ``ΔW = scaling · (A B)ᵀ``. B starts at zero,
so a freshly wrapped model computes exactly what the base model computes.
"""

from __future__ import annotations

import math
import operator
import warnings
from dataclasses import dataclass
from typing import SupportsIndex

import torch
import torch.nn.functional as F
from torch import nn

SCALING_RULES = ("standard", "rslora")  # alpha / rank (LoRA paper) or alpha / sqrt(rank)
INITS = ("default", "gaussian", "olora")


def lora_scaling(alpha: float, rank: int, rule: str = "standard") -> float:
    """The factor the low-rank update is multiplied by: alpha/rank, or alpha/√rank (rsLoRA)."""
    if rule == "standard":
        return alpha / rank
    if rule == "rslora":
        return alpha / math.sqrt(rank)
    raise ValueError(f"Unknown scaling rule {rule!r}; choose one of {SCALING_RULES}.")


def as_rank(rank: SupportsIndex) -> int:
    """``rank`` as a Python int: any integral number (int, numpy integer, 0-d integer tensor)."""
    is_tensor = isinstance(rank, torch.Tensor)
    if isinstance(rank, bool) or (is_tensor and (rank.dim() != 0 or rank.dtype == torch.bool)):
        raise ValueError(f"rank must be a positive integer, got {rank!r}.")
    try:
        value = operator.index(rank)
    except TypeError:
        raise ValueError(f"rank must be a positive integer, got {rank!r}.") from None
    if value < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}.")
    return value


@dataclass(frozen=True)
class LoRAConfig:
    """One LoRA adapter's settings, checked once here and passed whole: the rank and alpha of
    its updates, the scaling rule (``"standard"``: alpha/rank, ``"rslora"``: alpha/√rank), the
    dropout on their input, how the factors start (``init``) and which layers get one
    (``targets``: group names from ``lora_model.TARGET_GROUPS``, layer names, full names or
    regular expressions over full names)."""

    rank: int
    alpha: float
    scaling: str = "standard"
    dropout: float = 0.0
    init: str = "default"
    targets: str | tuple[str, ...] = "blocks"

    def __post_init__(self):
        object.__setattr__(self, "rank", as_rank(self.rank))
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ValueError(f"alpha must be a positive number, got {alpha!r}.")
        if not math.isfinite(alpha):
            raise ValueError(f"alpha must be finite, got {alpha!r}.")
        if self.scaling not in SCALING_RULES:
            raise ValueError(f"scaling must be one of {SCALING_RULES}, got {self.scaling!r}.")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}.")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}.")
        names = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if not names or not all(isinstance(t, str) and t for t in names):
            raise ValueError(f"targets must name at least one layer, got {self.targets!r}.")
        object.__setattr__(
            self, "targets", self.targets if isinstance(self.targets, str) else names
        )

    @property
    def factor(self) -> float:
        """What the update is multiplied by (``lora_scaling``)."""
        return lora_scaling(self.alpha, self.rank, self.scaling)


def check_fits(config: LoRAConfig, layer: nn.Module) -> None:
    """Raise ValueError if ``config`` cannot adapt ``layer`` (a linear layer or an embedding)."""
    in_dim, out_dim = layer_dims(layer)
    max_rank = min(in_dim, out_dim)
    if config.init == "olora" and config.rank > max_rank:
        raise ValueError(
            f"init='olora' takes its factors from a QR of the ({out_dim} x {in_dim}) weight, "
            f"which has at most {max_rank} directions: use rank <= {max_rank} with OLoRA."
        )
    if isinstance(layer, nn.Embedding) and (config.init != "default" or config.dropout):
        raise ValueError(
            f"LoRA on an embedding takes init='default' and dropout=0 (got init={config.init!r}, "
            f"dropout={config.dropout}): leave the embedding out of the targets to use them."
        )


def warn_if_rank_exceeds(in_dim: int, out_dim: int, rank: int) -> None:
    """Warn when ``rank`` exceeds min(in, out): legal (appendix E of *LLMs from scratch* does it
    for its 2-class head), but the extra rank adds parameters without compressing anything."""
    max_rank = min(in_dim, out_dim)
    if rank > max_rank:
        warnings.warn(
            f"rank={rank} is larger than min(in_features={in_dim}, out_features={out_dim}) = "
            f"{max_rank}: the update can have rank {max_rank} at most, so the extra rank adds "
            f"{(rank - max_rank) * (in_dim + out_dim):,} parameters without compressing "
            f"anything. Use rank <= {max_rank} for this layer to avoid the waste.",
            stacklevel=4,
        )


class LoRALayer(nn.Module):
    """The low-rank update alone: ``scaling · dropout(x) @ A @ B``.

    An OLoRA adapter also keeps its starting factors ``A0``, ``B0`` and subtracts their product,
    so that it starts at zero change without touching the frozen weight.
    """

    def __init__(self, in_dim: int, out_dim: int, config: LoRAConfig):
        super().__init__()
        warn_if_rank_exceeds(in_dim, out_dim, config.rank)
        self.config = config
        self.rank, self.alpha, self.scaling_rule = config.rank, config.alpha, config.scaling
        self.init = config.init
        self.scaling = config.factor
        self.A = nn.Parameter(torch.empty(in_dim, config.rank))
        # Kaiming-uniform over A's input dimension, as nn.Linear and PEFT initialise it.
        nn.init.kaiming_uniform_(self.A.T, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(config.rank, out_dim))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.register_buffer("A0", None)  # OLoRA's starting factors (None otherwise)
        self.register_buffer("B0", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dropout(x) @ self.A @ self.B
        if self.A0 is not None:
            out = out - x @ self.A0 @ self.B0
        return out if self.scaling == 1 else self.scaling * out  # alpha = rank: no multiply

    def delta_weight(self) -> torch.Tensor:
        """The update in ``nn.Linear``'s weight layout (out × in): scaling · (A B - A0 B0)ᵀ."""
        product = self.A @ self.B
        if self.A0 is not None:
            product = product - self.A0 @ self.B0
        return self.scaling * product.T


def olora_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """OLoRA's starting factors from the thin QR of a (out × in) weight: W = QR, A = R_rᵀ
    (in × rank), B = Q_rᵀ (rank × out), so (A B)ᵀ = Q_r R_r, the weight's leading directions."""
    q, r = torch.linalg.qr(weight.detach().float())  # q: (out, k), r: (k, in)
    return r[:rank].T.contiguous(), q[:, :rank].T.contiguous()


class AdapterWrapper(nn.Module):
    """What the LoRA wrappers and adapters.PerAdapterModule share: a ``plain`` module, one of
    ``parts`` per named adapter, and the ``active`` adapter's name (None: the plain module).
    ``disabled``: the plain module for now; ``merged``: the active part is in the plain weights."""

    plain: nn.Module  # both are properties of each subclass, over its own submodules
    parts: nn.ModuleDict
    merged = False

    def __init__(self):
        super().__init__()
        self.active: str | None = None
        self.disabled = False

    def merged_module(self) -> nn.Module:
        """The plain module that computes what this one does with the active adapter merged in
        (for a LoRA wrapper: once ``merge`` has put the update into the plain weight)."""
        return self.plain


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module inside an adapter wrapper; any other module itself."""
    return module.plain if isinstance(module, AdapterWrapper) else module


class LoRAWrapper(AdapterWrapper):
    """A frozen layer plus named LoRA updates, one of them active: ``layer(x) + update(x)``;
    once merged, the plain layer holding the update. LinearWithLoRA and EmbeddingWithLoRA say
    how their layer applies an update; this base keeps the adapters and merges them."""

    plain_name: str  # the wrapped layer's name in the state dict: "linear" or "embedding"

    def __init__(self, layer: nn.Module, config: LoRAConfig, name: str = "default"):
        super().__init__()
        setattr(self, self.plain_name, layer)
        self.adapters = nn.ModuleDict()
        self.add_adapter(name, config)
        self.active = name
        self.train(layer.training)  # a model in eval mode stays there: no dropout switched on

    plain = property(lambda self: getattr(self, self.plain_name))
    parts = property(lambda self: self.adapters)
    weight = property(lambda self: self.plain.weight)  # the frozen weight, as the plain layer

    @torch.no_grad()
    def add_adapter(self, name: str, config: LoRAConfig) -> LoRALayer:
        """Add a new named adapter (not activated), in this layer's mode (train or eval)."""
        check_fits(config, self.plain)
        if name in self.adapters:
            raise ValueError(f"This layer already has an adapter named {name!r}.")
        lora = LoRALayer(*layer_dims(self.plain), config)
        lora.to(self.plain.weight.device).train(self.training)
        self.init_factors(lora)
        self.adapters[name] = lora
        return lora

    def init_factors(self, lora: LoRALayer) -> None:
        """Set the new adapter's starting factors (the default: as ``LoRALayer`` made them)."""

    @property
    def lora(self) -> LoRALayer:
        """The active adapter."""
        if self.active is None:
            raise RuntimeError("This layer has no active adapter (see set_adapter).")
        return self.adapters[self.active]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled or self.active is None:
            return self.plain(x)
        return self.plain(x) + self.update(x)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """The active adapter's contribution for input ``x``."""
        raise NotImplementedError

    def weight_delta(self) -> torch.Tensor:
        """The active update in the layout of the wrapped layer's weight."""
        raise NotImplementedError

    def merged_weight(self) -> torch.Tensor:
        """What the wrapped weight becomes when the active update is merged into it."""
        weight = self.plain.weight
        return weight + self.weight_delta().to(weight.dtype)

    @torch.no_grad()
    def merge(self, safe: bool = True) -> None:
        """Add the active update into the layer's weight (a no-op if already merged). With
        ``safe``, refuse, changing nothing, if the merged weight would hold inf or NaN."""
        if self.merged or self.active is None:
            return
        check_mergeable(self)
        merged = self.merged_weight()
        if safe and not torch.isfinite(merged).all():
            raise ValueError(
                "Merging would put inf/NaN into the weight (the LoRA update is not finite or "
                "overflows this dtype); the layer is left unmerged."
            )
        self.plain.weight.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update again (a no-op if not merged)."""
        if not self.merged:
            return
        weight = self.plain.weight
        weight.sub_(self.weight_delta().to(weight.dtype))
        self.merged = False


def check_mergeable(layer: LoRAWrapper) -> None:
    """Refuse a merge into a weight that is computed rather than stored (a 4-bit base layer,
    ``quant.Linear4bit``): the merged update would be lost."""
    if not isinstance(layer.plain.weight, nn.Parameter):
        raise TypeError(
            f"Cannot merge into a {type(layer.plain).__name__}: its weight is computed from a "
            "quantized one, not stored. Dequantize the base first "
            "(quant.dequantize_linears(model)), then merge."
        )


class LinearWithLoRA(LoRAWrapper):
    """A frozen ``nn.Linear`` plus named LoRA updates: ``linear(x) + scaling · x A B``."""

    plain_name = "linear"

    def init_factors(self, lora: LoRALayer) -> None:
        if lora.init == "gaussian":
            nn.init.normal_(lora.A, std=1 / lora.rank)
        elif lora.init == "olora":
            a, b = olora_factors(self.plain.weight, lora.rank)
            lora.A.copy_(a)
            lora.B.copy_(b)
            lora.A0, lora.B0 = a.clone(), b.clone()

    def update(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora(x)

    def weight_delta(self) -> torch.Tensor:
        """The active update in ``nn.Linear``'s weight layout (out × in)."""
        return self.lora.delta_weight()


class EmbeddingWithLoRA(LoRAWrapper):
    """A frozen ``nn.Embedding`` plus named LoRA updates. Looking a token up multiplies a one-hot
    row by the table, so the update is a row of ``A`` (vocab × rank) times ``B``. As in PEFT, A
    starts at zero and B random (a lookup reads a single row of A: a random A would barely move
    B); B ~ N(0, 1/rank) keeps the update's first steps the same size at any rank."""

    plain_name = "embedding"

    def init_factors(self, lora: LoRALayer) -> None:
        nn.init.zeros_(lora.A)
        nn.init.normal_(lora.B, std=1 / math.sqrt(lora.rank))

    def update(self, ids: torch.Tensor) -> torch.Tensor:
        lora = self.lora
        return lora.scaling * (F.embedding(ids, lora.A) @ lora.B)

    def weight_delta(self) -> torch.Tensor:
        """The active update in the embedding table's layout (vocab × dim): scaling · A B."""
        return self.lora.delta_weight().T

    @torch.no_grad()
    def merge(self, safe: bool = True) -> None:
        """Merge into a copy of the table, so that an output layer tied to it (GPT-2's) keeps
        reading the frozen table, as it does unmerged."""
        if self.merged or self.active is None:
            return
        weight = self.plain.weight
        self.plain.weight = nn.Parameter(weight.clone(), requires_grad=weight.requires_grad)
        super().merge(safe)


def layer_dims(layer: nn.Module) -> tuple[int, int]:
    """(in, out) of a linear layer, or of an embedding seen as one (vocabulary, width)."""
    if isinstance(layer, nn.Embedding):
        return layer.num_embeddings, layer.embedding_dim
    return layer.in_features, layer.out_features
