"""The book package's KV-cache layers with the cache held by the caller (pkg llms_from_scratch.kv_cache: gpt2,
llama3, qwen3), fused, against a reader's copies: same parameters, the same outputs and next_cache tensors step
by step (a prefill, single tokens through the decode kernel, a chunk), gradients, swap_attention, clear errors."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from chapter3_flash.attention import kv_cache_pkg
from chapter3_flash.attention.rope import mask_rule
from helpers import DEVICE, twin_layers
from torch import nn

from bench.book import kv_cache_pkg as book
from bench.book.rope import compute_rope_params
from chapter3_flash import attention

TOL = dict(atol=2e-5, rtol=1e-4)
STEPS = ((0, 7), (7, 8), (8, 9), (9, 21), (21, 22))  # a prompt, tokens, a chunk, a token


def pair(ours_cls, book_cls, *args, **kw):
    return twin_layers(ours_cls, book_cls, *args, seed=5, **kw)


def same(a, b):
    torch.testing.assert_close(a[0], b[0], **TOL)
    if b[1] is None:
        assert a[1] is None
    else:
        for mine, theirs in zip(a[1], b[1]):  # next_cache: (keys, values), (b, kv_heads, T, head_dim)
            assert mine.shape == theirs.shape
            torch.testing.assert_close(mine, theirs, **TOL)


def test_gpt2_layer_steps_match_the_book(backend):
    ours, theirs = pair(kv_cache_pkg.MultiHeadAttention, book.MultiHeadAttention, 12, 12, 40, 0.0, 3, qkv_bias=True)
    ours.eval(), theirs.eval()
    x = torch.randn(2, 22, 12, device=DEVICE)
    cache_a = cache_b = None
    with torch.no_grad():
        for a, b in STEPS:
            out_a = ours(x[:, a:b], use_cache=True, start_pos=a, cache=cache_a)
            out_b = theirs(x[:, a:b], use_cache=True, start_pos=a, cache=cache_b)
            same(out_a, out_b)
            cache_a, cache_b = out_a[1], out_b[1]
        same(ours(x), theirs(x))  # no cache: plain causal, next_cache None


@pytest.mark.parametrize("kind", ["llama3", "qwen3"])
def test_grouped_layers_steps_match_the_book(kind, backend):
    if kind == "llama3":
        ours, theirs = pair(kv_cache_pkg.Llama3GroupedQueryAttention, book.Llama3GroupedQueryAttention, 32, 32, 4, 2)
    else:
        args = (32, 4, 2)
        kw = dict(head_dim=16, qk_norm=True)
        ours, theirs = pair(kv_cache_pkg.Qwen3GroupedQueryAttention, book.Qwen3GroupedQueryAttention, *args, **kw)
    cos, sin = (t.to(DEVICE) for t in compute_rope_params(ours.head_dim, context_length=64))
    x = torch.randn(2, 22, 32, device=DEVICE)
    cache_a = cache_b = None
    with torch.no_grad():
        for a, b in STEPS:
            mask = book.model_mask(a, b, DEVICE)  # one tensor per step, as the model builds it
            out_a = ours(x[:, a:b], mask, cos, sin, start_pos=a, cache=cache_a)
            out_b = theirs(x[:, a:b], mask, cos, sin, start_pos=a, cache=cache_b)
            same(out_a, out_b)
            cache_a, cache_b = out_a[1], out_b[1]
    # Gradients through a cached chunk (the prefix from the cache, without gradients).
    xa, xb = x[:, 9:21].clone().requires_grad_(), x[:, 9:21].clone().requires_grad_()
    prefix = tuple(t[:, :, :9] for t in cache_b)
    out_a, _ = ours(xa, book.model_mask(9, 21, DEVICE), cos, sin, start_pos=9, cache=prefix)
    out_b, _ = theirs(xb, book.model_mask(9, 21, DEVICE), cos, sin, start_pos=9, cache=prefix)
    out_a.square().sum().backward()
    out_b.square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, **TOL)
    for (name, pa), (_, pb) in zip(ours.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, **TOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("window", [None, 5])
def test_gemma3_layer_steps_match_the_book(window, backend):
    """Gemma 3's notebook caches keys before RoPE; the local layers' mask hides keys W or more behind."""
    args = (32, 4, 1)
    kw = dict(head_dim=16, qk_norm=True, query_pre_attn_scalar=12)
    ours, theirs = pair(kv_cache_pkg.Gemma3GroupedQueryAttention, book.Gemma3GroupedQueryAttention, *args, **kw)
    cos, sin = (t.to(DEVICE) for t in compute_rope_params(16, context_length=64))
    x = torch.randn(2, 22, 32, device=DEVICE)
    cache_a = cache_b = None
    with torch.no_grad():
        for a, b in STEPS:
            mask = book.model_mask(a, b, DEVICE, sliding_window=window)
            out_a = ours(x[:, a:b], mask, cos, sin, start_pos=a, cache=cache_a)
            out_b = theirs(x[:, a:b], mask, cos, sin, start_pos=a, cache=cache_b)
            same(out_a, out_b)
            cache_a, cache_b = out_a[1], out_b[1]
    chunk = book.model_mask(9, 21, DEVICE, sliding_window=window)  # read as a kernel rule, not run eagerly
    assert mask_rule(chunk) == (True, (-1, -1) if window is None else (window - 1, -1))


def test_swap_converts_the_pkg_layers():
    model = nn.ModuleList(
        [
            book.MultiHeadAttention(12, 12, 40, 0.0, 3),
            book.Llama3GroupedQueryAttention(32, 32, 4, 2),
            book.Qwen3GroupedQueryAttention(32, 4, 2, head_dim=16, qk_norm=True),
            book.Gemma3GroupedQueryAttention(32, 4, 1, head_dim=16, qk_norm=True, query_pre_attn_scalar=12),
        ]
    ).to(DEVICE)
    before = copy.deepcopy(model)
    attention.swap_attention(model)
    assert [type(m) for m in model] == [
        kv_cache_pkg.MultiHeadAttention,
        kv_cache_pkg.Llama3GroupedQueryAttention,
        kv_cache_pkg.Qwen3GroupedQueryAttention,
        kv_cache_pkg.Gemma3GroupedQueryAttention,
    ]
    x = torch.randn(1, 5, 12, device=DEVICE)
    with torch.no_grad():
        same(model[0](x, use_cache=True), before[0](x, use_cache=True))


def test_a_batched_look_alike_is_refused_and_the_batched_call_form_is_an_error_here():
    # A class of the batched package whose forward is the non-batched one: the probe's batched calls fail on it.
    # (The batched layer itself is converted: tests/attention/test_kv_cache_batched.py.)
    layer = book.Qwen3GroupedQueryAttention(32, 4, 2, head_dim=16)
    batched = type("GroupedQueryAttention", (book.Qwen3GroupedQueryAttention,), {})
    batched.__module__ = "llms_from_scratch.kv_cache_batched.qwen3"
    model = nn.Sequential(copy.deepcopy(layer), batched(32, 4, 2, head_dim=16))
    with pytest.raises(ValueError, match="kv_cache_batched"):
        attention.swap_attention(model)
    assert type(model[0]) is book.Qwen3GroupedQueryAttention, "a refused swap must leave the model as it was"
    ours = kv_cache_pkg.Qwen3GroupedQueryAttention(32, 4, 2, head_dim=16)
    cos, sin = compute_rope_params(16, context_length=16)
    with pytest.raises(TypeError, match="start_pos must be an int"):
        ours(torch.randn(2, 1, 32), book.model_mask(3, 4), cos, sin, start_pos=torch.tensor([3, 3]), cache=[None, None])


def test_masks_made_under_inference_mode_are_read_every_call(backend):
    """Inference tensors have no version counter: their rule cannot be remembered, so it is read each time."""
    ours, theirs = pair(kv_cache_pkg.Qwen3GroupedQueryAttention, book.Qwen3GroupedQueryAttention, 32, 4, 2, head_dim=16)
    cos, sin = (t.to(DEVICE) for t in compute_rope_params(16, context_length=16))
    x = torch.randn(1, 6, 32, device=DEVICE)
    with torch.inference_mode():
        mask = book.model_mask(0, 6, DEVICE)
        same(ours(x, mask, cos, sin), theirs(x, mask, cos, sin))
        mask[..., 0, 1] = False  # changed in place: no longer causal, and not read as causal (eager, one warning)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            same(ours(x, mask, cos, sin), theirs(x, mask, cos, sin))


def test_a_cache_that_does_not_fit_is_a_clear_error():
    ours = kv_cache_pkg.MultiHeadAttention(12, 12, 40, 0.0, 3).to(DEVICE)
    x = torch.randn(2, 1, 12, device=DEVICE)
    good = torch.zeros(2, 3, 5, 4, device=DEVICE)
    for cache, err, match in (
        ((good,), ValueError, "pair"),
        ((good[:1], good[:1]), ValueError, "batch, heads and head_dim"),
        ((good, good[..., :2]), ValueError, "batch, heads and head_dim"),
        ((good.double(), good.double()), ValueError, "float64"),
        ((good, None), TypeError, "must be a tensor"),
    ):
        with pytest.raises(err, match=match):
            ours(x, use_cache=True, cache=cache)
