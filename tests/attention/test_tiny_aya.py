"""Tiny Aya (ch05/15) fused against a reader's copy of the book's: its layer (interleaved RoPE on sliding layers,
none on full ones) forward and backward, the KV-cache layer step by step, and a tiny model's logits, cached
logits, training loss and greedy tokens with the fused layers put in place of the book's."""

from __future__ import annotations

import copy

import pytest
import torch
from chapter3_flash.attention import tiny_aya
from chapter3_flash.attention.rope import apply_rope, mask_rule
from helpers import DEVICE, assert_same_outputs_and_grads, assert_same_training_step, fused_copy, greedy, twin_layers

from bench.book import tiny_aya as book
from chapter3_flash import attention

TOL = dict(atol=1e-5, rtol=1e-5)
CFG = book.TINY_CONFIG


def tables(head_dim=16, n=64):
    cos, sin = book.compute_rope_params(head_dim, 50_000.0, n)
    return cos.to(DEVICE), sin.to(DEVICE)


def test_interleaved_rope_is_the_books():
    x = torch.randn(2, 3, 11, 16, device=DEVICE)
    cos, sin = tables()
    torch.testing.assert_close(apply_rope(x, cos, sin, 5, interleaved=True), book.apply_rope(x, cos, sin, 5))
    # Not the split-halves rotation with the same tables: the layouts pair different features.
    assert not torch.allclose(apply_rope(x, cos, sin, 5), book.apply_rope(x, cos, sin, 5), atol=1e-3)


@pytest.mark.parametrize("attn_type", ["sliding_attention", "full_attention"])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_layer_outputs_and_gradients(attn_type, qk_norm, backend):
    ours, theirs = twin_layers(
        tiny_aya.GroupedQueryAttention,
        book.GroupedQueryAttention,
        32,
        4,
        2,
        16,
        qk_norm,
        attention_bias=True,
        attn_type=attn_type,
        seed=3,
    )
    n, window = 37, 6
    mask_global, mask_local = book.TinyAya.create_masks(ours_model_stub(window), n, DEVICE)
    mask = mask_local if attn_type == "sliding_attention" else mask_global
    assert mask_rule(mask) == (True, (window - 1, -1) if attn_type == "sliding_attention" else (-1, -1))
    cos, sin = tables()
    assert_same_outputs_and_grads(ours, theirs, torch.randn(2, n, 32, device=DEVICE), mask, cos[:n], sin[:n], tol=TOL)


def ours_model_stub(window):
    """An object with the cfg create_masks reads (the masks are the model's, not the layer's)."""
    return type("Stub", (), {"cfg": {"sliding_window": window}})()


@pytest.mark.parametrize("attn_type", ["sliding_attention", "full_attention"])
def test_kv_layer_prefill_then_tokens(attn_type, backend):
    ours, theirs = twin_layers(
        tiny_aya.KVGroupedQueryAttention, book.KVGroupedQueryAttention, 32, 4, 2, 16, attn_type=attn_type, seed=4
    )
    ours.eval(), theirs.eval()
    stub = ours_model_stub(5)
    x = torch.randn(2, 30, 32, device=DEVICE)
    cos, sin = tables()
    mine = book_cache = None
    with torch.no_grad():
        for a, b in [(0, 9)] + [(t, t + 1) for t in range(9, 20)] + [(20, 30)]:  # a prompt, tokens, a chunk
            g, loc = book.TinyAya.create_masks(stub, b - a, DEVICE, a)
            mask = loc if attn_type == "sliding_attention" else g
            out, mine = ours(x[:, a:b], mask, cos, sin, start_pos=a, cache=mine)
            ref, book_cache = theirs(x[:, a:b], mask, cos, sin, start_pos=a, cache=book_cache)
            torch.testing.assert_close(out, ref, **TOL)
            torch.testing.assert_close(mine, book_cache, **TOL)  # the same (b, kv_heads, T, head_dim) cache


def models(book_cls, fused_cls, book_layer, seed=11):
    torch.manual_seed(seed)
    theirs = book_cls(CFG).to(DEVICE)
    return fused_copy(theirs, {book_layer: fused_cls}), theirs


def test_model_logits_and_training_loss(backend):
    ours, theirs = models(book.TinyAya, tiny_aya.GroupedQueryAttention, book.GroupedQueryAttention)
    ids, targets = torch.randint(0, CFG["vocab_size"], (2, 2, 23), device=DEVICE)
    assert_same_training_step(ours, theirs, ids, targets, TOL)


def test_model_cached_logits_and_greedy_tokens(backend):
    ours, theirs = models(book.KVTinyAya, tiny_aya.KVGroupedQueryAttention, book.KVGroupedQueryAttention)
    prompt = torch.randint(0, CFG["vocab_size"], (1, 7), device=DEVICE)
    steps, layers = 12, CFG["n_layers"]  # past the sliding window (5): the local layers drop keys as they go
    ids_o, logits_o = greedy(ours, prompt, steps, layers)
    ids_t, logits_t = greedy(theirs, prompt, steps, layers)
    torch.testing.assert_close(logits_o, logits_t, **TOL)
    assert torch.equal(ids_o, ids_t)
    assert torch.equal(ids_t, greedy(theirs, prompt, steps)[0])  # the cache changes nothing in the book's either


@pytest.mark.parametrize("cached", [False, True], ids=["plain", "kv-cache"])
def test_swap_converts_tiny_aya_not_as_qwen3(cached, caplog):
    book_cls = book.KVTinyAya if cached else book.TinyAya
    target = tiny_aya.KVGroupedQueryAttention if cached else tiny_aya.GroupedQueryAttention
    torch.manual_seed(15)
    theirs = book_cls(CFG).to(DEVICE)
    ids = torch.randint(0, CFG["vocab_size"], (1, 13), device=DEVICE)
    ours = attention.swap_attention(copy.deepcopy(theirs))
    assert {type(b.att) for b in ours.trf_blocks} == {target}
    assert len(attention.fused_layers(ours)) == CFG["n_layers"]
    theirs.eval(), ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids), **TOL)
    steps, layers = 8, CFG["n_layers"] if cached else None
    assert torch.equal(greedy(ours, ids, steps, layers)[0], greedy(theirs, ids, steps, layers)[0])
