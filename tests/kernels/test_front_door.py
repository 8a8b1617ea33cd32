"""The front door (kernels/checks.py): odd input gives the chapter's answer or a clear error on every backend, and a
refused call writes nothing.

Every case runs on the Triton path (the interpreter on a CPU) and on PyTorch's ("sdpa", "torch")."""

from __future__ import annotations

import itertools

import pytest
import torch
from chapter3_flash.kernels import checks, flash_attention, flash_attention_with_kvcache
from helpers import DEVICE, attention_eager

BACKENDS = ["triton", "sdpa", "torch"]


def _cache(B=2, H_KV=2, T=12, D=8, length=5):
    k_cache = torch.randn(B, H_KV, T, D, device=DEVICE)
    v_cache = torch.randn(B, H_KV, T, D, device=DEVICE)
    q = torch.randn(B, 2 * H_KV, 1, D, device=DEVICE)
    k, v = (torch.randn(B, H_KV, 1, D, device=DEVICE) for _ in range(2))
    return q, k_cache, v_cache, k, v, length


def _refused(error, words, *tensors, **kwargs):
    """The call raises ``error`` matching ``words`` and leaves every given tensor exactly as it was."""
    before = [t.clone() for t in tensors]
    with pytest.raises(error, match=words), torch.no_grad():
        flash_attention_with_kvcache(*tensors[:5], **kwargs)
    for i, (a, b) in enumerate(zip(before, tensors)):
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)), f"tensor {i} was written by a refused call"


# ---------------------------------------------------------------------------------------------------------------
# Caches: aliasing, stride 0, inference tensors
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_tensor_as_both_caches_is_refused(backend):
    q, k_cache, _, k, v, n = _cache()
    _refused(ValueError, "share memory", q, k_cache, k_cache, k, v, cache_seqlens=n, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_overlapping_caches_are_refused(backend):
    q, buf, _, k, v, n = _cache(T=13)
    k_cache, v_cache = buf[:, :, :12], buf[:, :, 1:]  # one row apart: every row but one shared
    _refused(ValueError, "share memory", q, k_cache, v_cache, k, v, cache_seqlens=n, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_new_keys_that_alias_the_rows_being_written_are_refused(backend):
    q, k_cache, v_cache, _, v, n = _cache()
    k = k_cache[:, :, n : n + 1]  # the very rows the append writes
    _refused(ValueError, "k shares memory with k_cache", q, k_cache, v_cache, k, v, cache_seqlens=n, backend=backend)
    q = v_cache[:, :, :1].repeat_interleave(2, dim=1)[:, :, :1]  # a copy: fine
    q = torch.cat([v_cache[:, :, :1]] * 2, dim=1)
    with torch.no_grad():
        flash_attention_with_kvcache(q, k_cache, v_cache, k.clone(), v, cache_seqlens=n, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_expanded_cache_is_refused(backend):
    q, k_cache, v_cache, k, v, n = _cache()
    k_cache = k_cache[:1].expand(2, -1, -1, -1)  # stride 0 over the batch: both entries share one cache
    _refused(ValueError, "stride 0", q, k_cache, v_cache, k, v, cache_seqlens=n, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_inference_cache_outside_inference_mode_is_refused(backend):
    q, k_cache, v_cache, k, v, n = _cache()
    with torch.inference_mode():
        k_cache, v_cache = k_cache.clone(), v_cache.clone()
    _refused(ValueError, "inference tensor", q, k_cache, v_cache, k, v, cache_seqlens=n, backend=backend)
    with torch.inference_mode():  # inside inference mode it is what such a cache is for
        flash_attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=n, backend=backend)
    assert torch.equal(k_cache[:, :, n : n + 1], k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_packed_cache_of_interleaved_k_and_v_is_accepted(backend):
    # One (B, T, 2, Hkv, D) buffer, k and v its two halves: they interleave but share no element.
    B, T, H_KV, D, n = 2, 12, 2, 8, 5
    buf = torch.randn(B, T, 2, H_KV, D, device=DEVICE)
    k_cache, v_cache = buf[:, :, 0].transpose(1, 2), buf[:, :, 1].transpose(1, 2)  # (B, Hkv, T, D) views
    q = torch.randn(B, 2 * H_KV, 1, D, device=DEVICE)
    k, v = (torch.randn(B, H_KV, 1, D, device=DEVICE) for _ in range(2))
    with torch.no_grad():
        out = flash_attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=n, backend=backend)
    assert torch.equal(buf[:, n, 0], k[:, :, 0]) and torch.equal(buf[:, n, 1], v[:, :, 0])
    ref = attention_eager(q.double(), k_cache[:, :, : n + 1].double(), v_cache[:, :, : n + 1].double(), causal=True)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_the_decode_grid_limit_is_checked_before_the_append():
    B = checks.MAX_GRID_YZ + 1  # B x Hkv programs on grid dim z
    q = torch.randn(B, 1, 1, 1, device=DEVICE)
    k_cache, v_cache = torch.zeros(B, 1, 2, 1, device=DEVICE), torch.zeros(B, 1, 2, 1, device=DEVICE)
    k, v = torch.ones(B, 1, 1, 1, device=DEVICE), torch.ones(B, 1, 1, 1, device=DEVICE)
    _refused(ValueError, "at most 65535", q, k_cache, v_cache, k, v, cache_seqlens=0, backend="triton")


def _offsets(t: torch.Tensor) -> set[int]:
    """Every element's storage offset, by brute force."""
    idx = itertools.product(*(range(n) for n in t.shape))
    return {t.storage_offset() + sum(i * s for i, s in zip(ix, t.stride())) for ix in idx}


def test_overlap_is_exact_on_views_of_one_buffer():
    # tensors_overlap against brute force on many views of one small buffer: slices, steps, transposes, expands.
    gen = torch.Generator().manual_seed(0)
    base = torch.zeros(4, 6, 5)
    views = []
    for _ in range(60):
        dims = torch.randint(1, 4, (3,), generator=gen).tolist()
        starts = [int(torch.randint(0, n - d + 1, (1,), generator=gen)) for n, d in zip(base.shape, dims)]
        view = base[tuple(slice(s, s + d) for s, d in zip(starts, dims))]
        if torch.rand(1, generator=gen) < 0.3:
            view = view.transpose(0, 2)
        views.append(view)
    views.append(base[:, ::2, 1::2])
    views.append(base[:, 1::2, ::2])
    views.append(base[:1].expand(3, -1, -1))
    for a, b in itertools.combinations(views, 2):
        assert checks.tensors_overlap(a, b) == bool(_offsets(a) & _offsets(b)), (a.shape, a.stride(), b.stride())
    assert not checks.tensors_overlap(torch.zeros(3), torch.zeros(3))  # two storages
    assert not checks.tensors_overlap(base[:0], base)  # nothing to share


# ---------------------------------------------------------------------------------------------------------------
# One answer for odd input
# ---------------------------------------------------------------------------------------------------------------


def _chapter(q, k, v, causal=True):
    """The chapter's arithmetic: q k^T / sqrt(d), -inf above the diagonal, softmax, @ v (in float64)."""
    s = q.double() @ k.double().transpose(-2, -1) / q.shape[-1] ** 0.5
    n_q, n_k = s.shape[-2:]
    if causal:
        hidden = torch.ones(n_q, n_k, dtype=torch.bool, device=s.device).triu(n_k - n_q + 1)
        s = s.masked_fill(hidden, float("-inf"))
    return torch.softmax(s, dim=-1) @ v.double()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["q", "k"])
def test_a_nan_propagates_to_the_rows_that_see_it(backend, where):
    q, k, v = (torch.randn(1, 2, 9, 8, device=DEVICE) for _ in range(3))
    (q if where == "q" else k)[0, 1, 5, 3] = float("nan")  # query row 5, or key 5, of head 1
    out = flash_attention(q, k, v, causal=True, backend=backend)
    ref = _chapter(q, k, v)
    bad = ref.isnan()
    # The chapter's answer: a query's NaN makes its row NaN; a key's, every row that sees it (rows 5 on).
    seeing = slice(5, 6) if where == "q" else slice(5, None)
    assert bad[0, 1, seeing].all() and bad.any(-1).sum() == bad[0, 1, seeing].shape[0]
    assert torch.equal(out.isnan(), bad), f"NaN rows {out.isnan().any(-1)} != the chapter's {bad.any(-1)}"
    torch.testing.assert_close(out[~bad].double(), ref[~bad], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_in_a_query_propagates_in_decoding(backend):
    q, k_cache, v_cache, k, v, n = _cache()
    q[1, 2, 0, 0] = float("nan")
    with torch.no_grad():
        out = flash_attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=n, backend=backend)
    assert out[1, 2].isnan().all() and not out[0].isnan().any() and not out[1, :2].isnan().any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_one_gives_zero_gradients_not_none(backend):
    q, k, v = (torch.randn(1, 2, 6, 8, device=DEVICE, requires_grad=True) for _ in range(3))
    out = flash_attention(q, k, v, causal=True, dropout_p=1.0, backend=backend)
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out))
    for t in (q, k, v):
        assert t.grad is not None and torch.equal(t.grad, torch.zeros_like(t))


@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
def test_meta_tensors_give_a_meta_output_of_the_right_shape(backend):
    q = torch.empty(2, 4, 7, 16, device="meta", requires_grad=True)
    k = torch.empty(2, 2, 9, 16, device="meta", requires_grad=True)
    out = flash_attention(q, k, k, causal=True, backend="auto" if backend == "triton" else backend)
    assert out.device.type == "meta" and out.shape == (2, 4, 7, 16) and out.dtype == q.dtype
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape
    k_cache = torch.empty(2, 2, 20, 16, device="meta")
    with torch.no_grad():
        step = flash_attention_with_kvcache(q[:, :, :1], k_cache, k_cache.clone(), cache_seqlens=3)
    assert step.device.type == "meta" and step.shape == (2, 4, 1, 16)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"window_size": (2**70, -1)}, "window_size left must be at most"),
        ({"window_size": (0, 2**31)}, "window_size right must be at most"),
    ],
)
def test_oversize_integers_are_a_value_error(kwargs, words):
    q = torch.randn(1, 1, 4, 8, device=DEVICE)
    with pytest.raises(ValueError, match=words):
        flash_attention(q, q, q, causal=False, **kwargs)
    q, k_cache, v_cache, k, v, _ = _cache()
    _refused(ValueError, "cache_seqlens must be at most", q, k_cache, v_cache, k, v, cache_seqlens=2**40)


def test_autocast_checks_the_inputs_before_the_cast():
    q = torch.randint(0, 5, (1, 2, 4, 8), device=DEVICE)  # int64
    with torch.autocast(DEVICE, dtype=torch.bfloat16), pytest.raises(TypeError, match="torch.int64"):
        flash_attention(q, q, q, causal=True)
    x = torch.randn(1, 2, 4, 8, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        assert flash_attention(x, x, x, causal=True, backend="sdpa").dtype == torch.bfloat16
