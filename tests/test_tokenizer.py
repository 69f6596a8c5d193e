import pytest
import tiktoken
import torch

from lora_helpers import tokenizer as tok


def test_known_ids_and_round_trip():
    enc = tok.get_tokenizer()
    assert enc.n_vocab == 50257
    assert enc.encode("Hello, I am") == [15496, 11, 314, 716]
    ids = tok.text_to_token_ids("Hello, I am<|endoftext|>", enc)
    assert ids.shape == (1, 5) and ids[0, -1].item() == enc.eot_token == 50256
    assert tok.token_ids_to_text(ids, enc) == "Hello, I am<|endoftext|>"


def test_unknown_words_are_split_into_known_pieces():
    enc = tok.get_tokenizer()
    ids = enc.encode("Akwirw ier")
    assert len(ids) > 2  # no <unk> token: unfamiliar words become several subword tokens
    assert enc.decode(ids) == "Akwirw ier"


def test_no_cache_and_no_network_names_the_two_files(monkeypatch, tmp_path):
    def no_network(url):
        raise ConnectionError(f"no network for {url}")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # forget the loaded encoding
    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    with pytest.raises(tok.TokenizerUnavailableError) as info:
        tok.get_tokenizer()
    message = str(info.value)
    assert "vocab.bpe" in message and "encoder.json" in message and str(tmp_path) in message
    assert "6d1cbeee0f20b3d9449abfede4726ed8212e3aee" in message  # cache name of vocab.bpe


def test_text_to_token_ids_is_a_batch_of_one():
    enc = tok.get_tokenizer()
    assert tok.text_to_token_ids("a b c", enc).dtype == torch.long
