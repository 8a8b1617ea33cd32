"""The fused optimized KV-cache MultiHeadAttention (ch04/03_kv-cache/gpt_with_kv_cache_optimized.py) against a
reader's copy of the book's: same parameters and buffers, the same rolling cache (contents, pointer, the oldest
entries shifted out when a chunk overflows the window) and outputs step by step, the same greedy tokens from the
book's chunked-prefill loop after swap_attention, and clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
from chapter3_flash.attention import kv_cache_optimized as ours_module
from helpers import DEVICE, twin_layers

from bench.book import kv_cache_optimized as book
from chapter3_flash import attention

TOL = dict(atol=2e-5, rtol=1e-4)
CFG = {
    "vocab_size": 97,
    "context_length": 40,
    "emb_dim": 24,
    "n_heads": 3,
    "n_layers": 2,
    "drop_rate": 0.0,
    "qkv_bias": True,
    "kv_window_size": 8,  # smaller than the context: the cache rolls, the prompt is prefilled in chunks
}


def pair(seed=3, **kw):
    args = dict(d_in=12, d_out=12, context_length=40, dropout=0.0, num_heads=3, qkv_bias=True, window_size=8) | kw
    return twin_layers(ours_module.MultiHeadAttention, book.MultiHeadAttention, seed=seed, **args)


def same_cache(ours, theirs):
    assert ours.ptr_cur == theirs.ptr_cur
    for mine, book_cache in ((ours.cache_k, theirs.cache_k), (ours.cache_v, theirs.cache_v)):
        assert mine.shape == book_cache.shape  # (b, heads, window_size, head_dim), preallocated
        torch.testing.assert_close(mine, book_cache, **TOL)


def test_same_parameters_buffers_and_state_dict():
    ours, theirs = pair()
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]
    assert (ours.window_size, ours.max_seq_len) == (theirs.window_size, theirs.max_seq_len) == (8, 40)
    default, book_default = pair(window_size=None, max_seq_len=None)
    assert default.window_size == book_default.window_size == 40


def test_cached_steps_and_the_rolling_cache_match_the_book(backend):
    ours, theirs = pair()
    ours.eval(), theirs.eval()
    x = torch.randn(2, 40, 12, device=DEVICE)
    # A prompt, single tokens past the window (each shifts the cache), a chunk that overflows, a whole window.
    steps = [(0, 5)] + [(t, t + 1) for t in range(5, 14)] + [(14, 20), (20, 28), (28, 29)]
    with torch.no_grad():
        for a, b in steps:
            torch.testing.assert_close(ours(x[:, a:b], use_cache=True), theirs(x[:, a:b], use_cache=True), **TOL)
            same_cache(ours, theirs)
        # A call without the cache: plain causal, and the pointer starts over, as in the book.
        torch.testing.assert_close(ours(x[:, :9]), theirs(x[:, :9]), **TOL)
        assert ours.ptr_cur == theirs.ptr_cur == 0
        torch.testing.assert_close(ours(x[:, 9:12], use_cache=True), theirs(x[:, 9:12], use_cache=True), **TOL)
        same_cache(ours, theirs)
        ours.reset_cache(), theirs.reset_cache()
        assert ours.cache_k is None and theirs.cache_k is None
        torch.testing.assert_close(ours(x[:1, :3], use_cache=True), theirs(x[:1, :3], use_cache=True), **TOL)
        same_cache(ours, theirs)  # a new batch size: a new cache


def test_training_through_the_cache_matches_the_book(backend):
    ours, theirs = pair(window_size=6)
    x = torch.randn(2, 9, 12, device=DEVICE)
    with torch.no_grad():  # a prefill without gradients, then a chunk with them that overflows the window
        torch.testing.assert_close(ours(x[:, :4], use_cache=True), theirs(x[:, :4], use_cache=True), **TOL)
    xa, xb = x[:, 4:].clone().requires_grad_(), x[:, 4:].clone().requires_grad_()
    out_a, out_b = ours(xa, use_cache=True), theirs(xb, use_cache=True)
    torch.testing.assert_close(out_a, out_b, **TOL)
    out_a.square().sum().backward()
    out_b.square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, **TOL)
    for (name, pa), (_, pb) in zip(ours.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, **TOL, msg=lambda m, n=name: f"{n}: {m}")


def test_bad_input_is_a_clear_error():
    ours, _ = pair()
    with pytest.raises(ValueError, match="window_size 8"):
        ours(torch.randn(1, 9, 12, device=DEVICE), use_cache=True)
    with pytest.raises(ValueError, match="d_in=12"):
        ours(torch.randn(1, 3, 10, device=DEVICE), use_cache=True)


def gpt_pair(seed=123):
    torch.manual_seed(seed)
    theirs = book.GPTModel(CFG).to(DEVICE).eval()
    ours = attention.swap_attention(copy.deepcopy(theirs))
    return ours, theirs


def test_swap_and_the_books_chunked_generation_give_the_same_tokens(backend):
    ours, theirs = gpt_pair()
    assert all(type(b.att) is ours_module.MultiHeadAttention for b in ours.trf_blocks)
    assert attention.fused_layers(ours) == [f"trf_blocks.{i}.att" for i in range(CFG["n_layers"])]
    prompt = torch.randint(0, CFG["vocab_size"], (2, 19), device=DEVICE)  # three prefill chunks of 8, 8, 3
    expected = book.generate_text_simple_cached(theirs, prompt, 15)
    assert torch.equal(book.generate_text_simple_cached(ours, prompt, 15), expected)
    for a, b in zip(ours.trf_blocks, theirs.trf_blocks):
        same_cache(a.att, b.att)
    # Past the context the optimized loop stops at the position embedding's length, in both.
    assert book.generate_text_simple_cached(ours, prompt, 40).shape[1] == CFG["context_length"]


def test_swap_in_the_middle_of_generation_keeps_the_books_cache():
    _, theirs = pair()
    theirs.eval()
    layer = copy.deepcopy(theirs)
    x = torch.randn(1, 14, 12, device=DEVICE)
    with torch.no_grad():
        for a, b in ((0, 6), (6, 10)):  # the second chunk rolls the cache
            theirs(x[:, a:b], use_cache=True)
            layer(x[:, a:b], use_cache=True)
        attention.swap_attention(layer)
        assert type(layer) is ours_module.MultiHeadAttention
        for t in range(10, 14):
            torch.testing.assert_close(
                layer(x[:, t : t + 1], use_cache=True), theirs(x[:, t : t + 1], use_cache=True), **TOL
            )
        same_cache(layer, theirs)


def test_swap_refuses_a_cache_of_another_shape_untouched():
    _, theirs = pair()
    theirs.cache_k = theirs.cache_v = torch.zeros(1, 3, 5, 4, device=DEVICE)  # not (b, heads, window 8, head_dim)
    with pytest.raises(ValueError, match="cache has shape"):
        attention.swap_attention(theirs)
    assert type(theirs) is book.MultiHeadAttention


def test_a_window_that_is_not_a_positive_int_is_refused():
    for window in (-3, 2.5):
        with pytest.raises(ValueError, match="window_size"):
            ours_module.MultiHeadAttention(12, 12, 40, 0.0, 3, window_size=window)
