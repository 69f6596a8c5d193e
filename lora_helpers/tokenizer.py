"""GPT-2 byte-pair encoding through tiktoken, with a clear error when it cannot be loaded.

tiktoken downloads two files (``vocab.bpe``, ``encoder.json``) on first use and caches them
in ``$TIKTOKEN_CACHE_DIR`` under the sha1 of their URL. Offline, a pre-filled cache works.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import tiktoken
import torch

from .settings import data_dir

BPE_URLS = {
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
}
END_OF_TEXT = "<|endoftext|>"


class TokenizerUnavailableError(RuntimeError):
    """The GPT-2 BPE files are neither cached nor downloadable."""


def _cache_dir() -> Path:
    """The folder tiktoken reads its cache from (mirrors tiktoken's own rule)."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if os.environ.get(var):
            return Path(os.environ[var])
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def _missing_files_message(cache: Path) -> str:
    lines = [
        "Could not load the GPT-2 tokenizer: tiktoken found no cached BPE files and could "
        "not download them (no network?).",
        f"Put these two files in {cache} (or point TIKTOKEN_CACHE_DIR at a folder holding them):",
    ]
    for name, url in BPE_URLS.items():
        cache_name = hashlib.sha1(url.encode()).hexdigest()
        lines.append(f"  {cache_name}  <- {name} from {url}")
    return "\n".join(lines)


def get_tokenizer() -> tiktoken.Encoding:
    """Return tiktoken's ``gpt2`` encoding (50,257 tokens).

    If ``TIKTOKEN_CACHE_DIR`` is unset and the data folder holds an offline
    ``tiktoken_cache/`` (as ``../shared/data`` does), that cache is used.
    """
    offline_cache = data_dir() / "tiktoken_cache"
    if not os.environ.get("TIKTOKEN_CACHE_DIR") and offline_cache.is_dir():
        os.environ["TIKTOKEN_CACHE_DIR"] = str(offline_cache)
    try:
        return tiktoken.get_encoding("gpt2")
    except (OSError, ValueError) as err:  # requests' errors are OSErrors; ValueError: bad hash
        raise TokenizerUnavailableError(_missing_files_message(_cache_dir())) from err


def text_to_token_ids(text: str, tokenizer: tiktoken.Encoding) -> torch.Tensor:
    """Encode ``text`` into a (1, n_tokens) tensor; ``<|endoftext|>`` is allowed."""
    ids = tokenizer.encode(text, allowed_special={END_OF_TEXT})
    return torch.tensor(ids, dtype=torch.long).unsqueeze(0)


def token_ids_to_text(token_ids: torch.Tensor, tokenizer: tiktoken.Encoding) -> str:
    """Decode a (1, n_tokens) or (n_tokens,) tensor back into text."""
    return tokenizer.decode(token_ids.reshape(-1).tolist())
