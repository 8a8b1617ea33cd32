"""OLMo 3 (ch05/13) fused against a reader's copy of the book's: its layer (QK-norm over the whole projected
width, queries scaled first) forward and backward on the global, local and no mask, the KV-cache layer (keys
cached before RoPE) step by step, and a tiny model's logits, cached logits (a sliding layer's cache trimmed
to the window by the book's block), training loss and greedy tokens."""

from __future__ import annotations

import copy

import pytest
import torch
from chapter3_flash.attention import olmo3
from chapter3_flash.attention.rope import mask_rule
from helpers import DEVICE, assert_same_outputs_and_grads, assert_same_training_step, fused_copy, greedy, twin_layers

from bench.book import olmo3 as book
from chapter3_flash import attention

TOL = dict(atol=1e-5, rtol=1e-5)
CFG = book.TINY_CONFIG


def tables(head_dim=8, n=64):
    cos, sin = book.compute_rope_params(head_dim, 500_000.0, n, attention_factor=1.2)
    return cos.to(DEVICE), sin.to(DEVICE)


def masks(start, end, window):
    stub = type("Stub", (), {"cfg": {"sliding_window": window}})()  # create_masks reads only the window
    return book.Olmo3.create_masks(stub, start, end, DEVICE)


@pytest.mark.parametrize("which", ["global", "local", "none"])
def test_layer_outputs_and_gradients(which, backend):
    attn_type = "sliding_attention" if which == "local" else "full_attention"
    ours, theirs = twin_layers(
        olmo3.GroupedQueryAttention, book.GroupedQueryAttention, 32, 4, 2, 8, True, None, 6, attn_type, seed=5
    )
    n = 29
    mask_global, mask_local = masks(0, n, 6)
    mask = {"global": mask_global, "local": mask_local, "none": None}[which]
    if mask is not None:
        assert mask_rule(mask) == (True, (5, -1) if which == "local" else (-1, -1))
    cos, sin = tables()
    assert_same_outputs_and_grads(ours, theirs, torch.randn(2, n, 32, device=DEVICE), mask, cos[:n], sin[:n], tol=TOL)


def test_qk_norm_spans_all_heads():
    # The norms' widths are the projections', not head_dim: Qwen3's per-head reading crashes on them (the bug).
    layer = olmo3.GroupedQueryAttention(32, 4, 2, 8)
    assert layer.q_norm.weight.shape == (32,) and layer.k_norm.weight.shape == (16,)


@pytest.mark.parametrize("masked", [True, False])
def test_kv_layer_prefill_then_tokens(masked, backend):
    ours, theirs = twin_layers(olmo3.KVGroupedQueryAttention, book.KVGroupedQueryAttention, 32, 4, 2, 8, seed=6)
    ours.eval(), theirs.eval()
    x = torch.randn(2, 30, 32, device=DEVICE)
    cos, sin = tables()
    mine = book_cache = None
    with torch.no_grad():
        for a, b in [(0, 9)] + [(t, t + 1) for t in range(9, 20)] + [(20, 30)]:  # a prompt, tokens, a chunk
            mask = masks(a, b, 6)[0] if masked else None
            out, mine = ours(x[:, a:b], mask, cos, sin, start_pos=a, cache=mine)
            ref, book_cache = theirs(x[:, a:b], mask, cos, sin, start_pos=a, cache=book_cache)
            torch.testing.assert_close(out, ref, **TOL)
            torch.testing.assert_close(mine, book_cache, **TOL)  # unrotated keys, as the book's


def models(book_cls, fused_cls, book_layer, seed=12):
    torch.manual_seed(seed)
    theirs = book_cls(CFG).to(DEVICE)
    return fused_copy(theirs, {book_layer: fused_cls}), theirs


def test_model_logits_and_training_loss(backend):
    ours, theirs = models(book.Olmo3, olmo3.GroupedQueryAttention, book.GroupedQueryAttention)
    ids, targets = torch.randint(0, CFG["vocab_size"], (2, 2, 21), device=DEVICE)
    assert_same_training_step(ours, theirs, ids, targets, TOL)


def test_model_cached_logits_and_greedy_tokens(backend):
    ours, theirs = models(book.KVOlmo3, olmo3.KVGroupedQueryAttention, book.KVGroupedQueryAttention)
    prompt = torch.randint(0, CFG["vocab_size"], (1, 6), device=DEVICE)
    steps, layers = 10, CFG["n_layers"]  # well past the window (4): the sliding layers' caches are trimmed
    ids_o, logits_o = greedy(ours, prompt, steps, layers)
    ids_t, logits_t = greedy(theirs, prompt, steps, layers)
    torch.testing.assert_close(logits_o, logits_t, **TOL)
    assert torch.equal(ids_o, ids_t)
    assert torch.equal(ids_t, greedy(theirs, prompt, steps)[0])  # the cache changes nothing in the book's either


@pytest.mark.parametrize("cached", [False, True], ids=["plain", "kv-cache"])
def test_swap_converts_olmo3(cached):
    book_cls = book.KVOlmo3 if cached else book.Olmo3
    target = olmo3.KVGroupedQueryAttention if cached else olmo3.GroupedQueryAttention
    torch.manual_seed(16)
    theirs = book_cls(CFG).to(DEVICE)
    ids = torch.randint(0, CFG["vocab_size"], (1, 11), device=DEVICE)
    ours = attention.swap_attention(copy.deepcopy(theirs))
    assert {type(b.att) for b in ours.blocks} == {target}
    theirs.eval(), ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids), **TOL)
    steps, layers = 8, CFG["n_layers"] if cached else None
    assert torch.equal(greedy(ours, ids, steps, layers)[0], greedy(theirs, ids, steps, layers)[0])


def test_swap_refuses_a_per_head_norm_in_an_olmo3_layer():
    layer = book.GroupedQueryAttention(32, 4, 2, 8)
    layer.q_norm = book.RMSNorm(8)  # Qwen3's per-head width: not what OLMo 3's forward does
    with pytest.raises(ValueError, match=r"q_norm has width \(8,\); the OLMo 3 \(ch05/13\) layer norms over the whole"):
        attention.swap_attention(torch.nn.Sequential(layer))
    assert type(layer) is book.GroupedQueryAttention
