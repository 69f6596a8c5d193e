"""LoRA: a trainable low-rank update ``scaling · (x A) B`` added to a frozen linear layer.

Layout as in notebook 05: ``A`` is (in_features, rank), ``B`` is (rank, out_features), so the
update of an ``nn.Linear`` weight (out × in) is ``ΔW = scaling · (A B)ᵀ``. B starts at zero,
so a freshly wrapped model computes exactly what the base model computes.
"""

from __future__ import annotations

import math
import operator
import re
import warnings
from collections.abc import Iterable
from typing import SupportsIndex

import torch
import torch.nn.functional as F
from torch import nn

SCALING_RULES = ("standard", "rslora")  # alpha / rank (LoRA paper) or alpha / sqrt(rank)
INITS = ("default", "gaussian", "olora")

# Names of our GPT's linear layers, grouped for ``apply_lora(targets=...)``.
TARGET_GROUPS = {
    "attention": ("W_query", "W_key", "W_value", "out_proj"),
    "attention_qv": ("W_query", "W_value"),
    "feed_forward": ("fc1", "fc2"),
    "blocks": ("W_query", "W_key", "W_value", "out_proj", "fc1", "fc2"),
    "head": ("out_head",),
}


class LoRAAlreadyAppliedError(RuntimeError):
    """A target layer already carries a LoRA adapter."""


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


def check_lora_args(
    in_dim: int, out_dim: int, rank: int, alpha: float, scaling: str, dropout: float, init: str
) -> None:
    """Raise ValueError, saying what was given and what is allowed, for any bad argument."""
    rank, max_rank = as_rank(rank), min(in_dim, out_dim)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"alpha must be a positive number, got {alpha!r}.")
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha!r}.")
    if scaling not in SCALING_RULES:
        raise ValueError(f"scaling must be one of {SCALING_RULES}, got {scaling!r}.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}.")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}.")
    if init == "olora" and rank > max_rank:
        raise ValueError(
            f"init='olora' takes its factors from a QR of the ({out_dim} x {in_dim}) weight, "
            f"which has at most {max_rank} directions: use rank <= {max_rank} with OLoRA."
        )


class LoRALayer(nn.Module):
    """The low-rank update alone: ``scaling · dropout(x) @ A @ B``.

    An OLoRA adapter also keeps its starting factors ``A0``, ``B0`` and subtracts their product,
    so that it starts at zero change without touching the frozen weight.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        rank: int,
        alpha: float,
        scaling: str = "standard",
        dropout: float = 0.0,
    ):
        super().__init__()
        check_lora_args(in_dim, out_dim, rank, alpha, scaling, dropout, "default")
        rank = as_rank(rank)
        warn_if_rank_exceeds(in_dim, out_dim, rank)
        self.rank, self.alpha, self.scaling_rule = rank, alpha, scaling
        self.scaling = lora_scaling(alpha, rank, scaling)
        self.init = "default"  # set by LinearWithLoRA.add_adapter
        self.A = nn.Parameter(torch.empty(in_dim, rank))
        # Kaiming-uniform over A's input dimension, as nn.Linear and PEFT initialise it.
        nn.init.kaiming_uniform_(self.A.T, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(rank, out_dim))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
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
    """What LinearWithLoRA and adapters.PerAdapterModule share: a ``plain`` module, one of
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
        (for LinearWithLoRA: once ``merge`` has put the update into the linear weight)."""
        return self.plain


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module inside an adapter wrapper; any other module itself."""
    return module.plain if isinstance(module, AdapterWrapper) else module


class LinearWithLoRA(AdapterWrapper):
    """A frozen ``nn.Linear`` plus named LoRA updates, one of them active:
    ``linear(x) + lora(x)``; once merged, a single linear layer holding the update."""

    def __init__(
        self,
        linear: nn.Linear,
        rank: int,
        alpha: float,
        scaling: str = "standard",
        dropout: float = 0.0,
        init: str = "default",
        name: str = "default",
    ):
        super().__init__()
        self.linear = linear
        self.adapters = nn.ModuleDict()
        self.add_adapter(name, rank, alpha, scaling, dropout, init)
        self.active = name
        self.train(linear.training)  # a model in eval mode stays there: no dropout switched on

    plain = property(lambda self: self.linear)
    parts = property(lambda self: self.adapters)

    @torch.no_grad()
    def add_adapter(
        self,
        name: str,
        rank: int,
        alpha: float,
        scaling: str = "standard",
        dropout: float = 0.0,
        init: str = "default",
    ) -> LoRALayer:
        """Add a new named adapter (not activated), in this layer's mode (train or eval)."""
        in_dim, out_dim = layer_dims(self.plain)
        rank = as_rank(rank)
        check_lora_args(in_dim, out_dim, rank, alpha, scaling, dropout, init)
        if name in self.adapters:
            raise ValueError(f"This layer already has an adapter named {name!r}.")
        lora = LoRALayer(in_dim, out_dim, rank, alpha, scaling, dropout)
        lora.to(self.plain.weight.device).train(self.training)
        if init == "gaussian":
            nn.init.normal_(lora.A, std=1 / rank)
        elif init == "olora":
            a, b = olora_factors(self.plain.weight, rank)
            lora.A.copy_(a)
            lora.B.copy_(b)
            lora.A0, lora.B0 = a.clone(), b.clone()
        lora.init = init
        self.adapters[name] = lora
        return lora

    @property
    def lora(self) -> LoRALayer:
        """The active adapter."""
        if self.active is None:
            raise RuntimeError("This layer has no active adapter (see set_adapter).")
        return self.adapters[self.active]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled or self.active is None:
            return self.linear(x)
        return self.linear(x) + self.lora(x)

    def weight_delta(self) -> torch.Tensor:
        """The active update in the layout of the wrapped layer's weight (out × in)."""
        return self.lora.delta_weight()

    def merged_weight(self) -> torch.Tensor:
        """What the wrapped weight becomes when the active update is merged into it."""
        weight = self.plain.weight
        return weight + self.weight_delta().to(weight.dtype)

    @torch.no_grad()
    def merge(self, safe: bool = True) -> None:
        """Add the active update into the linear weight (a no-op if already merged). With
        ``safe``, refuse, changing nothing, if the merged weight would hold inf or NaN."""
        if self.merged or self.active is None:
            return
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


class EmbeddingWithLoRA(LinearWithLoRA):
    """A frozen ``nn.Embedding`` plus named LoRA updates. Looking a token up multiplies a one-hot
    row by the table, so the update is a row of ``A`` (vocab × rank) times ``B``. As in PEFT, A
    starts at zero and B random (a lookup reads a single row of A: a random A would barely move
    B); B ~ N(0, 1/rank) keeps the update's first steps the same size at any rank."""

    def __init__(
        self,
        embedding: nn.Embedding,
        rank: int,
        alpha: float,
        scaling: str = "standard",
        dropout: float = 0.0,
        init: str = "default",
        name: str = "default",
    ):
        AdapterWrapper.__init__(self)
        self.embedding = embedding
        self.adapters = nn.ModuleDict()
        self.add_adapter(name, rank, alpha, scaling, dropout, init)
        self.active = name
        self.train(embedding.training)

    plain = property(lambda self: self.embedding)
    weight = property(lambda self: self.embedding.weight)  # the frozen table, as nn.Embedding

    @torch.no_grad()
    def add_adapter(
        self,
        name: str,
        rank: int,
        alpha: float,
        scaling: str = "standard",
        dropout: float = 0.0,
        init: str = "default",
    ) -> LoRALayer:
        """Add a new named adapter (not activated)."""
        check_embedding_args(init, dropout)
        lora = super().add_adapter(name, rank, alpha, scaling, dropout, init)
        nn.init.zeros_(lora.A)
        nn.init.normal_(lora.B, std=1 / math.sqrt(lora.rank))
        return lora

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled or self.active is None:
            return self.embedding(ids)
        lora = self.lora
        return self.embedding(ids) + lora.scaling * (F.embedding(ids, lora.A) @ lora.B)

    def weight_delta(self) -> torch.Tensor:
        """The active update in the embedding table's layout (vocab × dim): scaling · A B."""
        return self.lora.delta_weight().T

    @torch.no_grad()
    def merge(self, safe: bool = True) -> None:
        """Merge into a copy of the table, so that an output layer tied to it (GPT-2's) keeps
        reading the frozen table, as it does unmerged."""
        if self.merged or self.active is None:
            return
        weight = self.embedding.weight
        self.embedding.weight = nn.Parameter(weight.clone(), requires_grad=weight.requires_grad)
        super().merge(safe)


def check_embedding_args(init: str, dropout: float) -> None:
    """An embedding's LoRA starts one way (A zero, B random) and drops nothing of a one-hot row."""
    if init != "default" or dropout:
        raise ValueError(
            f"LoRA on an embedding takes init='default' and dropout=0 (got init={init!r}, "
            f"dropout={dropout}): leave the embedding out of the targets to use them."
        )


def layer_dims(layer: nn.Module) -> tuple[int, int]:
    """(in, out) of a linear layer, or of an embedding seen as one (vocabulary, width)."""
    if isinstance(layer, nn.Embedding):
        return layer.num_embeddings, layer.embedding_dim
    return layer.in_features, layer.out_features


def replace_linear_with_lora(model: nn.Module, rank: int, alpha: float) -> nn.Module:
    """Appendix E's recipe in *LLMs from scratch*: wrap every ``nn.Linear`` of ``model``,
    recursively, in place."""
    for name, module in model.named_children():
        if isinstance(module, nn.Linear):
            setattr(model, name, LinearWithLoRA(module, rank, alpha))
        elif not isinstance(module, LinearWithLoRA):
            replace_linear_with_lora(module, rank, alpha)
    return model


def lora_layers(model: nn.Module) -> dict[str, LinearWithLoRA]:
    """Every LoRA-wrapped layer of ``model``, by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LinearWithLoRA)}


def _linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The target candidates: plain linear layers and embeddings, and LoRA-wrapped ones (not
    their insides)."""
    layers, wrapped = {}, []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in wrapped):
            continue
        if isinstance(module, LinearWithLoRA):
            wrapped.append(f"{name}.")
        if isinstance(module, (nn.Linear, nn.Embedding, LinearWithLoRA)):
            layers[name] = module
    return layers


def _matches(name: str, target: str) -> bool:
    return (
        name == target
        or name.rsplit(".", 1)[-1] == target
        or re.fullmatch(target, name) is not None
    )


def resolve_targets(model: nn.Module, targets: str | Iterable[str]) -> list[str]:
    """Names of the layers that ``targets`` (group names, layer names or regexes) select."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    patterns = [p for t in targets for p in TARGET_GROUPS.get(t, (t,))]
    layers = _linear_layers(model)
    unmatched = [p for p in patterns if not any(_matches(name, p) for name in layers)]
    if unmatched or not patterns:
        kinds = sorted({name.rsplit(".", 1)[-1] for name in layers})
        raise ValueError(
            f"LoRA targets {unmatched or targets} match no linear layer of this model. Use a group "
            f"({', '.join(TARGET_GROUPS)}), a layer kind ({', '.join(kinds)}), a full name "
            f"(e.g. {next(iter(layers), '?')!r}) or a regular expression over full names."
        )
    return [name for name in layers if any(_matches(name, p) for p in patterns)]


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    targets: str | Iterable[str] = "blocks",
    scaling: str = "standard",
    dropout: float = 0.0,
    init: str = "default",
    freeze_base: bool = True,
    also_train: Iterable[str] = (),
) -> nn.Module:
    """Wrap the chosen linear layers of ``model`` with LoRA, in place.

    ``targets``: group names from TARGET_GROUPS, layer names such as ``"W_query"``, full names,
    or regular expressions over full names. With ``freeze_base``, every parameter except the
    LoRA factors and those of the modules in ``also_train`` is frozen.
    """
    names = resolve_targets(model, targets)
    already = [n for n in names if isinstance(model.get_submodule(n), LinearWithLoRA)]
    if already:
        raise LoRAAlreadyAppliedError(
            f"These layers already have LoRA: {already}. Apply LoRA once; to start over, build "
            "a fresh model (or load the base checkpoint again)."
        )
    add_lora(model, names, "default", rank, alpha, scaling, dropout, init)
    if freeze_base:
        freeze_except_lora(model, also_train)
    return model


def add_lora(
    model: nn.Module,
    names: list[str],
    adapter: str,
    rank: int,
    alpha: float,
    scaling: str = "standard",
    dropout: float = 0.0,
    init: str = "default",
) -> dict[str, LoRALayer]:
    """Give the linear layers ``names`` of ``model`` the LoRA adapter ``adapter`` (not
    activated on layers that had adapters): a plain layer is wrapped in LinearWithLoRA, a wrapped
    one gets one adapter more. All or nothing: every layer is checked (weight not tied, arguments
    valid for its size) before the first is changed. Returns the new LoRA updates by layer."""
    layers = {name: model.get_submodule(name) for name in names}
    # An embedding may be tied to the output layer: its update changes lookups only (see
    # EmbeddingWithLoRA.merge), so only linear layers must have a weight of their own.
    plain_linear = [n for n, m in layers.items() if isinstance(m, nn.Linear)]
    check_not_tied(model, plain_linear)
    for layer in map(unwrap, layers.values()):
        check_lora_args(*layer_dims(layer), rank, alpha, scaling, dropout, init)
        if isinstance(layer, nn.Embedding):
            check_embedding_args(init, dropout)
    added = {}
    for name, layer in layers.items():
        if isinstance(layer, LinearWithLoRA):
            added[name] = layer.add_adapter(adapter, rank, alpha, scaling, dropout, init)
        else:
            wrapper = EmbeddingWithLoRA if isinstance(layer, nn.Embedding) else LinearWithLoRA
            wrapped = wrapper(layer, rank, alpha, scaling, dropout, init, adapter)
            replace_module(model, name, wrapped)
            added[name] = wrapped.lora
    return added


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` in the place of ``model``'s submodule ``name``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def check_not_tied(model: nn.Module, names: list[str]) -> None:
    """Refuse LoRA on layers whose weight is shared with another module (a tied head)."""
    shared = _shared_parameter_names(model)
    tied = [n for n in names if f"{n}.weight" in shared]
    if tied:
        raise ValueError(
            f"{tied} share their weight with {sorted(shared[f'{tied[0]}.weight'])}: a LoRA update "
            "merged into it would change those too. Leave it out of the targets, or untie it "
            "first (e.g. replace the head with a new nn.Linear)."
        )


def _shared_parameter_names(model: nn.Module) -> dict[str, set[str]]:
    """For each parameter name whose tensor is also registered elsewhere, the other names."""
    by_tensor: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(p), set()).add(name)
    return {n: names - {n} for names in by_tensor.values() if len(names) > 1 for n in names}


def freeze_except_lora(model: nn.Module, also_train: Iterable[str] = ()) -> None:
    """Make only the LoRA factors trainable, plus the parameters of the modules named in
    ``also_train`` (e.g. a new classification head: ``also_train=["out_head"]``)."""
    also_train = list(also_train)
    for name in also_train:
        model.get_submodule(name)  # raises AttributeError naming a missing module
    for name, param in model.named_parameters():
        is_lora = is_lora_parameter(name)
        in_also = any(name == m or name.startswith(f"{m}.") for m in also_train)
        param.requires_grad = is_lora or in_also


def merge_lora(model: nn.Module, safe: bool = True) -> int:
    """Merge every LoRA layer into its linear weight; returns how many were merged. With
    ``safe``, every merged weight is checked first and nothing changes if one is not finite."""
    layers = [m for m in lora_layers(model).values() if not m.merged and m.active is not None]
    with torch.no_grad():
        finite = [torch.isfinite(layer.merged_weight()).all() for layer in layers] if safe else []
    if not all(finite):
        raise ValueError(
            "Merging would put inf/NaN into a weight; nothing was merged. Check the "
            "LoRA parameters (training may have diverged) or merge in a wider dtype."
        )
    for layer in layers:
        layer.merge(safe=False)
    return len(layers)


def unmerge_lora(model: nn.Module) -> int:
    """Undo ``merge_lora``; returns how many layers were unmerged."""
    layers = [m for m in lora_layers(model).values() if m.merged]
    for layer in layers:
        layer.unmerge()
    return len(layers)


def is_lora_parameter(name: str) -> bool:
    """True for the parameters (and OLoRA buffers) of LoRA adapters."""
    return ".adapters." in name


def lora_state_dict(model: nn.Module, name: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of one adapter (the active one by default) keyed ``<layer>.lora.<tensor>``,
    without the adapter's name: what an adapter file holds."""
    state = {}
    for layer_name, layer in lora_layers(model).items():
        adapter = name or layer.active
        if adapter in layer.adapters:
            for key, value in layer.adapters[adapter].state_dict().items():
                state[f"{layer_name}.lora.{key}"] = value
    return state
