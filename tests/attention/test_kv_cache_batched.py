"""The pkg's batched KV-cache Qwen3 layer (llms_from_scratch.kv_cache_batched), fused: a reader's copy's contract
kept (a position per sequence, a list of per-sequence caches returned grown), the same outputs and caches step by
step (a prompt, single tokens through the decode kernel, a chunk), clear errors, and swap_attention."""

from __future__ import annotations

import copy

import pytest
import torch
from chapter3_flash.attention import kv_cache_pkg
from helpers import DEVICE, twin_layers
from torch import nn

from bench.book import kv_cache_batched as book
from bench.book.rope import compute_rope_params
from chapter3_flash import attention

TOL = dict(atol=2e-5, rtol=1e-4)


def steps(layer, x, cos, sin):
    """The batched model's calls: a prompt of 11, two single tokens, a chunk of 5; outputs and caches of each."""
    b = x.shape[0]
    pos, cache, out = torch.zeros(b, dtype=torch.long, device=DEVICE), [None] * b, []
    for s, e in ((0, 11), (11, 12), (12, 13), (13, 18)):  # 11: not a multiple of any tile
        mask = book.model_mask(pos, e - s, DEVICE)  # (b, 1, e - s, e): each sequence's rows
        context, cache = layer(x[:, s:e], mask, cos, sin, start_pos=pos.clone(), cache=cache)
        out.append((context, [tuple(c) for c in cache]))
        pos = pos + (e - s)
    return out


def test_same_outputs_and_caches_step_by_step(backend):
    ours, theirs = twin_layers(
        kv_cache_pkg.Qwen3BatchedGroupedQueryAttention, book.GroupedQueryAttention, 32, 4, 2, 16, True, seed=2
    )
    ours.eval(), theirs.eval()
    cos, sin = (t.to(DEVICE) for t in compute_rope_params(16, context_length=32))
    x = torch.randn(3, 18, 32, device=DEVICE)
    with torch.no_grad():
        zeros, mask = torch.zeros(3, dtype=torch.long, device=DEVICE), book.model_mask(None, 18, DEVICE)
        uncached = [layer(x, mask, cos, sin, start_pos=zeros, cache=None) for layer in (ours, theirs)]
        torch.testing.assert_close(uncached[0][0], uncached[1][0], **TOL)
        for (a, cache_a), (b, cache_b) in zip(steps(ours, x, cos, sin), steps(theirs, x, cos, sin)):
            torch.testing.assert_close(a, b, **TOL)
            assert len(cache_a) == len(cache_b) == 3  # one (keys, values) pair per sequence, (1, kv_heads, T, hd)
            for (ka, va), (kb, vb) in zip(cache_a, cache_b):
                assert ka.shape == kb.shape
                torch.testing.assert_close(ka, kb, **TOL)
                torch.testing.assert_close(va, vb, **TOL)


def test_bad_calls_are_clear_errors():
    layer = kv_cache_pkg.Qwen3BatchedGroupedQueryAttention(32, 4, 2, 16)
    cos, sin = compute_rope_params(16, context_length=16)
    x = torch.randn(2, 1, 32)
    with pytest.raises(TypeError, match=r"start_pos must be an integer tensor of one position per sequence, shape"):
        layer(x, book.model_mask(torch.tensor([3, 3]), 1), cos, sin, start_pos=3, cache=[None, None])
    with pytest.raises(ValueError, match="RoPE positions 16 to 16 are outside the tables' 16 positions"):
        layer(x, book.model_mask(torch.tensor([16, 16]), 1), cos, sin, start_pos=torch.tensor([16, 16]), cache=None)
    with pytest.raises(ValueError, match="list of 2 per-sequence"):
        layer(x, book.model_mask(torch.tensor([0, 0]), 1), cos, sin, start_pos=torch.tensor([0, 0]), cache=[None])
    k = torch.randn(1, 2, 3, 16)
    uneven = [(k, k), (k[:, :, :2], k[:, :, :2])]
    with pytest.raises(ValueError, match=r"caches hold \[3, 4\] positions"):
        layer(x, book.model_mask(torch.tensor([3, 3]), 1), cos, sin, start_pos=torch.tensor([3, 3]), cache=uneven)


def test_swap_converts_the_batched_layer_and_keeps_its_outputs():
    torch.manual_seed(0)
    model = nn.ModuleList([book.GroupedQueryAttention(32, 4, 2, 16, qk_norm=True) for _ in range(2)]).to(DEVICE)
    before = copy.deepcopy(model).eval()
    attention.swap_attention(model)
    model.eval()
    assert all(type(m) is kv_cache_pkg.Qwen3BatchedGroupedQueryAttention for m in model)
    cos, sin = (t.to(DEVICE) for t in compute_rope_params(16, context_length=32))
    x = torch.randn(2, 18, 32, device=DEVICE)
    with torch.no_grad():
        for (a, _), (b, _) in zip(steps(model[1], x, cos, sin), steps(before[1], x, cos, sin)):
            torch.testing.assert_close(a, b, **TOL)
