"""Qwen3.5's gated attention (ch05/16) fused against a reader's copy of the book's: the layer (queries and
output gates from one projection, (1 + w) QK-norm, partial RoPE) forward and backward, the KV-cache layer
(keys cached before RoPE) step by step, and tiny models: logits and training loss with its linear-attention
stand-in layers between, cached logits and greedy tokens of an attention-only config."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from chapter3_flash.attention import qwen3_5
from chapter3_flash.attention.rope import apply_rope
from helpers import DEVICE, assert_same_outputs_and_grads, assert_same_training_step, fused_copy, greedy, twin_layers

from bench.book import qwen3_5 as book
from chapter3_flash import attention

TOL = dict(atol=1e-5, rtol=1e-5)
CFG = book.TINY_CONFIG


def tables(head_dim=16, n=64, factor=0.25):
    cos, sin = book.compute_rope_params(head_dim, 10_000.0, n, factor)
    return cos.to(DEVICE), sin.to(DEVICE)


def causal(start, end):
    return torch.triu(torch.ones(end, end, dtype=torch.bool, device=DEVICE), diagonal=1)[start:end]


@pytest.mark.parametrize("factor", [0.25, 1.0])
def test_partial_rope_is_the_books(factor):
    x = torch.randn(2, 3, 9, 16, device=DEVICE)
    cos, sin = tables(factor=factor)
    torch.testing.assert_close(apply_rope(x, cos, sin, 4, partial=True), book.apply_rope(x, cos, sin, 4))
    if factor < 1:
        with pytest.raises(ValueError, match=r"must both be \(context_length, head_dim 16\)"):
            apply_rope(x, cos, sin)  # narrower tables only where the caller says the rotation is partial


@pytest.mark.parametrize("qk_norm", [True, False])
def test_layer_outputs_and_gradients(qk_norm, backend):
    ours, theirs = twin_layers(qwen3_5.GroupedQueryAttention, book.GroupedQueryAttention, 32, 4, 2, 16, qk_norm, seed=8)
    for norm in (ours.q_norm, ours.k_norm, theirs.q_norm, theirs.k_norm):
        if norm is not None:  # away from their zero init, so a missing (1 + w) shows
            torch.manual_seed(1)
            norm.weight.data.normal_()
    n = 27
    cos, sin = tables()
    assert_same_outputs_and_grads(ours, theirs, torch.randn(2, n, 32, device=DEVICE), causal(0, n), cos, sin, tol=TOL)


def test_the_gate_matters():
    # Without the sigmoid gate the output would differ: the test above would see a dropped gate.
    layer = qwen3_5.GroupedQueryAttention(32, 4, 2, 16, True).to(DEVICE)
    x, (cos, sin) = torch.randn(1, 5, 32, device=DEVICE), tables()
    out = layer(x, causal(0, 5), cos, sin)
    with torch.no_grad():
        layer.W_query.weight[16:32].zero_()  # head 0's gate rows: sigmoid(0) = 1/2 there
    assert not torch.allclose(out, layer(x, causal(0, 5), cos, sin), atol=1e-4)


def test_kv_layer_prefill_then_tokens(backend):
    ours, theirs = twin_layers(
        qwen3_5.KVGroupedQueryAttention, book.KVGroupedQueryAttention, 32, 4, 2, 16, True, seed=9
    )
    ours.eval(), theirs.eval()
    x = torch.randn(2, 30, 32, device=DEVICE)
    cos, sin = tables()
    mine = book_cache = None
    with torch.no_grad():
        for a, b in [(0, 9)] + [(t, t + 1) for t in range(9, 20)] + [(20, 30)]:  # a prompt, tokens, a chunk
            mask = causal(a, b)[None, None]
            out, mine = ours(x[:, a:b], mask, cos, sin, start_pos=a, cache=mine)
            ref, book_cache = theirs(x[:, a:b], mask, cos, sin, start_pos=a, cache=book_cache)
            torch.testing.assert_close(out, ref, **TOL)
            torch.testing.assert_close(mine, book_cache, **TOL)  # unrotated keys, as the book's


def test_model_logits_and_training_loss(backend):
    torch.manual_seed(13)
    theirs = book.Qwen3_5(CFG).to(DEVICE)
    ours = fused_copy(theirs, {book.GroupedQueryAttention: qwen3_5.GroupedQueryAttention})
    assert type(ours.trf_blocks[0].token_mixer) is book.Qwen3_5GatedDeltaNet  # linear attention: the book's
    ids, targets = torch.randint(0, CFG["vocab_size"], (2, 2, 19), device=DEVICE)
    assert_same_training_step(ours, theirs, ids, targets, TOL)


def test_model_cached_logits_and_greedy_tokens(backend):
    cfg = {**CFG, "layer_types": ["full_attention"] * 2, "n_layers": 2}
    torch.manual_seed(14)
    theirs = book.KVQwen3_5(cfg).to(DEVICE)
    ours = fused_copy(theirs, {book.KVGroupedQueryAttention: qwen3_5.KVGroupedQueryAttention})
    prompt = torch.randint(0, CFG["vocab_size"], (1, 6), device=DEVICE)
    ids_o, logits_o = greedy(ours, prompt, 10, 2)
    ids_t, logits_t = greedy(theirs, prompt, 10, 2)
    torch.testing.assert_close(logits_o, logits_t, **TOL)
    assert torch.equal(ids_o, ids_t)
    assert torch.equal(ids_t, greedy(theirs, prompt, 10)[0])


def test_swap_converts_the_gated_layers_and_says_it_left_the_deltanet(caplog):
    torch.manual_seed(17)
    theirs = book.Qwen3_5(CFG).to(DEVICE)
    ids = torch.randint(0, CFG["vocab_size"], (1, 12), device=DEVICE)
    with caplog.at_level(logging.INFO, logger="chapter3_flash.attention.swap"):
        ours = attention.swap_attention(copy.deepcopy(theirs))
    kinds = [type(b.token_mixer) for b in ours.trf_blocks]
    assert kinds == [book.Qwen3_5GatedDeltaNet, qwen3_5.GroupedQueryAttention] * 2
    assert "trf_blocks.0.token_mixer (Qwen3_5GatedDeltaNet) left as the book's" in caplog.text
    assert "linear attention" in caplog.text
    theirs.eval(), ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids), **TOL)


def test_swap_converts_the_cached_gated_layers():
    cfg = {**CFG, "layer_types": ["full_attention"] * 2, "n_layers": 2}
    torch.manual_seed(18)
    theirs = book.KVQwen3_5(cfg).to(DEVICE)
    ours = attention.swap_attention(copy.deepcopy(theirs))
    assert {type(b.token_mixer) for b in ours.trf_blocks} == {qwen3_5.KVGroupedQueryAttention}
    prompt = torch.randint(0, CFG["vocab_size"], (1, 5), device=DEVICE)
    assert torch.equal(greedy(ours, prompt, 6, 2)[0], greedy(theirs, prompt, 6, 2)[0])
