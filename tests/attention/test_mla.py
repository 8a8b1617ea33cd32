"""Multi-head latent attention (ch04/05_mla) fused against a reader's copy of the book's: the layer forward and
backward, its latent cache step by step (also after a call without the cache, which resets the position and
keeps the latents, as the book's does), and the MLA GPT's logits, training loss, cached logits and greedy tokens."""

from __future__ import annotations

import copy

import pytest
import torch
from chapter3_flash.attention import mla
from helpers import DEVICE, assert_same_outputs_and_grads, assert_same_training_step, fused_copy, twin_layers

from bench.book import mla as book
from bench.book.kv_cache import generate_text_simple_cached
from chapter3_flash import attention

TOL = dict(atol=1e-5, rtol=1e-5)
CFG = {
    "vocab_size": 97,
    "context_length": 64,
    "emb_dim": 32,
    "n_heads": 4,
    "n_layers": 2,
    "drop_rate": 0.0,
    "qkv_bias": True,
    "latent_dim": 12,
}


def pair(**kw):
    return twin_layers(mla.MultiHeadLatentAttention, book.MultiHeadLatentAttention, 32, 32, 0.0, 4, seed=31, **kw)


@pytest.mark.parametrize("latent_dim", [None, 8])
def test_layer_outputs_and_gradients(latent_dim, backend):
    ours, theirs = pair(qkv_bias=True, latent_dim=latent_dim)
    assert ours.latent_dim == theirs.latent_dim == (latent_dim or 16)
    assert_same_outputs_and_grads(ours, theirs, torch.randn(2, 27, 32, device=DEVICE), tol=TOL)


def test_latent_cache_step_by_step(backend):
    ours, theirs = pair()
    ours.eval(), theirs.eval()
    x = torch.randn(2, 40, 32, device=DEVICE)
    calls = [(0, 9, True)] + [(t, t + 1, True) for t in range(9, 20)] + [(20, 30, True)]
    calls += [(0, 5, False), (30, 33, True), (33, 34, True)]  # the book's reset of the position, latents kept
    with torch.no_grad():
        for a, b, cached in calls:
            torch.testing.assert_close(ours(x[:, a:b], use_cache=cached), theirs(x[:, a:b], use_cache=cached), **TOL)
            torch.testing.assert_close(ours.cache_c_kv, theirs.cache_c_kv, **TOL)  # (b, T, latent_dim)
            assert ours.ptr_current_pos == theirs.ptr_current_pos


def models(seed=32):
    torch.manual_seed(seed)
    theirs = book.GPTModel(CFG).to(DEVICE)
    return fused_copy(theirs, {book.MultiHeadLatentAttention: mla.MultiHeadLatentAttention}), theirs


def test_model_logits_and_training_loss(backend):
    ours, theirs = models()
    ids, targets = torch.randint(0, CFG["vocab_size"], (2, 2, 21), device=DEVICE)
    assert_same_training_step(ours, theirs, ids, targets, TOL)


def test_model_cached_logits_and_greedy_tokens(backend):
    ours, theirs = models()
    prompt = torch.randint(0, CFG["vocab_size"], (1, 6), device=DEVICE)
    tokens = [generate_text_simple_cached(m, prompt, 10) for m in (ours, theirs)]
    assert torch.equal(tokens[0], tokens[1])
    assert torch.equal(tokens[1], generate_text_simple_cached(theirs, prompt, 10, use_cache=False))
    ours.reset_kv_cache(), theirs.reset_kv_cache()
    with torch.no_grad():
        for a, b in ((0, 7), (7, 8), (8, 9), (9, 14)):
            chunk = tokens[1][:, a:b]
            torch.testing.assert_close(ours(chunk, use_cache=True), theirs(chunk, use_cache=True), **TOL)


def test_swap_converts_mla():
    ours, theirs = models(33)
    swapped = attention.swap_attention(copy.deepcopy(theirs))
    assert {type(b.att) for b in swapped.trf_blocks} == {mla.MultiHeadLatentAttention}
    prompt = torch.randint(0, CFG["vocab_size"], (1, 6), device=DEVICE)
    assert torch.equal(generate_text_simple_cached(swapped, prompt, 8), generate_text_simple_cached(theirs, prompt, 8))


def test_swap_refuses_an_mla_whose_keys_and_values_differ_in_width():
    layer = book.MultiHeadLatentAttention(32, 32, 0.0, 4)
    layer.W_UV = torch.nn.Linear(16, 48)  # values of another head_dim than queries and keys
    with pytest.raises(ValueError, match=r"W_UV maps 16 -> 48, expected 16 -> 32"):
        attention.swap_attention(torch.nn.Sequential(layer))
    assert type(layer) is book.MultiHeadLatentAttention
