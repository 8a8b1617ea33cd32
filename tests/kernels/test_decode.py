"""kernels.flash_attention_with_kvcache against float64 attention over each sequence's cache.

Ragged cache lengths (0 included), one and several new queries, grouped heads, strided caches (the
book's (b, T, H, d) layout viewed as (b, H, T, d)), every dtype, splits forced and chosen, windows, and
the cache written in place; on both paths (the Triton kernel, the interpreter here; PyTorch's).
"""

from __future__ import annotations

import pytest
import torch
from chapter3_flash.kernels import decode, flash_attention_with_kvcache, settings
from helpers import DEVICE, assert_close_to_reference, attention_eager

BACKENDS = ["triton", "torch"]


def make_cache(B, Hq, Hkv, Nq, T, D, dtype, book_layout=False):
    q = torch.randn(B, Hq, Nq, D, device=DEVICE, dtype=dtype)
    if book_layout:  # (b, T, H, d) storage, seen as (b, H, T, d): strides (T*H*d, d, H*d, 1)
        k_cache = torch.randn(B, T, Hkv, D, device=DEVICE, dtype=dtype).transpose(1, 2)
        v_cache = torch.randn(B, T, Hkv, D, device=DEVICE, dtype=dtype).transpose(1, 2)
    else:
        k_cache = torch.randn(B, Hkv, T, D, device=DEVICE, dtype=dtype)
        v_cache = torch.randn(B, Hkv, T, D, device=DEVICE, dtype=dtype)
    return q, k_cache, v_cache


def reference(q, k_cache, v_cache, lengths, causal, window, dtype):
    """Per batch entry: attention of the Nq queries (the newest positions) to that entry's first len keys."""
    outs = []
    for b, n in enumerate(lengths):
        qb, kb, vb = q[b : b + 1], k_cache[b : b + 1, :, :n], v_cache[b : b + 1, :, :n]
        outs.append(attention_eager(qb.to(dtype), kb.to(dtype), vb.to(dtype), causal, window=window))
    return torch.cat(outs)


def check(q, k_cache, v_cache, k, v, seqlens, *, causal=True, window=(-1, -1), backend="triton", **kw):
    lengths = seqlens.tolist() if isinstance(seqlens, torch.Tensor) else [seqlens] * q.shape[0]
    n_new = 0 if k is None else k.shape[2]
    for b, n in enumerate(lengths):  # the cache past each sequence may hold anything: it must never be read
        k_cache[b, :, n:] = float("nan")
        v_cache[b, :, n:] = float("nan")
    expect_k, expect_v = k_cache.clone(), v_cache.clone()
    if k is not None:
        for b, n in enumerate(lengths):
            expect_k[b, :, n : n + n_new] = k[b]
            expect_v[b, :, n : n + n_new] = v[b]
    with torch.no_grad():
        out = flash_attention_with_kvcache(
            q, k_cache, v_cache, k, v, cache_seqlens=seqlens, causal=causal, window_size=window, backend=backend, **kw
        )
    same = lambda a, b: torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))
    assert same(k_cache, expect_k) and same(v_cache, expect_v), "the cache was not written as promised"
    totals = [n + n_new for n in lengths]
    ref64 = reference(q, k_cache, v_cache, totals, causal, window, torch.float64)
    lowp = reference(q, k_cache, v_cache, totals, causal, window, q.dtype)
    assert_close_to_reference("out", out, ref64, lowp)
    assert out.stride() == q.stride() or not q.is_contiguous()
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "B, Hq, Hkv, Nq, T, D, lengths, n_new",
    [
        pytest.param(3, 4, 4, 1, 96, 64, [0, 37, 95], 1, id="decode-ragged-with-empty"),  # one new token each
        pytest.param(2, 8, 2, 1, 130, 40, [129, 64], 1, id="gqa4-full-cache"),  # grouped heads, cache filled up
        pytest.param(2, 8, 1, 3, 80, 64, [20, 50], 3, id="mqa-speculative3"),  # three new queries, one KV head
        pytest.param(1, 4, 2, 17, 100, 32, [33], 17, id="chunked-prefill"),  # a chunk of 17 new tokens
        pytest.param(2, 2, 2, 4, 64, 16, [10, 0], 0, id="no-new-keys"),  # attend to the cache only
    ],
)
def test_matches_reference(B, Hq, Hkv, Nq, T, D, lengths, n_new, dtype, backend):
    q, k_cache, v_cache = make_cache(B, Hq, Hkv, Nq, T, D, dtype)
    k = v = None
    if n_new:
        k = torch.randn(B, Hkv, n_new, D, device=DEVICE, dtype=dtype)
        v = torch.randn(B, Hkv, n_new, D, device=DEVICE, dtype=dtype)
    check(q, k_cache, v_cache, k, v, torch.tensor(lengths, device=DEVICE, dtype=torch.int32), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_book_layout_and_int_length(backend):
    # The book's cache is (b, T, nh, hd): its .transpose(1, 2) view goes in without a copy, and the new token
    # is written through it.
    B, H, T, D = 2, 3, 50, 24
    q, k_cache, v_cache = make_cache(B, H, H, 1, T, D, torch.float32, book_layout=True)
    assert not k_cache.is_contiguous()
    k, v = (torch.randn(B, H, 1, D, device=DEVICE) for _ in range(2))
    check(q, k_cache, v_cache, k, v, 21, backend=backend)


@pytest.mark.parametrize("fused", [True, False], ids=["append-in-decode", "append-kernel"])
@pytest.mark.parametrize(
    "B, Hq, Hkv, N_new, T, D, lengths, num_splits, window",
    [
        (3, 4, 2, 1, 90, 32, [0, 17, 88], 3, (-1, -1)),  # ragged, one empty, the new key in the last split
        (2, 4, 4, 20, 80, 16, [5, 40], 2, (-1, -1)),  # 20 new keys: more than one key tile of them
        (1, 2, 1, 3, 64, 64, [61], 1, (-1, -1)),  # the step fills the cache to its last row
        (2, 6, 2, 4, 70, 24, [30, 3], 2, (6, -1)),  # a window narrower than the step's reach
    ],
)
def test_both_append_paths(monkeypatch, fused, B, Hq, Hkv, N_new, T, D, lengths, num_splits, window):
    # The decode kernel appends the step's keys itself (settings' fused_append) and reads them from k, v, never
    # from the cache rows it is writing (check() fills those with NaN); the other path appends in a kernel of its
    # own first.
    monkeypatch.setattr(settings.current, "fused_append", fused)
    q, k_cache, v_cache = make_cache(B, Hq, Hkv, N_new, T, D, torch.float16, book_layout=True)
    k, v = (torch.randn(B, Hkv, N_new, D, device=DEVICE, dtype=torch.float16) for _ in range(2))
    seqlens = torch.tensor(lengths, device=DEVICE)
    check(q, k_cache, v_cache, k, v, seqlens, window=window, num_splits=num_splits)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "Nq, n_new, length, causal, window",
    [
        (1, 1, 40, True, (-1, -1)),  # the usual step: every key seen (PyTorch's path without a mask)
        (5, 5, 30, True, (-1, -1)),  # a chunk: bottom-right causal
        (6, 0, 2, True, (-1, -1)),  # more queries than keys: the first four see none
        (3, 3, 50, True, (7, -1)),  # a window narrower than the cache
        (4, 2, 20, False, (3, 2)),  # a two-sided window, not causal
        (2, 0, 0, True, (-1, -1)),  # an empty cache and no new keys: zeros
        (1, 1, 0, False, (-1, 0)),  # a first token that sees only itself
    ],
)
def test_int_lengths(Nq, n_new, length, causal, window, backend):
    # An int cache_seqlens (what the layers pass) takes its own PyTorch path: the cache sliced, one mask or none.
    q, k_cache, v_cache = make_cache(2, 4, 2, Nq, 64, 16, torch.float32, book_layout=True)
    k = v = None
    if n_new:
        k, v = (torch.randn(2, 2, n_new, 16, device=DEVICE) for _ in range(2))
    check(q, k_cache, v_cache, k, v, length, causal=causal, window=window, backend=backend)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7])
def test_splits_agree(num_splits):
    # Split-KV: each split's partial output merged by its log-sum-exp; ragged lengths leave some splits empty.
    q, k_cache, v_cache = make_cache(3, 8, 2, 2, 200, 64, torch.float16)
    lengths = torch.tensor([199, 3, 120], device=DEVICE)
    check(q, k_cache, v_cache, None, None, lengths, num_splits=num_splits)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal, window", [(True, (15, -1)), (False, (-1, -1)), (False, (6, 2))])
def test_windows_and_non_causal(causal, window, backend):
    q, k_cache, v_cache = make_cache(2, 4, 2, 3, 120, 32, torch.float32)
    k, v = (torch.randn(2, 2, 3, 32, device=DEVICE) for _ in range(2))
    check(
        q, k_cache, v_cache, k, v, torch.tensor([70, 100], device=DEVICE), causal=causal, window=window, backend=backend
    )


@pytest.mark.parametrize("D", [1, 80, 128, 256])
def test_head_dims(D):
    q, k_cache, v_cache = make_cache(2, 2, 1, 1, 40, D, torch.float16)
    k, v = (torch.randn(2, 1, 1, D, device=DEVICE, dtype=torch.float16) for _ in range(2))
    check(q, k_cache, v_cache, k, v, torch.tensor([39, 5], device=DEVICE))


def test_rows_that_see_nothing_are_zero():
    # Nq > cache length + new keys, causal: the first rows see no key.
    q, k_cache, v_cache = make_cache(1, 2, 2, 6, 16, 16, torch.float32)
    with torch.no_grad():
        out = flash_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=2)
    assert torch.equal(out[:, :, :4], torch.zeros_like(out[:, :, :4]))
    check(q, k_cache, v_cache, None, None, 2)


def test_split_heuristic():
    # FlashAttention's rule: no split once the programs fill the GPU, else the fewest efficient splits.
    assert decode.num_splits_heuristic(programs=132, num_sms=132, num_blocks=512) == 1
    s = decode.num_splits_heuristic(programs=8, num_sms=132, num_blocks=512)
    assert 8 <= s <= 128 and (8 * s / 132) / -(-(8 * s / 132) // 1) >= 0.8
    assert decode.num_splits_heuristic(programs=1, num_sms=132, num_blocks=3) <= 3


def test_narrow_heads_split_more_while_the_grid_is_thin():
    # The shapes of the H200 split experiment (bench/NOTES.md, run 4), 132 SMs, 64-key blocks: B 8 cache 4096
    # D 64 goes from the heuristic's 2 splits to 4 (measured 1.21x); D 128 keeps 2 (2 and 4 tied); B 1 keeps
    # its 16 splits of 256 keys (32 measured slower); a full grid never splits.
    blocks = 4096 // 64
    assert decode.num_splits_heuristic(64, 132, blocks) == 2
    assert decode.split_count(64, 132, blocks, 64, 64) == 4
    assert decode.split_count(64, 132, blocks, 64, 128) == 2
    assert decode.split_count(8, 132, blocks, 64, 64) == decode.num_splits_heuristic(8, 132, blocks) == 16
    assert decode.split_count(132, 132, blocks, 64, 64) == 1
    s = decode.split_count(64, 132, 32768 // 64, 64, 64)  # B 8 cache 32768: grows to two programs per SM
    assert 64 * s >= 2 * 132 and 64 * s // 2 < 2 * 132


def _q(*shape, dtype=torch.float32, **kw):
    return torch.randn(*shape, device=DEVICE, dtype=dtype, **kw)


@pytest.mark.parametrize(
    "args, kwargs, error, words",
    [
        (
            (_q(1, 2, 1, 8), _q(1, 2, 10, 8), _q(1, 2, 10, 8), _q(1, 2, 2, 8), _q(1, 2, 2, 8)),
            {"cache_seqlens": 9},
            ValueError,
            "runs past the cache",
        ),  # fmt: skip
        ((_q(1, 2, 1, 8), _q(1, 2, 10, 8), _q(1, 2, 10, 8)), {"cache_seqlens": -1}, ValueError, ">= 0"),
        (
            (_q(1, 2, 1, 8), _q(1, 2, 10, 8), _q(1, 2, 10, 8), _q(1, 2, 1, 8)),
            {"cache_seqlens": 1},
            ValueError,
            "both k and v",
        ),  # fmt: skip
        ((_q(1, 2, 1, 8), _q(1, 2, 10, 8), _q(1, 2, 10, 8)), {"cache_seqlens": 1.5}, TypeError, "cache_seqlens"),
        (
            (_q(2, 2, 1, 8), _q(2, 2, 10, 8), _q(2, 2, 10, 8)),
            {"cache_seqlens": torch.tensor([1.0, 2.0], device=DEVICE)},
            TypeError,
            "int32/int64",
        ),  # fmt: skip
        (
            (_q(2, 2, 1, 8), _q(2, 2, 10, 8), _q(2, 2, 10, 8)),
            {"cache_seqlens": torch.tensor([1], device=DEVICE)},
            TypeError,
            "shape \\(2,\\)",
        ),  # fmt: skip
        ((_q(1, 3, 1, 8), _q(1, 2, 10, 8), _q(1, 2, 10, 8)), {"cache_seqlens": 1}, ValueError, "multiple"),
        ((_q(1, 2, 1, 8), _q(1, 2, 10, 4), _q(1, 2, 10, 4)), {"cache_seqlens": 1}, ValueError, "head_dim"),
        (
            (_q(1, 2, 1, 8, dtype=torch.float16), _q(1, 2, 10, 8), _q(1, 2, 10, 8)),
            {"cache_seqlens": 1},
            TypeError,
            "k_cache is torch.float32 and q is torch.float16",
        ),  # fmt: skip
        (
            (_q(1, 2, 1, 8), _q(1, 2, 10, 8), _q(1, 2, 10, 8)),
            {"cache_seqlens": 1, "num_splits": -1},
            ValueError,
            "num_splits",
        ),  # fmt: skip
        (
            (_q(1, 2, 1, 8), _q(1, 2, 10, 8), _q(1, 2, 10, 8)),
            {"cache_seqlens": 1, "window_size": (-2, 0)},
            ValueError,
            "window_size",
        ),  # fmt: skip
        (
            (_q(1, 2, 1, 8), _q(1, 2, 10, 8), _q(1, 2, 10, 8)),
            {"cache_seqlens": 1, "backend": "cuda"},
            ValueError,
            "backend",
        ),  # fmt: skip
        (
            (_q(1, 2, 1, 8, requires_grad=True), _q(1, 2, 10, 8), _q(1, 2, 10, 8)),
            {"cache_seqlens": 1},
            ValueError,
            "forward only",
        ),  # fmt: skip
    ],
)
def test_bad_input(args, kwargs, error, words):
    caches = [t.clone() for t in args[1:3]]
    with pytest.raises(error, match=words):
        flash_attention_with_kvcache(*args, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(caches, args[1:3])), "a refused call must not touch the cache"


def test_tensor_lengths_past_the_cache_are_refused():
    q, k_cache, v_cache = make_cache(2, 2, 2, 1, 10, 8, torch.float32)
    k, v = (torch.randn(2, 2, 1, 8, device=DEVICE) for _ in range(2))
    with pytest.raises(ValueError, match="runs past the cache"):
        with torch.no_grad():
            flash_attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=torch.tensor([3, 10], device=DEVICE))
