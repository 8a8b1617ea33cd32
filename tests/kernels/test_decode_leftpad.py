"""flash_attention_with_kvcache's cache_leftpad, softcap and sinks against tests/helpers.attention_ref.

Each sequence's keys are ``leftpad[b] <= j < cache_seqlens[b] + N_new`` (FlashAttention-2's semantics): the
reference attends to exactly that slice; the padding before it and the cache past it hold NaN, which must never
be read. Both paths (the Triton decode kernel, the interpreter here; PyTorch's), split and unsplit.
"""

from __future__ import annotations

import pytest
import torch
from chapter3_flash.kernels import flash_attention_with_kvcache
from helpers import DEVICE, assert_close_to_reference, attention_ref

BACKENDS = ["triton", "torch"]


def check(B, Hq, Hkv, Nq, T, D, lengths, pads, n_new, *, backend, num_splits=0, window=(-1, -1), **kw):
    q = torch.randn(B, Hq, Nq, D, device=DEVICE)
    k_cache = torch.randn(B, Hkv, T, D, device=DEVICE)
    v_cache = torch.randn(B, Hkv, T, D, device=DEVICE)
    k_new = torch.randn(B, Hkv, n_new, D, device=DEVICE) if n_new else None
    v_new = torch.randn(B, Hkv, n_new, D, device=DEVICE) if n_new else None
    for b, (n, pad) in enumerate(zip(lengths, pads)):  # padding and the cache past the sequence: never read
        for cache in (k_cache, v_cache):
            cache[b, :, :pad] = float("nan")
            cache[b, :, n:] = float("nan")
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    leftpad = torch.tensor(pads, dtype=torch.int32, device=DEVICE)
    out = flash_attention_with_kvcache(
        q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens, cache_leftpad=leftpad, window_size=window,
        backend=backend, num_splits=num_splits, **kw,
    )  # fmt: skip
    refs = {}
    for label, dtype in (("ref64", torch.float64), ("lowp", torch.float32)):
        outs = []
        for b, (n, pad) in enumerate(zip(lengths, pads)):
            end = n + n_new
            kb, vb = k_cache[b : b + 1, :, pad:end], v_cache[b : b + 1, :, pad:end]  # the appended cache
            s = kw.get("sinks")
            o, _ = attention_ref(
                q[b : b + 1].to(dtype), kb.to(dtype), vb.to(dtype), causal=kw.get("causal", True), window=window,
                softcap=kw.get("softcap", 0.0), sinks=None if s is None else s.to(dtype),
            )  # fmt: skip
            outs.append(o)
        refs[label] = torch.cat(outs)
    assert_close_to_reference("out", out, refs["ref64"], refs["lowp"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize(
    "features",
    [dict(), dict(softcap=2.0), dict(sinks=True), dict(softcap=1.5, sinks=True)],
    ids=["leftpad", "softcap", "sinks", "softcap+sinks"],
)
def test_left_padded_batch(features, num_splits, backend):
    kw = dict(features)
    if kw.pop("sinks", False):
        kw["sinks"] = torch.randn(4, device=DEVICE) * 2
    # Sequence 0 left-padded by 5, sequence 1 by a whole block and more, sequence 2 not at all; one padded to
    # its very end (no key: zeros).
    check(4, 4, 2, 1, 80, 16, [40, 70, 17, 9], [5, 37, 0, 10], 1, backend=backend, num_splits=num_splits, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunk_with_window_and_leftpad(backend):
    check(2, 4, 1, 3, 64, 32, [30, 50], [4, 20], 3, backend=backend, window=(8, 0), softcap=3.0, num_splits=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_and_sinks_without_leftpad(backend):
    q = torch.randn(2, 4, 1, 16, device=DEVICE)
    cache = torch.randn(2, 2, 40, 16, device=DEVICE)
    sinks = torch.randn(4, device=DEVICE)
    out = flash_attention_with_kvcache(q, cache, cache, cache_seqlens=33, softcap=2.0, sinks=sinks, backend=backend)
    ref, _ = attention_ref(
        q.double(), cache[:, :, :33].double(), cache[:, :, :33].double(), causal=True, softcap=2.0, sinks=sinks.double()
    )
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "leftpad, error, words",
    [
        (torch.tensor([0, 1], dtype=torch.float32), TypeError, "cache_leftpad must be an int32/int64 tensor"),
        (torch.tensor([0], dtype=torch.int32), TypeError, r"shape \(2,\)"),
        ([0, 1], TypeError, "cache_leftpad must be"),
        (torch.tensor([0, 12], dtype=torch.int32), ValueError, r"cache_leftpad\[1\] = 12 must be in \[0, "),
        (torch.tensor([-1, 0], dtype=torch.int32), ValueError, r"cache_leftpad\[0\] = -1"),
    ],
)
def test_bad_leftpad(leftpad, error, words):
    q = torch.randn(2, 2, 1, 16, device=DEVICE)
    cache = torch.randn(2, 2, 20, 16, device=DEVICE)
    with pytest.raises(error, match=words):
        flash_attention_with_kvcache(q, cache, cache, cache_seqlens=10, cache_leftpad=leftpad)
