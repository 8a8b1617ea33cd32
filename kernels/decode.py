"""Attention over a KV cache for generation: the cache written in place, a split-KV (FlashDecoding) kernel.

``flash_attention_with_kvcache`` is FlashAttention's call of that name in this project's ``(B, H, N, D)``
layout. One step of generation attends ``Nq`` new queries (1 in plain decoding; more in chunked prefill
or speculative decoding) to a cache of ``cache_seqlens[b]`` keys, after appending the step's own keys.

Why a kernel of its own: with one query row per head, a FlashAttention-2 grid has ``B * H`` programs of
one row each, which leaves most of a GPU idle and reads each key/value head once per query head. Here

- the query heads that share a key/value head (grouped-query attention) are packed into the rows of one
  tile, so each cache byte is read once per group, not once per query head;
- when ``B * Hkv`` programs cannot fill the GPU, the keys are split across programs (FlashDecoding),
  each split writes its partial output and log-sum-exp, and a second small kernel merges them by their
  log-sum-exp: no atomics, deterministic. The number of splits follows FlashAttention's wave-efficiency
  heuristic (``num_splits``), chosen on the host from the sequence length and the GPU's SM count;
- decoding is memory-bound (bytes = sum over b of ``len_b * Hkv * D * 2 * element size``), so the tile's
  mask is applied to every key block: the arithmetic is free next to the loads;
- the step's own keys and values can be appended by the decode kernel itself (``settings.current.fused_append``,
  off until a GPU run has checked it; otherwise a small kernel of their own first): every program reads them from
  ``k``/``v``, one program per (batch, key/value head) writes them into the cache, so the append costs no launch
  of its own and no program waits for another.

Which keys a query sees is the rule of ``kernels/masks.py`` with ``Nk = cache_seqlens[b] (+ new keys)``:
bottom-right causal, optional sliding window. Forward only (no autograd). The PyTorch path
(``backend="torch"``, and what ``"auto"`` takes off CUDA) has the same semantics through PyTorch's
fused attention with a per-batch mask.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import configs, eager, settings
from . import flash_attn as fa
from .checks import MAX_GRID_YZ, check_cache_lengths, check_kvcache, check_options
from .flash_attn import _LOG2E, _cast, _tf32
from .interface import choose_path
from .launch import Launcher
from .masks import _visible, visible_mask, window_flags

MAX_SPLITS = 128


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


# The cache length changes every step: not specialized on (Triton would compile a variant for lengths that
# are multiples of 16 and one for the rest, inside a generation: 7 compiles over 1,000 tokens of GPT-2
# before, 4 now, counted with bench/sm90.py's offline driver).
@triton.jit(do_not_specialize=["seqlen"])
def _append_kv(
    K_NEW,
    V_NEW,
    K_CACHE,
    V_CACHE,
    SEQLENS,
    seqlen,
    stride_kz,
    stride_kh,
    stride_kn,
    stride_kk,
    stride_vz,
    stride_vh,
    stride_vn,
    stride_vk,
    stride_kcz,
    stride_kch,
    stride_kcn,
    stride_kck,
    stride_vcz,
    stride_vch,
    stride_vcn,
    stride_vck,
    H_KV,
    N_NEW,
    head_dim,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SEQLENS_TENSOR: tl.constexpr,
):
    """Write the step's keys and values into both caches at [len_b, len_b + N_NEW): one launch for both."""
    off_hk = tl.program_id(1) % H_KV
    off_z = tl.program_id(1) // H_KV
    if SEQLENS_TENSOR:
        seqlen = tl.load(SEQLENS + off_z).to(tl.int32)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < N_NEW)[:, None] & (offs_d < head_dim)[None, :]
    z, h = off_z.to(tl.int64), off_hk.to(tl.int64)
    dst = (seqlen + rows).to(tl.int64)
    k = tl.load(
        K_NEW + z * stride_kz + h * stride_kh + rows[:, None] * stride_kn + offs_d[None, :] * stride_kk, mask=mask
    )
    v = tl.load(
        V_NEW + z * stride_vz + h * stride_vh + rows[:, None] * stride_vn + offs_d[None, :] * stride_vk, mask=mask
    )
    tl.store(
        K_CACHE + z * stride_kcz + h * stride_kch + dst[:, None] * stride_kcn + offs_d[None, :] * stride_kck,
        k,
        mask=mask,
    )
    tl.store(
        V_CACHE + z * stride_vcz + h * stride_vch + dst[:, None] * stride_vcn + offs_d[None, :] * stride_vck,
        v,
        mask=mask,
    )


@triton.jit
def _decode_tile(
    q, k, v, qi, cols, row_valid, hi, diag, left, right, qk_scale, m_i, l_i, acc,
    MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ROUND_TF32: tl.constexpr,
):  # fmt: skip
    """One key/value tile (``cols``: their positions; those from ``hi`` on were not loaded) into the rows' online
    softmax; returns m_i, l_i, acc."""
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    k, v = _tf32(k, ROUND_TF32), _tf32(v, ROUND_TF32)
    qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)  # (BLOCK_M, BLOCK_N)
    seen = _visible(qi[:, None], cols[None, :], hi, diag, left, right, MASK_LEFT, MASK_RIGHT, True)
    qk = tl.where(seen & row_valid[:, None], qk * qk_scale, float("-inf"))
    m_ij = tl.maximum(m_i, tl.max(qk, 1))
    m_sub = tl.where(m_ij == float("-inf"), 0.0, m_ij)  # a row with no key yet: exp2(-inf - 0) = 0
    p = tl.math.exp2(qk - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(_tf32(p.to(v.dtype), ROUND_TF32), v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
    return m_ij, l_i, acc


@triton.jit(do_not_specialize=["seqlen"])
def _decode_fwd(
    Q,
    K,
    V,
    K_NEW,
    V_NEW,
    Out,
    O_PART,
    LSE_PART,
    SEQLENS,
    seqlen,
    qk_scale,
    stride_qz,
    stride_qh,
    stride_qm,
    stride_qk,
    stride_kz,
    stride_kh,
    stride_kn,
    stride_kk,
    stride_vz,
    stride_vh,
    stride_vn,
    stride_vk,
    stride_knz,
    stride_knh,
    stride_knn,
    stride_knk,
    stride_vnz,
    stride_vnh,
    stride_vnn,
    stride_vnk,
    stride_oz,
    stride_oh,
    stride_om,
    stride_ok,
    B,
    H,
    H_KV,
    GROUP,
    N_Q,
    N_NEW,
    keys_per_split,
    left,
    right,
    head_dim,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASK_LEFT: tl.constexpr,
    MASK_RIGHT: tl.constexpr,
    SPLIT: tl.constexpr,
    SEQLENS_TENSOR: tl.constexpr,
    APPEND: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    ROUND_TF32: tl.constexpr,
):
    """One program: split ``program_id(0)`` of the keys, tile ``program_id(1)`` of the packed rows, and
    (batch, key/value head) ``program_id(2)``. Row r of the packed rows is query ``r % N_Q`` of query head
    ``hk * GROUP + r // N_Q``.

    With ``APPEND`` the step's N_NEW keys and values (K_NEW, V_NEW) are positions [seqlen, seqlen + N_NEW): every
    program reads them from K_NEW / V_NEW, never from the cache, and the first program of each (batch, key/value
    head) writes them into the cache. No program reads a cache row another writes in this launch, so the append
    needs no launch of its own and no ordering between programs."""
    split = tl.program_id(0)
    off_hk = tl.program_id(2) % H_KV
    off_z = tl.program_id(2) // H_KV
    if SEQLENS_TENSOR:
        seqlen = tl.load(SEQLENS + off_z).to(tl.int32)
    n_k = seqlen + N_NEW  # keys this batch entry sees: the cache before the step, and the step's own
    diag = n_k - N_Q

    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < GROUP * N_Q
    qi = rows % N_Q  # the query's index among the step's N_Q
    off_h = off_hk * GROUP + rows // N_Q  # (BLOCK_M,) its query head
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < head_dim
    z = off_z.to(tl.int64)
    q_rows = Q + z * stride_qz + off_h.to(tl.int64) * stride_qh + qi.to(tl.int64) * stride_qm  # (BLOCK_M,)
    q = tl.load(q_rows[:, None] + offs_d[None, :] * stride_qk, mask=row_valid[:, None] & mask_d[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    q = _tf32(q, ROUND_TF32)
    k_base = K + z * stride_kz + off_hk.to(tl.int64) * stride_kh
    v_base = V + z * stride_vz + off_hk.to(tl.int64) * stride_vh

    # This split's keys, cut to those some row of the tile can see (a window's left edge).
    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, n_k)
    if MASK_LEFT:
        lo = tl.maximum(lo, tl.maximum(diag - left, 0) // BLOCK_N * BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    # The cached keys of the split; with APPEND, the step's own keys after them, from K_NEW / V_NEW.
    cached_hi = tl.minimum(hi, seqlen) if APPEND else hi
    for start_n in range(lo, cached_hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols < cached_hi)[:, None] & mask_d[None, :]
        k = tl.load(
            k_base + cols[:, None].to(tl.int64) * stride_kn + offs_d[None, :] * stride_kk, mask=kv_mask, other=0.0
        )
        v = tl.load(
            v_base + cols[:, None].to(tl.int64) * stride_vn + offs_d[None, :] * stride_vk, mask=kv_mask, other=0.0
        )
        m_i, l_i, acc = _decode_tile(
            q, k, v, qi, cols, row_valid, cached_hi, diag, left, right, qk_scale, m_i, l_i, acc,
            MASK_LEFT, MASK_RIGHT, INPUT_PRECISION, UPCAST, ROUND_TF32,
        )  # fmt: skip
    if APPEND:
        kn_base = K_NEW + z * stride_knz + off_hk.to(tl.int64) * stride_knh
        vn_base = V_NEW + z * stride_vnz + off_hk.to(tl.int64) * stride_vnh
        for start_n in range(tl.maximum(lo, seqlen), hi, BLOCK_N):
            cols = start_n + offs_n
            new_rows = (cols - seqlen).to(tl.int64)
            kv_mask = (cols < hi)[:, None] & mask_d[None, :]
            k = tl.load(
                kn_base + new_rows[:, None] * stride_knn + offs_d[None, :] * stride_knk, mask=kv_mask, other=0.0
            )
            v = tl.load(
                vn_base + new_rows[:, None] * stride_vnn + offs_d[None, :] * stride_vnk, mask=kv_mask, other=0.0
            )
            m_i, l_i, acc = _decode_tile(
                q, k, v, qi, cols, row_valid, hi, diag, left, right, qk_scale, m_i, l_i, acc,
                MASK_LEFT, MASK_RIGHT, INPUT_PRECISION, UPCAST, ROUND_TF32,
            )  # fmt: skip
        if (split == 0) & (tl.program_id(1) == 0):  # one program per (batch, key/value head) appends
            for start_a in range(0, N_NEW, BLOCK_N):
                app = start_a + offs_n  # the step's rows
                app_mask = (app < N_NEW)[:, None] & mask_d[None, :]
                src = app[:, None].to(tl.int64)
                dst = (seqlen + app)[:, None].to(tl.int64)
                k_app = tl.load(kn_base + src * stride_knn + offs_d[None, :] * stride_knk, mask=app_mask)
                v_app = tl.load(vn_base + src * stride_vnn + offs_d[None, :] * stride_vnk, mask=app_mask)
                tl.store(k_base + dst * stride_kn + offs_d[None, :] * stride_kk, k_app, mask=app_mask)
                tl.store(v_base + dst * stride_vn + offs_d[None, :] * stride_vk, v_app, mask=app_mask)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    out_mask = row_valid[:, None] & mask_d[None, :]
    if SPLIT:
        # Partial results, (split, B, H, N_Q, BLOCK_D) float32 and (split, B, H, N_Q): merged by _decode_combine.
        part = ((split * B + off_z) * H + off_h).to(tl.int64) * N_Q + qi
        tl.store(O_PART + part[:, None] * BLOCK_D + offs_d[None, :], out, mask=out_mask)
        tl.store(LSE_PART + part, tl.where(empty, float("-inf"), m_i + tl.math.log2(l_i)), mask=row_valid)
    else:
        o_rows = Out + z * stride_oz + off_h.to(tl.int64) * stride_oh + qi.to(tl.int64) * stride_om
        tl.store(o_rows[:, None] + offs_d[None, :] * stride_ok, _cast(out, Out.dtype.element_ty, UPCAST), mask=out_mask)


@triton.jit
def _decode_combine(
    Out,
    O_PART,
    LSE_PART,
    stride_oz,
    stride_oh,
    stride_om,
    stride_ok,
    ROWS,
    H,
    N_Q,
    num_splits,
    head_dim,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Merge the splits' partial outputs of BLOCK_R rows of (B, H, N_Q): out = sum_s w_s o_s / sum_s w_s with
    w_s = 2^(lse_s - max lse). Rows that no split saw a key for get zeros."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    valid = rows < ROWS
    offs_d = tl.arange(0, BLOCK_D)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for s in range(0, num_splits):
        m = tl.maximum(m, tl.load(LSE_PART + s * ROWS + rows, mask=valid, other=float("-inf")))
    m_sub = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for s in range(0, num_splits):
        w = tl.math.exp2(tl.load(LSE_PART + s * ROWS + rows, mask=valid, other=float("-inf")) - m_sub)
        o = tl.load(
            O_PART + (s * ROWS + rows.to(tl.int64))[:, None] * BLOCK_D + offs_d[None, :], mask=valid[:, None], other=0.0
        )
        total += w
        acc += w[:, None] * o
    out = acc / tl.where(total == 0.0, 1.0, total)[:, None]
    qi = rows % N_Q
    off_h = (rows // N_Q) % H
    off_z = rows // (N_Q * H)
    ptrs = Out + off_z.to(tl.int64) * stride_oz + off_h.to(tl.int64) * stride_oh + qi.to(tl.int64) * stride_om
    mask = valid[:, None] & (offs_d < head_dim)[None, :]
    tl.store(ptrs[:, None] + offs_d[None, :] * stride_ok, _cast(out, Out.dtype.element_ty, UPCAST), mask=mask)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------

# The JIT's dispatch on a signature's first call, the compiled kernel's own launcher after it
# (kernels/launch.py): a decode step is up to three launches per layer, and host-bound at batch 1.
_append_kv_launcher = Launcher(_append_kv)
_decode_fwd_launcher = Launcher(_decode_fwd)
_decode_combine_launcher = Launcher(_decode_combine)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=4096)  # pure, and called on every decode step with the same few arguments
def num_splits_heuristic(programs: int, num_sms: int, num_blocks: int, max_splits: int = MAX_SPLITS) -> int:
    """FlashAttention's wave efficiency: the fewest splits whose last wave is within 85% of the best
    fill of ``num_sms``; no split when the programs already fill 80% of the GPU."""
    if programs >= 0.8 * num_sms:
        return 1
    max_splits = max(1, min(max_splits, num_sms, num_blocks))
    eligible = lambda s: s == 1 or configs.cdiv(num_blocks, s) != configs.cdiv(num_blocks, s - 1)
    efficiency = {}
    for s in range(1, max_splits + 1):
        if eligible(s):
            waves = programs * s / num_sms
            efficiency[s] = waves / math.ceil(waves)
    best = max(efficiency.values())
    return min(s for s, e in efficiency.items() if e >= 0.85 * best)


# Narrow heads (padded head dim <= 64) carry half the bytes per key: a split holds half as many loads in
# flight, and the heuristic's count left the copy bandwidth idle (H200, run 4: B 8, cache 4096, D 64, four
# splits 2116 GB/s against its two's 1753). There the splits double while the grid holds fewer than two
# programs per SM and every split keeps at least MIN_KEYS_PER_SPLIT keys (below that the merge costs more:
# B 1, cache 4096, 32 splits of 128 keys ran 0.79x the heuristic's 16).
NARROW_HEAD_DIM = 64
MIN_KEYS_PER_SPLIT = 1024


def split_count(programs: int, num_sms: int, num_blocks: int, block_n: int, block_d: int) -> int:
    """How many splits the decode kernel runs when the caller leaves it to us (``num_splits=0``)."""
    splits = num_splits_heuristic(programs, num_sms, num_blocks)
    if splits > 1 and block_d <= NARROW_HEAD_DIM:
        while (
            programs * splits < 2 * num_sms
            and configs.cdiv(num_blocks, 2 * splits) * block_n >= MIN_KEYS_PER_SPLIT
            and 2 * splits <= MAX_SPLITS
        ):
            splits *= 2
    return splits


def flash_attention_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    *,
    cache_seqlens: int | torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    num_splits: int = 0,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of new queries to a KV cache, appending the step's keys and values in place.

    Args:
        q: ``(B, Hq, Nq, D)``, the step's queries (``Nq`` 1 when decoding one token).
        k_cache, v_cache: ``(B, Hkv, T_max, D)``, any strides (the book's ``(b, T, H, d)`` cache viewed with
            ``.transpose(1, 2)`` needs no copy); ``Hq % Hkv == 0``.
        k, v: ``(B, Hkv, N_new, D)`` or None: written into the caches at
            ``[cache_seqlens[b], cache_seqlens[b] + N_new)`` and attended to. The call does not change
            ``cache_seqlens``; the caller advances it.
        cache_seqlens: an int, or an int32/int64 tensor ``(B,)``: each sequence's length before this call.
            Keys attended: the first ``cache_seqlens[b] (+ N_new)``. A tensor is checked against ``T_max`` with
            one device-to-host read, except while a CUDA graph is captured.
        causal: bottom-right causal for the ``Nq`` queries (the newest positions); window_size as in
            ``flash_attention``.
        num_splits: how many programs share one sequence's keys; 0 chooses by FlashAttention's heuristic.
        backend: ``"triton"``, ``"sdpa"`` or ``"torch"`` (both: PyTorch's fused attention with a per-batch mask) or
            ``"auto"``.

    Returns:
        ``(B, Hq, Nq, D)`` in q's dtype and memory layout. Forward only: inputs that require grad under grad
        mode are refused.
    """
    check_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, num_splits, backend)
    window = check_options(causal, softmax_scale, window_size, backend)
    n_new = 0 if k is None else k.shape[2]
    max_len = check_cache_lengths(cache_seqlens, n_new, k_cache.shape[2])
    scale = float(q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale)
    spec = fa.Spec(causal, 0.0, scale, window[0], window[1])
    if q.device.type == "meta":
        return torch.empty_like(q)  # shape inference; a meta cache holds nothing to write
    if choose_path(q, backend) != "triton":  # "sdpa" and "torch" are one path here: PyTorch's fused attention
        if k is not None:
            _append_torch(k_cache, v_cache, k, v, cache_seqlens)
        return q.mul(0.0) if q.numel() == 0 else _decode_torch(q, k_cache, v_cache, cache_seqlens, n_new, max_len, spec)
    B, H_KV = k_cache.shape[:2]
    if B * H_KV > MAX_GRID_YZ:  # the decode grid's z dimension, checked before the append writes anything
        raise ValueError(f"batch {B} x key/value heads {H_KV} must be at most {MAX_GRID_YZ} on the Triton path")
    return launch(q, k_cache, v_cache, k, v, cache_seqlens, max_len, spec, num_splits)


def launch(q, k_cache, v_cache, k, v, cache_seqlens, max_len: int, spec, num_splits: int = 0) -> torch.Tensor:
    """The Triton launchers after the checks: decode (appending k, v in the same launch), merge the splits.
    ``max_len`` bounds the keys any sequence sees (it sizes the splits)."""
    appends = k is not None and k.shape[2] > 0 and k.shape[0] > 0
    fused = settings.current.fused_append
    if appends and (q.numel() == 0 or not fused):  # nothing to attend, or the append on its own
        _append_triton(k_cache, v_cache, k, v, cache_seqlens)
    if q.numel() == 0:
        return q.mul(0.0)
    n_new = 0 if k is None else k.shape[2]
    new = (k, v) if appends and fused else None
    return _decode_triton(q, k_cache, v_cache, new, n_new, cache_seqlens, max_len, spec, num_splits)


def _append_torch(k_cache, v_cache, k, v, cache_seqlens) -> None:
    B, n_new = k.shape[0], k.shape[2]
    if isinstance(cache_seqlens, int):
        k_cache[:, :, cache_seqlens : cache_seqlens + n_new].copy_(k)
        v_cache[:, :, cache_seqlens : cache_seqlens + n_new].copy_(v)
        return
    rows = torch.arange(B, device=k.device)[:, None]  # (B, 1)
    cols = cache_seqlens.long()[:, None] + torch.arange(n_new, device=k.device)  # (B, n_new)
    k_cache[rows, :, cols] = k.transpose(1, 2)  # the indexed view is (B, n_new, Hkv, D)
    v_cache[rows, :, cols] = v.transpose(1, 2)


def _append_triton(k_cache, v_cache, k, v, cache_seqlens) -> None:
    B, H_KV, n_new, D = k.shape
    tensor = isinstance(cache_seqlens, torch.Tensor)
    # Rows of k and v per program: 16 KB of float32 per tensor at most (64 rows of head dim 64; at head dim 256
    # the 64 rows held 64 KB per tensor and spilled 256 B per thread, bench/sm90.py).
    block_n = 16 if fa.INTERPRET else max(16, 4096 // configs.block_d(D))
    _append_kv_launcher(
        (configs.cdiv(n_new, block_n), B * H_KV),
        k, v, k_cache, v_cache, cache_seqlens if tensor else k, 0 if tensor else cache_seqlens,
        *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
        H_KV, n_new, D,
        BLOCK_N=block_n, BLOCK_D=configs.block_d(D), SEQLENS_TENSOR=tensor,
    )  # fmt: skip


class Plan(NamedTuple):
    """How the decode kernel covers one call: the config table's tile, packed query rows per program and
    their tiles, and the key splits."""

    tile: dict
    block_m: int
    row_tiles: int
    num_splits: int
    keys_per_split: int


def plan(B: int, H_KV: int, rows: int, max_len: int, D: int, precision: str, num_splits: int, device_index: int):
    """The launch of ``rows`` packed query rows (group x new queries) per (batch, key/value head) against
    ``max_len`` keys; ``num_splits`` 0 leaves the split count to ``split_count``."""
    tile = configs.select("decode", D, precision, dropout=False, interpret=fa.INTERPRET)
    block_n = tile["BLOCK_N"]
    block_m = min(64, max(16, configs.next_power_of_2(rows)))
    row_tiles = configs.cdiv(rows, block_m)
    num_blocks = max(1, configs.cdiv(max_len, block_n))
    if num_splits == 0:
        sms = 4 if fa.INTERPRET else _num_sms(device_index)
        num_splits = split_count(B * H_KV * row_tiles, sms, num_blocks, block_n, configs.block_d(D))
    num_splits = max(1, min(num_splits, num_blocks, MAX_SPLITS))
    keys_per_split = configs.cdiv(num_blocks, num_splits) * block_n
    num_splits = configs.cdiv(max(max_len, 1), keys_per_split)
    return Plan(tile, block_m, row_tiles, num_splits, keys_per_split)


def _decode_triton(q, k_cache, v_cache, new, n_new: int, cache_seqlens, max_len: int, spec, num_splits: int):
    """``new``: the step's (k, v) to append and attend, or None when the cache holds them already (``n_new``
    of them past ``cache_seqlens``)."""
    B, H, N_Q, D = q.shape
    k_new, v_new = new if new is not None else (q, q)  # never read without APPEND
    H_KV = k_cache.shape[1]
    group = H // H_KV
    flags = fa._flags(q, spec)
    tile, block_m, row_tiles, num_splits, keys_per_split = plan(
        B, H_KV, group * N_Q, max_len, D, fa._precision(q), num_splits, q.device.index or 0
    )
    out = torch.empty_like(q)
    split = num_splits > 1
    block_d = flags["BLOCK_D"]
    if split:
        o_part = torch.empty((num_splits, B, H, N_Q, block_d), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((num_splits, B, H, N_Q), dtype=torch.float32, device=q.device)
    else:
        o_part = lse_part = out  # never read
    tensor = isinstance(cache_seqlens, torch.Tensor)
    _decode_fwd_launcher(
        (num_splits, row_tiles, B * H_KV),
        q, k_cache, v_cache, k_new, v_new, out, o_part, lse_part, cache_seqlens if tensor else q,
        0 if tensor else cache_seqlens, spec.softmax_scale * _LOG2E,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *k_new.stride(), *v_new.stride(), *out.stride(),
        B, H, H_KV, group, N_Q, n_new, keys_per_split, flags["left"], flags["right"], D,
        BLOCK_M=block_m, BLOCK_N=tile["BLOCK_N"], BLOCK_D=block_d, MASK_LEFT=flags["MASK_LEFT"], MASK_RIGHT=flags["MASK_RIGHT"],
        SPLIT=split, SEQLENS_TENSOR=tensor, APPEND=new is not None, INPUT_PRECISION=flags["INPUT_PRECISION"], UPCAST=flags["UPCAST"],
        ROUND_TF32=flags["ROUND_TF32"],
        num_warps=tile["num_warps"], num_stages=tile["num_stages"],
    )  # fmt: skip
    if split:
        block_r = 16
        _decode_combine_launcher(
            (configs.cdiv(B * H * N_Q, block_r),),
            out, o_part, lse_part, *out.stride(), B * H * N_Q, H, N_Q, num_splits, D,
            BLOCK_R=block_r, BLOCK_D=block_d, UPCAST=flags["UPCAST"],
        )  # fmt: skip
    return out


def _decode_torch(q, k_cache, v_cache, cache_seqlens, n_new: int, max_len: int, spec):
    """The same semantics through PyTorch's fused attention: keys past each sequence's length and keys the
    rule hides are masked per batch entry; rows that see no key return zeros. The cache past a sequence's
    length is never read (it may hold anything, NaN included: a mask does not stop 0 * NaN)."""
    if isinstance(cache_seqlens, int):
        return _decode_torch_one_length(q, k_cache, v_cache, cache_seqlens + n_new, spec)
    if cache_seqlens.device.type == "cpu" and q.device.type == "cpu":
        # Lengths readable for free: one sliced call for the batch when they agree, else one per sequence; no
        # (B, T) masks, no copies of the cache.
        lengths = cache_seqlens.tolist()
        if len(set(lengths)) == 1:
            return _decode_torch_one_length(q, k_cache, v_cache, lengths[0] + n_new, spec)
        out = torch.empty_like(q)
        for b, n in enumerate(lengths):
            out[b : b + 1] = _decode_torch_one_length(
                q[b : b + 1], k_cache[b : b + 1], v_cache[b : b + 1], n + n_new, spec
            )
        return out
    B, H, N_Q, D = q.shape
    lengths = cache_seqlens.to(torch.long) + n_new  # (B,)
    mask_left, mask_right, left, right = window_flags(spec.causal, (spec.window_left, spec.window_right))
    pos = torch.arange(N_Q, device=q.device)[None, :, None] + (lengths - N_Q)[:, None, None]  # (B, Nq, 1)
    keys = torch.arange(max_len, device=q.device)[None, None, :]  # (1, 1, T)
    valid = keys < lengths[:, None, None]  # (B, 1, T)
    seen = valid
    if mask_right:
        seen = seen & (keys <= pos + right)
    if mask_left:
        seen = seen & (keys >= pos - left)
    any_key = seen.any(-1, keepdim=True)  # (B, Nq, 1)
    mask = (seen | ~any_key)[:, None]  # (B, 1, Nq, T): a row with no key attends anywhere, then is zeroed
    k = torch.where(valid[:, :, :, None], k_cache[:, :, :max_len], 0.0)  # (B, Hkv, T, D)
    v = torch.where(valid[:, :, :, None], v_cache[:, :, :max_len], 0.0)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=spec.softmax_scale, enable_gqa=H != k_cache.shape[1]
    )
    # Into q's memory layout (SDPA's CUDA kernels return their own), rows without a key zeroed.
    return torch.empty_like(q).copy_(out.masked_fill(~any_key[:, None], 0.0))


def _decode_torch_one_length(q, k_cache, v_cache, n_k: int, spec):
    """``_decode_torch`` when every sequence has the same ``n_k`` keys (an int length, as the layers pass): the
    cache sliced to them (a view: nothing past them is read or copied), one ``(N_Q, n_k)`` mask for the batch,
    and none for a step whose queries see every key (one causal query: the usual decode step, and PyTorch's
    fastest kernel). What the rule shows is worked out from the integers: no host sync, capturable."""
    N_Q = q.shape[2]
    if n_k == 0:
        return torch.zeros_like(q)
    mask_left, mask_right, left, right = window_flags(spec.causal, (spec.window_left, spec.window_right))
    first = n_k - N_Q  # the first query's position; query i sits at first + i
    sees_all = (not mask_right or first + right >= n_k - 1) and (not mask_left or n_k - 1 - left <= 0)
    blind = min(N_Q, max(0, -(first + right))) if mask_right else 0  # leading queries that see no key
    keys, values = k_cache[:, :, :n_k], v_cache[:, :, :n_k]  # (B, Hkv, n_k, D)
    if q.device.type != "cuda" and eager.may_hide_nonfinite(q, keys, spec):
        # A NaN or Inf the fused CPU kernel could turn into zeros: the chapter's arithmetic (Nq x n_k scores).
        return eager.attention_reference(q, keys, values, spec)
    mask = None
    if not sees_all:
        window = (spec.window_left, spec.window_right)
        mask = visible_mask(N_Q, n_k, causal=spec.causal, window=window, device=q.device)  # (N_Q, n_k)
        mask[:blind] = True  # attend anywhere, zeroed below (an all-hidden row would give NaN)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, keys, values, attn_mask=mask, scale=spec.softmax_scale, enable_gqa=q.shape[1] != keys.shape[1]
    )
    result = torch.empty_like(q).copy_(out)  # into q's memory layout
    result[:, :, :blind] = 0.0
    return result
