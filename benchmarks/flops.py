"""The useful work of a fine-tuning run, for ``benchmarks/finetune_speed.py``: the weights of
the matrix products a message's tokens pass through, and the device's best matmul throughput."""

from __future__ import annotations

import re
import time

import torch

from lora_helpers.device import capabilities
from lora_helpers.lora import EmbeddingWithLoRA
from lora_helpers.model import FC1, FC2, OUT_PROJ, QUERY
from lora_helpers.peft_format import LAYER_MAP

# The layers of the last block that only the last token passes through, by our names and by
# GPT-2's (transformers), read from the places that spell them.
LAST_TOKEN_ONLY = (QUERY, OUT_PROJ, FC1, FC2)
LAST_TOKEN_ONLY_GPT2 = tuple(
    g for g, parts in LAYER_MAP.items() if set(parts) <= set(LAST_TOKEN_ONLY)
)
FUSED_QKV_GPT2 = next(g for g, parts in LAYER_MAP.items() if QUERY in parts and len(parts) == 3)


def matmul_params(model: torch.nn.Module) -> tuple[int, int, int, int]:
    """Weights of the matrix products a message's tokens pass through (2-D parameters outside
    embeddings and the classification head, ``out_head`` or ``score``): (all, trainable) that
    every token needs, then (all, trainable) that only the last token needs, because the head
    reads it alone: the last block's query, output projection and feed-forward (with their
    adapters; of GPT-2's fused ``c_attn`` the query's third)."""
    tokens, tokens_trainable, last, last_trainable = 0, 0, 0, 0
    lookup = (torch.nn.Embedding, EmbeddingWithLoRA)  # lookups (LoRA on them too): no products
    lookups = [n for n, m in model.named_modules() if isinstance(m, lookup)]
    blocks = [n for n, m in model.named_modules() if re.fullmatch(r".*(trf_blocks|\.h)\.\d+", n)]
    last_block = f"{blocks[-1]}."
    for name, p in model.named_parameters():
        in_lookup = any(name.startswith(f"{n}.") for n in lookups)
        if p.dim() != 2 or in_lookup or set(name.split(".")) & {"out_head", "score"}:
            continue
        share = 0.0  # of this weight, the part only the last token needs
        if name.startswith(last_block):
            inner = name.removeprefix(last_block)
            if inner.startswith(LAST_TOKEN_ONLY + LAST_TOKEN_ONLY_GPT2):
                share = 1.0
            elif inner.startswith(FUSED_QKV_GPT2) and not inner.endswith("lora_A.default.weight"):
                share = 1 / 3  # q of q|k|v (the adapter's A reads the input every token needs)
        n_last = round(share * p.numel())
        tokens += p.numel() - n_last
        last += n_last
        if p.requires_grad:
            tokens_trainable += p.numel() - n_last
            last_trainable += n_last
    return tokens, tokens_trainable, last, last_trainable


def matmul_gflops(emb_dim: int, device: torch.device, tokens: int = 512) -> float:
    """The best throughput, in GFLOP/s, of the model's own matrix products (tokens × d by
    d × d, d × 4d and 4d × d), in the dtype the fast path computes in."""
    dtype = torch.bfloat16 if capabilities(device).bf16_autocast else torch.float32
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = 0.0
    for k, n in ((emb_dim, emb_dim), (emb_dim, 4 * emb_dim), (4 * emb_dim, emb_dim)):
        a = torch.randn(tokens, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        flops = 2 * tokens * k * n
        repeats = max(1, int(2e8 // flops))  # about 0.2 GFLOP a timing
        a @ b
        for _ in range(5):
            sync()
            start = time.perf_counter()
            for _ in range(repeats):
                a @ b
            sync()
            best = max(best, repeats * flops / (time.perf_counter() - start) / 1e9)
    return best
