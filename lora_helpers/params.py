"""Parameter accounting (notebooks 03, 05 and 07): counts on real modules, per layer type, and
their closed forms for a GPT and for LoRA, which the tests check against each other.
"""

from __future__ import annotations

from torch import nn

from .lora_model import TARGET_GROUPS, is_lora_parameter
from .model import GPTConfig, block_linear_shapes


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of distinct parameters (a tied weight counts once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def gpt_param_count(cfg: GPTConfig) -> int:
    """Closed-form parameter count of ``GPTModel(cfg)`` (a tied head counts once)."""
    d, vocab = cfg.emb_dim, cfg.vocab_size
    attention = 4 * d * d + (3 * d if cfg.qkv_bias else 0) + d  # q, k, v, out (+ biases)
    feed_forward = 4 * d * d + 4 * d + 4 * d * d + d  # fc1 and fc2 with biases
    norms = 2 * 2 * d  # two LayerNorms per block, scale and shift
    embeddings = vocab * d + cfg.context_length * d
    head = 0 if cfg.tie_weights else vocab * d
    return embeddings + cfg.n_layers * (attention + feed_forward + norms) + 2 * d + head


def lora_parameter_count(in_dim: int, out_dim: int, rank: int) -> int:
    """The closed form: a LoRA update of one (out × in) layer has rank · (in + out) parameters."""
    return rank * (in_dim + out_dim)


def expected_lora_parameters(cfg: GPTConfig, rank: int, group: str, head_out: int = 0) -> int:
    """Closed-form LoRA parameter count of a GPT for one of TARGET_GROUPS (``head_out``: the
    output size of the head when the group includes it)."""
    shapes = {name.rsplit(".", 1)[-1]: shape for name, shape in block_linear_shapes(cfg).items()}
    total = 0
    for kind in TARGET_GROUPS[group]:
        if kind == "out_head":
            total += lora_parameter_count(cfg.emb_dim, head_out, rank)
        else:
            total += cfg.n_layers * lora_parameter_count(*shapes[kind], rank)
    return total


def layer_type(param_name: str) -> str:
    """The kind of layer a parameter of our GPT belongs to, for parameter reports."""
    if is_lora_parameter(param_name):
        return "LoRA"
    kinds = {
        "tok_emb.": "token embedding",
        "pos_emb.": "position embedding",
        ".att.": "attention",
        ".ff.": "feed-forward",
        "norm": "layer norms",
        "out_head.": "output head",
    }
    return next((kind for key, kind in kinds.items() if key in param_name), "other")


def parameter_report(model: nn.Module) -> dict[str, dict[str, int]]:
    """Parameter counts per layer type and in total: ``{type: {"total", "trainable"}}``."""
    report: dict[str, dict[str, int]] = {}
    for name, param in model.named_parameters():
        row = report.setdefault(layer_type(name), {"total": 0, "trainable": 0})
        row["total"] += param.numel()
        row["trainable"] += param.numel() if param.requires_grad else 0
    report["all"] = {k: sum(row[k] for row in report.values()) for k in ("total", "trainable")}
    return report


def format_parameter_report(model: nn.Module) -> str:
    """The parameter report as a small text table: total, trainable and frozen per type."""
    lines = [f"{'layer type':20s} {'total':>13s} {'trainable':>13s} {'frozen':>13s}"]
    for kind, row in parameter_report(model).items():
        frozen = row["total"] - row["trainable"]
        lines.append(f"{kind:20s} {row['total']:13,} {row['trainable']:13,} {frozen:13,}")
    return "\n".join(lines)
