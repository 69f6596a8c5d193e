"""A GPT written out the way the notebooks teach it (GPT-2 architecture, pre-norm blocks).

Names follow the notebooks: ``att.W_query/W_key/W_value/out_proj`` and ``ff.fc1/fc2`` inside
each block, ``out_head`` on top. Attention runs through PyTorch's fused
``scaled_dot_product_attention`` by default; ``use_sdpa = False`` runs the explicit math
from notebook 02, and the tests check that both agree.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GPTConfig:
    """Everything that fixes the architecture (and so the shapes of the weights)."""

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.0
    qkv_bias: bool = False
    tie_weights: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, GPTConfig] = {
    # OpenAI's GPT-2 family: 1024-token context, biases on the q/k/v projections, tied head.
    "gpt2-124M": GPTConfig(emb_dim=768, n_layers=12, n_heads=12, qkv_bias=True),
    "gpt2-355M": GPTConfig(emb_dim=1024, n_layers=24, n_heads=16, qkv_bias=True),
    "gpt2-774M": GPTConfig(emb_dim=1280, n_layers=36, n_heads=20, qkv_bias=True),
    "gpt2-1558M": GPTConfig(emb_dim=1600, n_layers=48, n_heads=25, qkv_bias=True),
    # Our from-scratch base (notebook 04), sized to pretrain on a 2-core CPU in minutes: 7M
    # parameters, most of them in the token embedding; 128 tokens hold nearly every SMS.
    "scratch-7M": GPTConfig(context_length=128, emb_dim=128, n_layers=4, n_heads=4),
    # A larger from-scratch base for a GPU: 30M parameters, 256-token context.
    "scratch-30M": GPTConfig(context_length=256, emb_dim=384, n_layers=6, n_heads=6, drop_rate=0.1),
    # A tiny model for quick mode (CI) and tests.
    "scratch-tiny": GPTConfig(context_length=64, emb_dim=64, n_layers=2, n_heads=2),
}


def gpt_config(name: str, **overrides) -> GPTConfig:
    """A preset from PRESETS, optionally with some fields changed (e.g. ``drop_rate=0.0``)."""
    if name not in PRESETS:
        raise KeyError(f"Unknown GPT preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


# The linear layers inside each block ``trf_blocks.i``, by their module names: the one place
# they are spelled, read by LoRA's target groups, the parameter counts, the GPT-2 and PEFT name
# maps and the benchmark's FLOP count.
QUERY, KEY, VALUE, OUT_PROJ = "att.W_query", "att.W_key", "att.W_value", "att.out_proj"
FC1, FC2 = "ff.fc1", "ff.fc2"
ATTENTION_LINEARS = (QUERY, KEY, VALUE, OUT_PROJ)
BLOCK_LINEARS = (*ATTENTION_LINEARS, FC1, FC2)


def block_linear_shapes(cfg: GPTConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear layer of a block, by its name."""
    d = cfg.emb_dim
    return {QUERY: (d, d), KEY: (d, d), VALUE: (d, d), OUT_PROJ: (d, d), FC1: (d, 4 * d),
            FC2: (4 * d, d)}  # fmt: skip


def at_positions(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Each row's entry at its own position, ``x[i, positions[i]]``: (batch, n, ...) -> (batch,
    ...). A classifier reads each message's last real token this way."""
    return x[torch.arange(len(positions), device=x.device), positions]


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention with separate query, key and value projections."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        context_length: int,
        dropout: float,
        num_heads: int,
        qkv_bias: bool = False,
    ):
        super().__init__()
        if d_out % num_heads:
            raise ValueError(f"d_out={d_out} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.use_sdpa = True  # fused kernel; False runs the explicit computation below
        mask = torch.triu(torch.ones(context_length, context_length, dtype=torch.bool), 1)
        self.register_buffer("mask", mask, persistent=False)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """(b, n_tokens, d_out) -> (b, num_heads, n_tokens, head_dim)."""
        b, n_tokens, _ = x.shape
        return x.view(b, n_tokens, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, last: torch.Tensor | None = None) -> torch.Tensor:
        """Every position's output, (b, n_tokens, d_out); with ``last`` (one position per row),
        that position's alone, (b, 1, d_out): its query attends to every position up to it,
        which is all a classifier reading one token needs."""
        b, n_tokens, _ = x.shape
        rows = x if last is None else at_positions(x, last).unsqueeze(1)
        q = self.heads(self.W_query(rows))
        k, v = self.heads(self.W_key(x)), self.heads(self.W_value(x))
        if last is None:
            future = self.mask[:n_tokens, :n_tokens]  # (n_tokens, n_tokens): True = masked
        else:  # (b, 1, 1, n_tokens): the positions after each row's query
            future = (torch.arange(n_tokens, device=x.device) > last[:, None])[:, None, None]
        if self.use_sdpa:
            p = self.dropout.p if self.training else 0.0
            mask = None if last is None else ~future  # SDPA's boolean mask: True = attend
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=p, is_causal=last is None
            )
        else:
            scores = q @ k.transpose(2, 3) / math.sqrt(self.head_dim)
            scores = scores.masked_fill(future, float("-inf"))
            weights = self.dropout(torch.softmax(scores, dim=-1))
            context = weights @ v
        context = context.transpose(1, 2).reshape(b, rows.shape[1], self.num_heads * self.head_dim)
        return self.out_proj(context)


class LayerNorm(nn.Module):
    """Normalise each token's features to mean 0, variance 1, then scale and shift."""

    def __init__(self, emb_dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same as (x - mean) / sqrt(var + eps) * scale + shift, in one fused kernel.
        return F.layer_norm(x, x.shape[-1:], self.scale, self.shift, self.eps)


class FeedForward(nn.Module):
    """Expand to 4x the width, apply GELU (GPT-2's tanh approximation), project back."""

    def __init__(self, emb_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(emb_dim, 4 * emb_dim)
        self.fc2 = nn.Linear(4 * emb_dim, emb_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attention(norm(x)), then x + feed-forward(norm(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm1 = LayerNorm(cfg.emb_dim)
        self.att = MultiHeadAttention(
            cfg.emb_dim, cfg.emb_dim, cfg.context_length, cfg.drop_rate, cfg.n_heads, cfg.qkv_bias
        )
        self.norm2 = LayerNorm(cfg.emb_dim)
        self.ff = FeedForward(cfg.emb_dim)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor, last: torch.Tensor | None = None) -> torch.Tensor:
        """(b, n_tokens, emb_dim), or with ``last`` only those positions' rows, (b, 1, emb_dim)."""
        shortcut = x if last is None else at_positions(x, last).unsqueeze(1)
        x = shortcut + self.drop_shortcut(self.att(self.norm1(x), last))
        x = x + self.drop_shortcut(self.ff(self.norm2(x)))
        return x


class GPTModel(nn.Module):
    """Token + position embeddings, a stack of transformer blocks, a final norm, a head."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.final_norm = LayerNorm(cfg.emb_dim)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        # GPT-2's init: residual projections scaled down by the depth.
        for name, param in self.named_parameters():
            if name.endswith(("out_proj.weight", "fc2.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))
        if cfg.tie_weights:  # the output head reuses the token embedding matrix
            self.out_head.weight = self.tok_emb.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def hidden_states(self, in_idx: torch.Tensor, last: torch.Tensor | None = None) -> torch.Tensor:
        """The final-norm output, (batch, n_tokens, emb_dim): what the head reads. With ``last``
        (one position per row), only those positions', (batch, emb_dim): the last block then
        computes keys and values at every position and the rest at that one alone."""
        n_tokens = in_idx.shape[1]
        if n_tokens > self.cfg.context_length:
            raise ValueError(
                f"Input has {n_tokens} tokens but the model's context_length is "
                f"{self.cfg.context_length}; crop the input (e.g. idx[:, -context_length:])."
            )
        if last is not None:
            check_last_positions(last, in_idx.shape[0], n_tokens)
        positions = torch.arange(n_tokens, device=in_idx.device)
        x = self.drop_emb(self.tok_emb(in_idx) + self.pos_emb(positions))
        if last is None:
            return self.final_norm(self.trf_blocks(x))
        *first, final = self.trf_blocks
        for block in first:
            x = block(x)
        return self.final_norm(final(x, last)).squeeze(1)

    def forward(self, in_idx: torch.Tensor) -> torch.Tensor:
        """Logits over the vocabulary for every position, (batch, n_tokens, vocab_size)."""
        return self.out_head(self.hidden_states(in_idx))


def check_last_positions(last: torch.Tensor, batch: int, n_tokens: int) -> None:
    """Refuse ``last`` unless it is one integer position per row, each in [0, n_tokens) (the
    values are checked on a CPU, where that costs no wait for a GPU)."""
    if last.shape != (batch,) or last.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"last must hold one integer position per row, shape ({batch},), got shape "
            f"{tuple(last.shape)} of {last.dtype}: pass e.g. lengths - 1."
        )
    if last.device.type == "cpu" and ((last < 0) | (last >= n_tokens)).any():
        raise ValueError(
            f"last must hold positions in [0, {n_tokens}) (the input has {n_tokens} tokens), "
            f"got {last.tolist()}: pass each row's last real position, lengths - 1."
        )


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run the block with ``model`` in eval mode (no dropout), then put it back in the mode it
    was in (train or eval)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def generate(
    model: GPTModel,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Extend ``idx`` (batch, n_tokens) by up to ``max_new_tokens`` tokens.

    ``temperature=0`` is greedy decoding; otherwise sample from softmax(logits / temperature),
    restricted to the ``top_k`` most likely tokens if given. Stops early once every sequence
    has produced ``eos_id``. Pass a seeded ``generator`` for repeatable samples.
    """
    with eval_mode(model):
        context_length = model.cfg.context_length
        finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            logits = model(idx[:, -context_length:])[:, -1, :]
            if top_k is not None:
                kth_best = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth_best, float("-inf"))
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=generator)
            else:
                next_id = logits.argmax(dim=-1, keepdim=True)
            if eos_id is not None:
                next_id = next_id.masked_fill(finished.unsqueeze(1), eos_id)
                finished |= next_id.squeeze(1) == eos_id
            idx = torch.cat([idx, next_id], dim=1)
            if eos_id is not None and finished.all():
                break
    return idx
