"""Fused attention in Triton: FlashAttention-2's algorithm, forward and backward, with dropout.

Computes ``dropout(softmax(q @ k^T * softmax_scale + causal_mask)) @ v`` without ever storing the
``(Nq, Nk)`` score matrix: each program owns a tile of query rows, streams key/value tiles through
an online softmax (running row max ``m_i``, running normalizer ``l_i``, unnormalized output ``acc``)
and writes the output plus one float32 log-sum-exp per row. The backward recomputes the attention
probabilities tile by tile from that log-sum-exp, in two launches: the dQ kernel (which also writes
``delta = rowsum(dO * O)`` for its rows) and then the dK/dV kernel (which reads it).

Layout: ``q`` is ``(B, Hq, Nq, D)``, ``k`` and ``v`` are ``(B, Hkv, Nk, D)``, any strides. Query head
``h`` reads key/value head ``h // (Hq // Hkv)`` (grouped-query / multi-query attention).

Causal alignment is bottom-right: query ``i`` sees keys ``j <= i + (Nk - Nq)``, so the ``Nq`` queries
are the newest positions of a sequence of ``Nk`` (a KV cache, chunked prefill). A query row that sees
no key at all (possible when ``Nq > Nk``) returns zeros and gets zero gradients.

Head dims 1..256 are padded inside the kernel to a power of two ``BLOCK_D >= 16`` with load masks;
ragged ``Nq``/``Nk`` are masked too. No host-side padding or copies. The head dim and the sequence
lengths are run-time arguments (Triton specializes them only on divisibility by 16), so a new ``N`` or
``D`` within one ``BLOCK_D`` does not recompile.

Dropout: attention weight ``(b, h, i, j)`` is kept with probability ``1 - dropout_p`` and scaled by
``1 / (1 - dropout_p)``, exactly ``dropout(softmax(s)) @ v``; the normalizer uses the weights before
dropout. The keep bit comes from Philox4x32-7 keyed by a per-call 64-bit seed: one call's four
32-bit outputs, split in 16-bit halves, decide the eight weights rows ``{i, i+8}`` by keys
``{j, j+1, j+8, j+9}`` (``i % 16 < 8``, ``j % 16 < 8``, ``j`` even) with counter
``((j//16)*4 + (j%8)//2, (i//16)*8 + i%8, b*Hq + h, 0)``, so ``p`` acts rounded to a multiple of
``2^-16`` (details in ``_keep_mma_groups``). It depends on the element's position only, never on tile
sizes, so the backward regenerates the forward's mask and nothing of size ``N^2`` is stored. The seed is drawn from PyTorch's default generator of the input's
device on every call, inside the op: reproducible under ``torch.manual_seed``, the same bits eager
and under ``torch.compile``, and a fresh seed on every replay of a captured CUDA graph (PyTorch's
CUDA RNG is graph-safe).

Launch grids: forward and dQ ``(cdiv(Nq, BLOCK_M), Hq, B)``; dK/dV ``(cdiv(Nk, BLOCK_N), Hkv, B)``,
one program summing over the query heads of its group, so no atomics and deterministic gradients.

Exponentials are base 2: ``softmax_scale * log2(e)`` is folded into one multiplier ``qk_scale`` so
the inner loop uses ``exp2`` (one MUFU instruction) instead of ``exp``; the stored log-sum-exp is in
the same base-2 units.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

# The interpreter must be chosen before the @triton.jit functions below are defined.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_LOG2E = 1.4426950408889634
_MAX_GRID_YZ = 65535  # CUDA limit on grid dims y and z (heads, batch)
_MAX_TILE_SPAN = 2**31 // 256  # row and head-dim strides below this keep in-tile offsets in int32
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Which weights one Philox call decides (see _dropout_keep): "mma" (default) or "key-runs", the first
# design, kept so a GPU session can measure one against the other (bench/dropout_cost.py).
_DROPOUT_GROUPING = os.environ.get("CHAPTER3_FLASH_DROPOUT_GROUPS", "mma")
if _DROPOUT_GROUPING not in ("mma", "key-runs"):
    raise ValueError(f"CHAPTER3_FLASH_DROPOUT_GROUPS must be 'mma' or 'key-runs', got {_DROPOUT_GROUPING!r}")
_DROPOUT_GROUPS = tl.constexpr(1 if _DROPOUT_GROUPING == "mma" else 0)
# dK/dV's keys-by-queries bits: up to this padded head dim each lane runs the Philox calls of its own
# keys (twice the Philox work, no exchange between lanes); above it, where registers are scarcer, the
# forward's calls and a layout conversion (bench/sm90.py, see _keep_mma_groups_keys_by_queries).
_DKDV_PER_LANE_MAX_D = tl.constexpr(int(os.environ.get("CHAPTER3_FLASH_DKDV_PER_LANE_MAX_D", "64")))


# ----------------------------------------------------------------------------------------------
# Dropout bits
# ----------------------------------------------------------------------------------------------


@triton.jit
def _dropout_keep(
    seed,
    off_zh,
    row0,
    start_n,
    threshold,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TRANS: tl.constexpr = False,
    PER_LANE: tl.constexpr = False,
):
    """Keep mask for query rows row0 + [0, BLOCK_M) and keys start_n + [0, BLOCK_N): (BLOCK_M, BLOCK_N),
    or (BLOCK_N, BLOCK_M) with TRANS (the dK/dV kernel's keys-by-queries orientation; PER_LANE: computed
    without exchanging bits between lanes, at twice the Philox work). The bits never depend on either.

    One Philox4x32-7 call yields four 32-bit words, split into eight 16-bit numbers that decide eight
    weights, so Philox runs once per eight weights (its ALU work, not the matmuls, is what dropout costs
    on Hopper). The bits of (row, key) depend on the position only: row0 and start_n are multiples of 16.
    """
    if _DROPOUT_GROUPS == 0:
        keep = _keep_key_runs(seed, off_zh, row0, start_n, threshold, BLOCK_M, BLOCK_N)
        if TRANS:
            keep = tl.trans(keep)
    elif TRANS and PER_LANE:
        keep = _keep_mma_groups_keys_by_queries(seed, off_zh, row0, start_n, threshold, BLOCK_M, BLOCK_N)
    else:
        keep = _keep_mma_groups(seed, off_zh, row0, start_n, threshold, BLOCK_M, BLOCK_N, TRANS)
    return keep


@triton.jit
def _philox_words(seed, c0, c1, off_zh):
    """Philox4x32-7 on the counters (c0, c1, b * Hq + h, 0), c0 and c1 broadcast against each other:
    four 32-bit words per position. Seven rounds: the smallest Philox4x32 that passes TestU01's
    BigCrush (Salmon et al., SC'11)."""
    c0, c1 = tl.broadcast(c0.to(tl.uint32), c1.to(tl.uint32))
    c3 = tl.zeros_like(c0)
    return tl.philox(seed, c0, c1, c3 + off_zh.to(tl.uint32), c3, n_rounds=7)


@triton.jit
def _keep_mma_groups(
    seed, off_zh, row0, start_n, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TRANS: tl.constexpr
):
    """The default grouping: one Philox call decides the eight weights one thread holds in a Hopper
    wgmma accumulator, rows {i, i + 8} by keys {j, j + 1, j + 8, j + 9} with i = 16a + (0..7) and
    j = 16b + 2 * (0..3). Counter (c0, c1, c2, c3) = ((j // 16) * 4 + (j % 8) // 2,
    (i // 16) * 8 + i % 8, b * Hq + h, 0); word 2 * (row + 8) + (key + 8), low 16 bits for the even key,
    high 16 bits for the odd one. The mask then lands in the registers that use it: no layout conversion
    through shared memory in the forward and dQ kernels (bench/sm90.py: 14 -> 4 conversions in the
    forward, 15 -> 5 in dQ, against the eight-consecutive-keys grouping).
    """
    tl.static_assert(BLOCK_M % 16 == 0)
    tl.static_assert(BLOCK_N % 16 == 0)
    rows = row0 // 2 + tl.arange(0, BLOCK_M // 2)
    keys = start_n // 4 + tl.arange(0, BLOCK_N // 4)
    r0, r1, r2, r3 = _philox_words(seed, keys[None, :], rows[:, None], off_zh)  # (M/2, N/4)
    # P(bits >= threshold) = 1 - threshold / 2^16 = 1 - dropout_p, p rounded to a multiple of 2^-16.
    k0 = tl.join((r0 & 0xFFFF) >= threshold, (r0 >> 16) >= threshold)
    k1 = tl.join((r1 & 0xFFFF) >= threshold, (r1 >> 16) >= threshold)
    k2 = tl.join((r2 & 0xFFFF) >= threshold, (r2 >> 16) >= threshold)
    k3 = tl.join((r3 & 0xFFFF) >= threshold, (r3 >> 16) >= threshold)
    keep = tl.join(tl.join(k0, k1), tl.join(k2, k3))  # (M/2, N/4, key + 1, key + 8, row + 8)
    keep = tl.reshape(keep, (BLOCK_M // 16, 8, BLOCK_N // 16, 4, 2, 2, 2))
    if TRANS:
        keep = tl.permute(keep, (2, 5, 3, 4, 0, 6, 1))  # (j / 16, +8, (j % 8) / 2, +1, i / 16, +8, i % 8)
        keep = tl.reshape(keep, (BLOCK_N, BLOCK_M))
    else:
        keep = tl.permute(keep, (0, 6, 1, 2, 5, 3, 4))  # (i / 16, +8, i % 8, j / 16, +8, (j % 8) / 2, +1)
        keep = tl.reshape(keep, (BLOCK_M, BLOCK_N))
    return keep


@triton.jit
def _keep_mma_groups_keys_by_queries(
    seed, off_zh, row0, start_n, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    """The same bits as _keep_mma_groups(TRANS=True), (BLOCK_N, BLOCK_M), computed the way the dK/dV
    kernel's accumulator holds them: there a thread holds keys {j, j + 8} of queries {i, i + 8}, but
    key j + 1 sits in another lane. So each key parity runs its own Philox call (twice the Philox work
    of the forward) and keeps its own half of each word: nothing crosses lanes. Static counts at head
    dim 64 (bench/sm90.py, Triton 3.6, dropout 0.1): layout conversions 14 -> 6 (the no-dropout count),
    STS 32 -> 16, LDS 60 -> 36, barriers 25 -> 11, registers 222 -> 205, SASS 2080 -> 2016; at head dim
    128 it spills 56 B instead of 8 B, so there the exchange stays (_DKDV_PER_LANE_MAX_D)."""
    tl.static_assert(BLOCK_M % 16 == 0)
    tl.static_assert(BLOCK_N % 16 == 0)
    kk = tl.arange(0, BLOCK_N // 2)  # keys without their +8 bit: j = start_n + 16 * (kk // 8) + kk % 8
    keys = start_n // 4 + 4 * (kk // 8) + (kk % 8) // 2
    rows = row0 // 2 + tl.arange(0, BLOCK_M // 2)
    r0, r1, r2, r3 = _philox_words(seed, keys[:, None], rows[None, :], off_zh)  # (N/2, M/2)
    shift = ((kk % 2) * 16).to(tl.uint32)[:, None]  # odd keys read the high half
    b0 = ((r0 >> shift) & 0xFFFF) >= threshold
    b1 = ((r1 >> shift) & 0xFFFF) >= threshold
    b2 = ((r2 >> shift) & 0xFFFF) >= threshold
    b3 = ((r3 >> shift) & 0xFFFF) >= threshold
    keep = tl.join(tl.join(b0, b1), tl.join(b2, b3))  # (N/2, M/2, key + 8, row + 8)
    keep = tl.reshape(keep, (BLOCK_N // 16, 8, BLOCK_M // 16, 8, 2, 2))
    keep = tl.permute(keep, (0, 4, 1, 2, 5, 3))  # (j / 16, +8, j % 8, i / 16, +8, i % 8)
    return tl.reshape(keep, (BLOCK_N, BLOCK_M))


@triton.jit
def _keep_key_runs(seed, off_zh, row0, start_n, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The first grouping (kept to measure against): one Philox call decides eight consecutive keys of
    one row, counter (j // 8, i, b * Hq + h, 0); key 8g + e reads word 2 * (e % 2) + (e // 2) % 2, half
    e // 4 (the order of the joins). Every tile pays a layout conversion to spread each run of eight
    over the four threads that hold it."""
    tl.static_assert(BLOCK_N % 8 == 0)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    groups = start_n // 8 + tl.arange(0, BLOCK_N // 8)
    r0, r1, r2, r3 = _philox_words(seed, groups[None, :], offs_m[:, None], off_zh)  # (M, N/8)
    w01 = tl.join(tl.join(r0 & 0xFFFF, r0 >> 16), tl.join(r1 & 0xFFFF, r1 >> 16))  # (M, N/8, 2, 2)
    w23 = tl.join(tl.join(r2 & 0xFFFF, r2 >> 16), tl.join(r3 & 0xFFFF, r3 >> 16))
    bits = tl.reshape(tl.join(w01, w23), (BLOCK_M, BLOCK_N))
    return bits >= threshold


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _attn_fwd_inner(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    stride_kn,
    stride_kk,
    stride_vn,
    stride_vk,
    row0,
    offs_d,
    lo,
    hi,
    qk_scale,
    seed,
    off_zh,
    drop_threshold,
    N_K,
    diag,
    head_dim,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    POS_SCALE: tl.constexpr,
):
    BLOCK_M: tl.constexpr = q.shape[0]
    offs_m = row0 + tl.arange(0, BLOCK_M)  # the tile's query rows
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < head_dim
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        # Row start in int64 (N * stride can pass 2^31), offsets inside the tile in int32.
        kT_ptrs = k_base + start_n.to(tl.int64) * stride_kn + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kk
        v_ptrs = v_base + start_n.to(tl.int64) * stride_vn + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vk
        if MASKED:
            kT = tl.load(kT_ptrs, mask=mask_d[:, None] & (cols[None, :] < N_K), other=0.0)
        else:
            kT = tl.load(kT_ptrs, mask=mask_d[:, None], other=0.0)
        if UPCAST:
            kT = kT.to(tl.float32)
        qk = tl.dot(q, kT, input_precision=INPUT_PRECISION)
        if MASKED:
            # Only the blocks on the causal diagonal or past N_K pay for the mask.
            visible = cols[None, :] < N_K
            if CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None] + diag)
            qk = tl.where(visible, qk * qk_scale, float("-inf"))
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            # A row that has seen no key yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
            m_sub = tl.where(m_ij == float("-inf"), 0.0, m_ij)
        elif POS_SCALE:
            # max(qk) * scale = max(qk * scale) when scale > 0: the scale then folds into one FFMA per
            # weight below (qk * scale - m) instead of a multiply and a subtraction.
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_sub = m_ij
            qk = qk * qk_scale
        else:
            qk = qk * qk_scale
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            m_sub = m_ij
        p = tl.math.exp2(qk - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        # The normalizer sums the weights before dropout: dropout(softmax(s)), not softmax(dropout(s)).
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep = _dropout_keep(seed, off_zh, row0, start_n, drop_threshold, BLOCK_M, BLOCK_N)
            p = tl.where(keep, p, 0.0)
        if MASKED:
            v = tl.load(v_ptrs, mask=mask_d[None, :] & (cols[:, None] < N_K), other=0.0)
        else:
            v = tl.load(v_ptrs, mask=mask_d[None, :], other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def _key_range(row0, N_Q, N_K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Keys a query tile (rows row0 + [0, BLOCK_M)) reads: [0, full_end) in whole blocks every row sees
    and inside N_K (no mask needed), then [full_end, hi): the causal diagonal and the ragged end.

    Query i sees keys j <= i + diag, diag = N_K - N_Q (bottom-right aligned causal diagonal).
    """
    diag = N_K - N_Q
    if CAUSAL:
        hi = tl.minimum(N_K, row0 + BLOCK_M + diag)
        full_end = tl.minimum(row0 + diag + 1, hi)  # the tile's first row sees keys up to row0 + diag
    else:
        hi = N_K
        full_end = N_K
    full_end = tl.maximum(full_end, 0) // BLOCK_N * BLOCK_N
    return diag, full_end, hi


@triton.jit
def _attn_fwd(
    Q,
    K,
    V,
    Out,
    LSE,
    SEED,
    qk_scale,
    inv_keep,
    drop_threshold,
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
    stride_oz,
    stride_oh,
    stride_om,
    stride_ok,
    H,
    GROUP,
    N_Q,
    N_K,
    head_dim,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    POS_SCALE: tl.constexpr,
):
    start_m = tl.program_id(0)
    if CAUSAL:
        # Causal rows near the end see the most keys: launch them first to shorten the tail.
        start_m = tl.num_programs(0) - 1 - start_m
    off_h = tl.program_id(1)
    off_z = tl.program_id(2)
    off_zh = off_z * H + off_h
    off_hk = off_h // GROUP
    first_row = start_m * BLOCK_M
    # Tile bases (batch, head, first row) in int64: N * stride passes 2^31 on long sequences. Offsets
    # inside a tile stay int32: the host checks that 256 rows or head dims of any stride fit in 2^31.
    row0 = first_row.to(tl.int64)
    q_base = Q + off_z.to(tl.int64) * stride_qz + off_h.to(tl.int64) * stride_qh + row0 * stride_qm
    k_base = K + off_z.to(tl.int64) * stride_kz + off_hk.to(tl.int64) * stride_kh
    v_base = V + off_z.to(tl.int64) * stride_vz + off_hk.to(tl.int64) * stride_vh
    o_base = Out + off_z.to(tl.int64) * stride_oz + off_h.to(tl.int64) * stride_oh + row0 * stride_om

    rows = tl.arange(0, BLOCK_M)  # offsets inside the tile; offs_m the absolute query rows
    offs_m = first_row + rows
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = offs_m < N_Q
    mask_d = offs_d < head_dim
    q = tl.load(
        q_base + rows[:, None] * stride_qm + offs_d[None, :] * stride_qk,
        mask=row_mask[:, None] & mask_d[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    diag, full_end, hi = _key_range(first_row, N_Q, N_K, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kk, stride_vn, stride_vk, first_row, offs_d,
        0, full_end, qk_scale, seed, off_zh, drop_threshold, N_K, diag,
        head_dim=head_dim, BLOCK_N=BLOCK_N, MASKED=False, CAUSAL=CAUSAL, DROPOUT=DROPOUT,
        INPUT_PRECISION=INPUT_PRECISION, UPCAST=UPCAST, POS_SCALE=POS_SCALE,
    )  # fmt: skip
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kk, stride_vn, stride_vk, first_row, offs_d,
        full_end, hi, qk_scale, seed, off_zh, drop_threshold, N_K, diag,
        head_dim=head_dim, BLOCK_N=BLOCK_N, MASKED=True, CAUSAL=CAUSAL, DROPOUT=DROPOUT,
        INPUT_PRECISION=INPUT_PRECISION, UPCAST=UPCAST, POS_SCALE=POS_SCALE,
    )  # fmt: skip

    # Rows that saw no key: output 0 and lse = +inf, so the backward's exp2(s - lse) is 0 there.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    if DROPOUT:
        acc = acc * inv_keep
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    tl.store(LSE + off_zh.to(tl.int64) * N_Q + offs_m, lse, mask=row_mask)
    tl.store(
        o_base + rows[:, None] * stride_om + offs_d[None, :] * stride_ok,
        acc.to(Out.dtype.element_ty),
        mask=row_mask[:, None] & mask_d[None, :],
    )


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_dkdv_inner(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    lse_base,
    delta_base,
    stride_qm,
    stride_qk,
    stride_dom,
    stride_dok,
    start_n,
    offs_n,
    offs_d,
    lo,
    hi,
    qk_scale,
    inv_keep,
    seed,
    off_zh,
    drop_threshold,
    N_Q,
    diag,
    head_dim,
    BLOCK_M: tl.constexpr,
    MASKED: tl.constexpr,
    DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Accumulate dK, dV of one key block over query blocks [lo, hi), in the transposed (keys, queries)
    orientation so that dV += P^T dO and dK += dS^T Q need no transposed accumulator.

    Rows past N_Q load q = 0, dO = 0, lse = +inf, delta = 0, so their P and dS are exactly 0 without a
    row mask; keys past N_K produce garbage rows of dK/dV that are never stored.
    """
    BLOCK_N: tl.constexpr = k.shape[0]
    PER_LANE: tl.constexpr = offs_d.shape[0] <= _DKDV_PER_LANE_MAX_D
    mask_d = offs_d < head_dim
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = tl.arange(0, BLOCK_M)
        offs_m = start_m + rows
        row_mask = offs_m < N_Q
        qT = tl.load(
            q_base + start_m.to(tl.int64) * stride_qm + rows[None, :] * stride_qm + offs_d[:, None] * stride_qk,
            mask=mask_d[:, None] & row_mask[None, :],
            other=0.0,
        )  # (D, BLOCK_M)
        lse = tl.load(lse_base + offs_m, mask=row_mask, other=float("inf"))
        if UPCAST:
            qT = qT.to(tl.float32)
        qkT = tl.dot(k, qT, input_precision=INPUT_PRECISION)  # (BLOCK_N, BLOCK_M)
        pT = tl.math.exp2(qkT * qk_scale - lse[None, :])
        if MASKED:
            pT = tl.where(offs_n[:, None] <= offs_m[None, :] + diag, pT, 0.0)
        do = tl.load(
            do_base + start_m.to(tl.int64) * stride_dom + rows[:, None] * stride_dom + offs_d[None, :] * stride_dok,
            mask=row_mask[:, None] & mask_d[None, :],
            other=0.0,
        )  # (BLOCK_M, D)
        if UPCAST:
            do = do.to(tl.float32)
        if DROPOUT:
            keepT = _dropout_keep(
                seed, off_zh, start_m, start_n, drop_threshold, BLOCK_M, BLOCK_N, TRANS=True, PER_LANE=PER_LANE
            )
            pT_drop = tl.where(keepT, pT, 0.0)  # the 1 / (1 - p) goes on dV once, at the end
        else:
            pT_drop = pT
        dv = tl.dot(pT_drop.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
        delta = tl.load(delta_base + offs_m, mask=row_mask, other=0.0)
        dpT = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)  # (BLOCK_N, BLOCK_M)
        if DROPOUT:
            dpT = tl.where(keepT, dpT * inv_keep, 0.0)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=INPUT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q,
    K,
    V,
    DO,
    DK,
    DV,
    LSE,
    DELTA,
    SEED,
    softmax_scale,
    qk_scale,
    inv_keep,
    drop_threshold,
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
    stride_doz,
    stride_doh,
    stride_dom,
    stride_dok,
    stride_dkz,
    stride_dkh,
    stride_dkn,
    stride_dkk,
    stride_dvz,
    stride_dvh,
    stride_dvn,
    stride_dvk,
    H,
    GROUP,
    N_Q,
    N_K,
    head_dim,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    off_hk = tl.program_id(1)
    off_z = tl.program_id(2)
    cols = tl.arange(0, BLOCK_N)  # offsets inside the key tile; offs_n the absolute key rows
    offs_n = start_n + cols
    offs_d = tl.arange(0, BLOCK_D)
    col_mask = offs_n < N_K
    mask_d = offs_d < head_dim
    kv_mask = col_mask[:, None] & mask_d[None, :]
    col0 = tl.program_id(0).to(tl.int64) * BLOCK_N
    k_base = K + off_z.to(tl.int64) * stride_kz + off_hk.to(tl.int64) * stride_kh + col0 * stride_kn
    v_base = V + off_z.to(tl.int64) * stride_vz + off_hk.to(tl.int64) * stride_vh + col0 * stride_vn
    k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kk, mask=kv_mask, other=0.0)
    v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vk, mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED)

    diag = N_K - N_Q
    m_end = tl.cdiv(N_Q, BLOCK_M) * BLOCK_M
    if CAUSAL:
        # Query i sees key j iff i >= j - diag: start at the block holding row start_n - diag ...
        lo = tl.maximum(start_n - diag, 0) // BLOCK_M * BLOCK_M
        # ... and from row start_n + BLOCK_N - 1 - diag on, every key of this block is visible.
        full_start = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag, 0), BLOCK_M) * BLOCK_M
        full_start = tl.minimum(tl.maximum(full_start, lo), m_end)
    else:
        lo = 0
        full_start = 0

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # dK and dV of a shared key/value head sum over the query heads of its group, in this program.
    for g in range(0, GROUP):
        off_h = off_hk * GROUP + g
        off_zh = off_z * H + off_h
        q_base = Q + off_z.to(tl.int64) * stride_qz + off_h.to(tl.int64) * stride_qh
        do_base = DO + off_z.to(tl.int64) * stride_doz + off_h.to(tl.int64) * stride_doh
        lse_base = LSE + off_zh.to(tl.int64) * N_Q
        delta_base = DELTA + off_zh.to(tl.int64) * N_Q
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_qk, stride_dom, stride_dok,
            start_n, offs_n, offs_d, lo, full_start, qk_scale, inv_keep, seed, off_zh, drop_threshold, N_Q, diag,
            head_dim=head_dim, BLOCK_M=BLOCK_M, MASKED=CAUSAL, DROPOUT=DROPOUT,
            INPUT_PRECISION=INPUT_PRECISION, UPCAST=UPCAST,
        )  # fmt: skip
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_qk, stride_dom, stride_dok,
            start_n, offs_n, offs_d, full_start, m_end, qk_scale, inv_keep, seed, off_zh, drop_threshold, N_Q, diag,
            head_dim=head_dim, BLOCK_M=BLOCK_M, MASKED=False, DROPOUT=DROPOUT,
            INPUT_PRECISION=INPUT_PRECISION, UPCAST=UPCAST,
        )  # fmt: skip

    # dS was taken w.r.t. the scaled scores s = softmax_scale * q.k, hence one more factor here.
    dk = dk * softmax_scale
    if DROPOUT:
        dv = dv * inv_keep
    dk_base = DK + off_z.to(tl.int64) * stride_dkz + off_hk.to(tl.int64) * stride_dkh + col0 * stride_dkn
    dv_base = DV + off_z.to(tl.int64) * stride_dvz + off_hk.to(tl.int64) * stride_dvh + col0 * stride_dvn
    tl.store(
        dk_base + cols[:, None] * stride_dkn + offs_d[None, :] * stride_dkk, dk.to(DK.dtype.element_ty), mask=kv_mask
    )
    tl.store(
        dv_base + cols[:, None] * stride_dvn + offs_d[None, :] * stride_dvk, dv.to(DV.dtype.element_ty), mask=kv_mask
    )


@triton.jit
def _attn_bwd_dq_inner(
    dq,
    q,
    do,
    lse,
    delta,
    k_base,
    v_base,
    stride_kn,
    stride_kk,
    stride_vn,
    stride_vk,
    row0,
    offs_d,
    lo,
    hi,
    qk_scale,
    inv_keep,
    seed,
    off_zh,
    drop_threshold,
    N_K,
    diag,
    head_dim,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    BLOCK_M: tl.constexpr = q.shape[0]
    offs_m = row0 + tl.arange(0, BLOCK_M)  # the tile's query rows
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < head_dim
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        if MASKED:
            kv_mask = mask_d[:, None] & (cols[None, :] < N_K)
        else:
            kv_mask = mask_d[:, None]
        kT_ptrs = k_base + start_n.to(tl.int64) * stride_kn + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kk
        vT_ptrs = v_base + start_n.to(tl.int64) * stride_vn + offs_n[None, :] * stride_vn + offs_d[:, None] * stride_vk
        kT = tl.load(kT_ptrs, mask=kv_mask, other=0.0)
        vT = tl.load(vT_ptrs, mask=kv_mask, other=0.0)
        if UPCAST:
            kT = kT.to(tl.float32)
            vT = vT.to(tl.float32)
        qk = tl.dot(q, kT, input_precision=INPUT_PRECISION)
        p = tl.math.exp2(qk * qk_scale - lse[:, None])
        if MASKED:
            visible = cols[None, :] < N_K
            if CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None] + diag)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, vT, input_precision=INPUT_PRECISION)
        if DROPOUT:
            keep = _dropout_keep(seed, off_zh, row0, start_n, drop_threshold, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp * inv_keep, 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=INPUT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq(
    Q,
    K,
    V,
    Out,
    DO,
    DQ,
    LSE,
    DELTA,
    SEED,
    softmax_scale,
    qk_scale,
    inv_keep,
    drop_threshold,
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
    stride_oz,
    stride_oh,
    stride_om,
    stride_ok,
    stride_doz,
    stride_doh,
    stride_dom,
    stride_dok,
    stride_dqz,
    stride_dqh,
    stride_dqm,
    stride_dqk,
    H,
    GROUP,
    N_Q,
    N_K,
    head_dim,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    start_m = tl.program_id(0)
    if CAUSAL:
        start_m = tl.num_programs(0) - 1 - start_m
    off_h = tl.program_id(1)
    off_z = tl.program_id(2)
    off_zh = off_z * H + off_h
    off_hk = off_h // GROUP
    first_row = start_m * BLOCK_M
    rows = tl.arange(0, BLOCK_M)  # offsets inside the query tile; offs_m the absolute query rows
    offs_m = first_row + rows
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = offs_m < N_Q
    qo_mask = row_mask[:, None] & (offs_d[None, :] < head_dim)
    row0 = first_row.to(tl.int64)
    q_base = Q + off_z.to(tl.int64) * stride_qz + off_h.to(tl.int64) * stride_qh + row0 * stride_qm
    do_base = DO + off_z.to(tl.int64) * stride_doz + off_h.to(tl.int64) * stride_doh + row0 * stride_dom
    k_base = K + off_z.to(tl.int64) * stride_kz + off_hk.to(tl.int64) * stride_kh
    v_base = V + off_z.to(tl.int64) * stride_vz + off_hk.to(tl.int64) * stride_vh
    q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :] * stride_qk, mask=qo_mask, other=0.0)
    do = tl.load(do_base + rows[:, None] * stride_dom + offs_d[None, :] * stride_dok, mask=qo_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + off_zh.to(tl.int64) * N_Q + offs_m, mask=row_mask, other=float("inf"))
    # delta_i = rowsum(dO_i * O_i) = rowsum(P_i * dP_i), the softmax backward's correction term (O already
    # carries dropout's kept, rescaled weights). Computed here, where dO is loaded anyway, and stored for
    # the dK/dV kernel launched after this one: no separate launch for it.
    o_base = Out + off_z.to(tl.int64) * stride_oz + off_h.to(tl.int64) * stride_oh + row0 * stride_om
    o = tl.load(o_base + rows[:, None] * stride_om + offs_d[None, :] * stride_ok, mask=qo_mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + off_zh.to(tl.int64) * N_Q + offs_m, delta, mask=row_mask)
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED)

    # The same key range as the forward: unmasked full blocks, then the diagonal / ragged tail.
    diag, full_end, hi = _key_range(first_row, N_Q, N_K, BLOCK_M, BLOCK_N, CAUSAL)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kk, stride_vn, stride_vk, first_row, offs_d,
        0, full_end, qk_scale, inv_keep, seed, off_zh, drop_threshold, N_K, diag,
        head_dim=head_dim, BLOCK_N=BLOCK_N, MASKED=False, CAUSAL=CAUSAL, DROPOUT=DROPOUT,
        INPUT_PRECISION=INPUT_PRECISION, UPCAST=UPCAST,
    )  # fmt: skip
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kk, stride_vn, stride_vk, first_row, offs_d,
        full_end, hi, qk_scale, inv_keep, seed, off_zh, drop_threshold, N_K, diag,
        head_dim=head_dim, BLOCK_N=BLOCK_N, MASKED=True, CAUSAL=CAUSAL, DROPOUT=DROPOUT,
        INPUT_PRECISION=INPUT_PRECISION, UPCAST=UPCAST,
    )  # fmt: skip
    dq = dq * softmax_scale
    dq_base = DQ + off_z.to(tl.int64) * stride_dqz + off_h.to(tl.int64) * stride_dqh + row0 * stride_dqm
    tl.store(
        dq_base + rows[:, None] * stride_dqm + offs_d[None, :] * stride_dqk, dq.to(DQ.dtype.element_ty), mask=qo_mask
    )


# ----------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------


def _block_d(head_dim: int) -> int:
    # tl.dot needs every dimension >= 16; smaller head dims are zero-padded by the load masks.
    return max(16, triton.next_power_of_2(head_dim))


def _configs(
    block_d: int, dtype: torch.dtype, dropout: bool, *, ieee: bool = False, aligned: bool = True
) -> dict[str, dict[str, int]]:
    """Tile sizes, warps and pipeline depth per kernel, by padded head dim and element size.

    Fixed per (head dim, dtype) rather than autotuned per sequence length, so a new N never
    recompiles or re-benchmarks. Under the interpreter: small tiles with BLOCK_M != BLOCK_N, so even
    small test inputs cross several blocks and an off-centre causal diagonal. With dropout the
    mask's Philox words need registers: 8 warps share each tile (4 warps spilled on an H200, run 1);
    so do head dims that are not a multiple of 16 (element-wise loads: 632 B of spills per thread in
    the forward at head dim 40 with 4 warps, none with 8; bench/sm90.py). ``ieee``: float32 with exact
    products (TF32 not allowed), whose FMA dots hold whole operand strips in registers: tiles of their
    own, chosen so that no kernel spills (bench/sm90.py, Triton 3.6).
    """
    if ieee and not _INTERPRET:
        return _ieee_configs(block_d)
    cfgs = _base_configs(block_d, dtype)
    if (dropout or not aligned) and not _INTERPRET:
        for cfg in cfgs.values():
            cfg["num_warps"] = 8
    return cfgs


def _ieee_configs(block_d: int) -> dict[str, dict[str, int]]:
    # Registers per thread, no spills, on sm_90 with Triton 3.6 (bench/sm90.py): where the TF32 configs
    # spilled 992 B (forward), 104 B (dQ) and 792 B (dK/dV) at head dim 64, and 696 / 504 / 1200 B at 128.
    if block_d <= 64:  # 94, 120, 104 registers
        return {
            "fwd": dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2),
            "dkdv": dict(BLOCK_M=16, BLOCK_N=64, num_warps=8, num_stages=2),
            "dq": dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2),
        }
    if block_d <= 128:  # 79, 168, 128 registers (dQ with 4 warps spilled 768 B with dropout)
        return {
            "fwd": dict(BLOCK_M=32, BLOCK_N=16, num_warps=8, num_stages=2),
            "dkdv": dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2),
            "dq": dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=2),
        }
    return {  # 217, 255, 168 registers (dQ spills 8 B)
        "fwd": dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=2),
        "dkdv": dict(BLOCK_M=16, BLOCK_N=32, num_warps=8, num_stages=1),
        "dq": dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2),
    }


def _base_configs(block_d: int, dtype: torch.dtype) -> dict[str, dict[str, int]]:
    if _INTERPRET:
        return {
            "fwd": dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1),
            "dkdv": dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1),
            "dq": dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1),
        }
    wide = dtype == torch.float32  # 4-byte tiles: half the tile area fits in shared memory
    if block_d <= 64:
        return {
            # Forward 128x64 with 8 warps: 1.08x forward, 1.02x forward+backward over 4 warps (H200, run 2).
            "fwd": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
            if not wide
            else dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=3),
            "dkdv": dict(BLOCK_M=32, BLOCK_N=128 if not wide else 64, num_warps=4, num_stages=3),
            # dQ 128x64 with 8 warps: 1.06x forward+backward over 128x32 with 4 (H200, bench/tune.py, run 2).
            "dq": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
            if not wide
            else dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3),
        }
    if block_d <= 128:
        return {
            "fwd": dict(BLOCK_M=128 if not wide else 64, BLOCK_N=64 if not wide else 32, num_warps=8, num_stages=3),
            # Measured at D 128 (H200, run 2): dK/dV 64x128 in 3 stages 1.09x, dQ 128x64 in 3 stages 1.21x.
            "dkdv": dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=3)
            if not wide
            else dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2),
            "dq": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
            if not wide
            else dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2),
        }
    # Head dim 256: two pipeline stages keep the backward's operands in shared memory instead of
    # registers; spills per thread on sm_90 (Triton 3.6, bench/sm90.py) go from 640 B to 24 B in dK/dV
    # and from 328 B (half) / 424 B (float32) to none in dQ.
    return {
        "fwd": dict(BLOCK_M=64 if not wide else 32, BLOCK_N=32, num_warps=8, num_stages=2),
        "dkdv": dict(BLOCK_M=16, BLOCK_N=64, num_warps=8, num_stages=2)
        if not wide
        else dict(BLOCK_M=16, BLOCK_N=32, num_warps=8, num_stages=1),
        "dq": dict(BLOCK_M=64 if not wide else 32, BLOCK_N=32, num_warps=8, num_stages=2),
    }


def _input_precision(dtype: torch.dtype) -> str:
    # float32 follows PyTorch's own matmul setting, so a drop-in layer is as exact as the eager one.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _drop_threshold(dropout_p: float) -> int:
    # The kernel keeps a weight when its 16-bit random number is >= this: p is rounded to the nearest
    # multiple of 2^-16 (< 7.7e-6 off), never up to 1 unless it is 1 (then nothing is kept, as nn.Dropout).
    return 2**16 if dropout_p == 1.0 else min(round(dropout_p * 2**16), 2**16 - 1)


def _inv_keep(dropout_p: float) -> float:
    # The kept weights' scale; p = 1 keeps nothing, and 0 (not inf) keeps 0 * scale from turning into NaN.
    return 0.0 if dropout_p == 1.0 else 1.0 / (1.0 - dropout_p)


def _kernel_flags(q: torch.Tensor, causal: bool, dropout_p: float) -> dict:
    return dict(
        head_dim=q.shape[-1],
        BLOCK_D=_block_d(q.shape[-1]),
        CAUSAL=causal,
        DROPOUT=dropout_p > 0.0,
        INPUT_PRECISION=_input_precision(q.dtype),
        # The interpreter's tl.dot on bfloat16 operands is wrong; do those dots in float32 there.
        UPCAST=_INTERPRET and q.dtype == torch.bfloat16,
    )


def _kernel_configs(q: torch.Tensor, flags: dict) -> dict[str, dict[str, int]]:
    ieee = flags["INPUT_PRECISION"] == "ieee"
    return _configs(flags["BLOCK_D"], q.dtype, flags["DROPOUT"], ieee=ieee, aligned=q.shape[-1] % 16 == 0)


def _new_seed(q: torch.Tensor, dropout_p: float) -> torch.Tensor:
    if dropout_p == 0.0:
        return torch.empty(1, dtype=torch.int64, device=q.device)  # never read: no fill kernel
    # Drawn on the input's device from its default generator: advances it, honours manual_seed,
    # and stays on the device (no host sync, capturable in a CUDA graph).
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=q.device)


def _fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, dropout_p: float, softmax_scale: float):
    B, H, N_Q, D = q.shape
    N_K = k.shape[2]
    # Same memory layout as q: for a (B, N, H, D) projection viewed as (B, H, N, D) the output's
    # transpose back to (B, N, H*D) is then free.
    o = torch.empty_like(q)
    lse = torch.empty((B, H, N_Q), dtype=torch.float32, device=q.device)
    seed = _new_seed(q, dropout_p)
    flags = _kernel_flags(q, causal, dropout_p)
    cfg = _kernel_configs(q, flags)["fwd"]
    grid = (triton.cdiv(N_Q, cfg["BLOCK_M"]), H, B)
    _attn_fwd[grid](
        q, k, v, o, lse, seed,
        softmax_scale * _LOG2E, _inv_keep(dropout_p), _drop_threshold(dropout_p),
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        H, H // k.shape[1], N_Q, N_K,
        **flags, **cfg, POS_SCALE=softmax_scale > 0,
    )  # fmt: skip
    return o, lse, seed


def _in_tile_offsets_fit(t: torch.Tensor) -> bool:
    return t.stride(2) < _MAX_TILE_SPAN and t.stride(3) < _MAX_TILE_SPAN


def _bwd(do, q, k, v, o, lse, seed, causal: bool, dropout_p: float, softmax_scale: float):
    B, H, N_Q, D = q.shape
    H_KV, N_K = k.shape[1], k.shape[2]
    flags = _kernel_flags(q, causal, dropout_p)
    cfgs = _kernel_configs(q, flags)

    if not _in_tile_offsets_fit(do):
        do = do.contiguous()  # a gradient with absurd strides: a copy beats wrong addresses
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    delta = torch.empty_like(lse)
    common = (softmax_scale, softmax_scale * _LOG2E, _inv_keep(dropout_p), _drop_threshold(dropout_p))
    # dQ first: it also writes delta = rowsum(dO * O), which the dK/dV kernel reads.
    cfg = cfgs["dq"]
    _attn_bwd_dq[(triton.cdiv(N_Q, cfg["BLOCK_M"]), H, B)](
        q, k, v, o, do, dq, lse, delta, seed, *common,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *do.stride(), *dq.stride(),
        H, H // H_KV, N_Q, N_K,
        **flags, **cfg,
    )  # fmt: skip
    cfg = cfgs["dkdv"]
    _attn_bwd_dkdv[(triton.cdiv(N_K, cfg["BLOCK_N"]), H_KV, B)](
        q, k, v, do, dk, dv, lse, delta, seed, *common,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        H, H // H_KV, N_Q, N_K,
        **flags, **cfg,
    )  # fmt: skip
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Autograd: a plain autograd.Function in eager mode (least host overhead), the same launchers as
# custom ops under torch.compile (opaque to the compiler: no graph break)
# ----------------------------------------------------------------------------------------------


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal: bool, dropout_p: float, softmax_scale: float):
        o, lse, seed = _fwd(q, k, v, causal, dropout_p, softmax_scale)
        ctx.save_for_backward(q, k, v, o, lse, seed)
        ctx.causal, ctx.dropout_p, ctx.softmax_scale = causal, dropout_p, softmax_scale
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable  # the backward kernels have no backward: say so, loudly
    def backward(ctx, do):
        q, k, v, o, lse, seed = ctx.saved_tensors
        dq, dk, dv = _bwd(do, q, k, v, o, lse, seed, ctx.causal, ctx.dropout_p, ctx.softmax_scale)
        return dq, dk, dv, None, None, None


@torch.library.custom_op("chapter3_flash::attn_fwd", mutates_args=())
def _attn_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, dropout_p: float, softmax_scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fwd(q, k, v, causal, dropout_p, softmax_scale)


@_attn_fwd_op.register_fake
def _(q, k, v, causal, dropout_p, softmax_scale):
    B, H, N_Q, _ = q.shape
    return (
        torch.empty_like(q),
        q.new_empty((B, H, N_Q), dtype=torch.float32),
        q.new_empty((1,), dtype=torch.int64),
    )


@torch.library.custom_op("chapter3_flash::attn_bwd", mutates_args=())
def _attn_bwd_op(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    seed: torch.Tensor,
    causal: bool,
    dropout_p: float,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd(do, q, k, v, o, lse, seed, causal, dropout_p, softmax_scale)


@_attn_bwd_op.register_fake
def _(do, q, k, v, o, lse, seed, causal, dropout_p, softmax_scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, dropout_p, softmax_scale = inputs
    o, lse, seed = output
    ctx.save_for_backward(q, k, v, o, lse, seed)
    ctx.causal, ctx.dropout_p, ctx.softmax_scale = causal, dropout_p, softmax_scale
    ctx.mark_non_differentiable(lse, seed)


def _backward(ctx, do, _dlse, _dseed):
    q, k, v, o, lse, seed = ctx.saved_tensors
    dq, dk, dv = _attn_bwd_op(do, q, k, v, o, lse, seed, ctx.causal, ctx.dropout_p, ctx.softmax_scale)
    return dq, dk, dv, None, None, None


_attn_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _attention_triton(q, k, v, causal: bool, dropout_p: float, softmax_scale: float) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return _attn_fwd_op(q, k, v, causal, dropout_p, softmax_scale)[0]
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _FlashAttention.apply(q, k, v, causal, dropout_p, softmax_scale)
    return _fwd(q, k, v, causal, dropout_p, softmax_scale)[0]


# ----------------------------------------------------------------------------------------------
# The PyTorch path: same semantics, for CPU tensors without Triton's interpreter
# ----------------------------------------------------------------------------------------------


def _attention_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, dropout_p: float, softmax_scale: float
) -> torch.Tensor:
    """Readable eager attention with the kernel's semantics. Materializes (B, Hq, Nq, Nk)."""
    B, H, N_Q, D = q.shape
    H_KV, N_K = k.shape[1], k.shape[2]
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    if H_KV != H:
        k = k.repeat_interleave(H // H_KV, dim=1)  # (B, Hq, Nk, D)
        v = v.repeat_interleave(H // H_KV, dim=1)  # (B, Hq, Nk, D)
    scores = torch.matmul(q.to(compute), k.to(compute).transpose(-2, -1)) * softmax_scale  # (B, Hq, Nq, Nk)
    if causal:
        rows = torch.arange(N_Q, device=q.device)[:, None]
        cols = torch.arange(N_K, device=q.device)[None, :]
        scores = scores.masked_fill(cols > rows + (N_K - N_Q), float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    # Rows that see no key: softmax gives NaN; the kernel's answer is zeros.
    weights = torch.nan_to_num(weights, nan=0.0)
    if dropout_p > 0.0:
        weights = torch.nn.functional.dropout(weights, p=dropout_p, training=True)
    return torch.matmul(weights, v.to(compute)).to(q.dtype)  # (B, Hq, Nq, D)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------


def _check_inputs(q, k, v, causal, dropout_p, softmax_scale, backend) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must have rank 4 (B, H, N, D), got shape {tuple(t.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    B, Hq, Nq, D = q.shape
    Bk, Hkv, Nk, Dk = k.shape
    if B != Bk:
        raise ValueError(f"batch {B} of q does not match batch {Bk} of k and v")
    if D != Dk:
        raise ValueError(f"head_dim {D} of q does not match {Dk} of k")
    if D == 0:
        raise ValueError(f"head_dim must be at least 1, got shapes q {tuple(q.shape)}, k {tuple(k.shape)}")
    if Hq % Hkv != 0:
        raise ValueError(f"query heads {Hq} must be a multiple of key/value heads {Hkv}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float, got {dropout_p!r}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    if softmax_scale is not None:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
            raise TypeError(f"softmax_scale must be a float or None, got {softmax_scale!r}")
        if not math.isfinite(softmax_scale):
            raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")


def _use_triton(q: torch.Tensor, backend: str) -> bool:
    if backend == "torch":
        return False
    runnable = q.is_cuda or (_INTERPRET and q.device.type == "cpu")
    if backend == "triton":
        if not runnable:
            raise ValueError(
                f"backend='triton' needs a CUDA tensor, or TRITON_INTERPRET=1 set before importing kernels "
                f"for a CPU tensor; got a tensor on {q.device}"
            )
        return True
    return runnable


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention ``dropout(softmax(q k^T * softmax_scale [+ causal mask])) v`` without the N x N matrix.

    Args:
        q: ``(B, Hq, Nq, D)``; k, v: ``(B, Hkv, Nk, D)`` with ``Hq % Hkv == 0``; any strides;
            float16, bfloat16 or float32 (one dtype for all three); D from 1 to 256 on the Triton path.
        causal: mask keys after the query, aligned bottom-right: query ``i`` sees keys
            ``j <= i + (Nk - Nq)``. Query rows that see no key return zeros.
        dropout_p: probability of dropping an attention weight (kept ones scale by ``1/(1-p)``), in
            [0, 1] like ``nn.Dropout`` (1 drops every weight: zeros out). Pass ``0.0`` for evaluation; the
            layers do this for you in ``eval()`` mode.
        softmax_scale: defaults to ``D ** -0.5``.
        backend: ``"triton"`` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``), ``"torch"``
            (eager PyTorch, any device) or ``"auto"`` (Triton where it can run, else PyTorch).

    Returns:
        ``(B, Hq, Nq, D)`` in q's dtype (and, on the Triton path, q's memory layout).
    """
    if isinstance(q, torch.Tensor) and torch.is_autocast_enabled(q.device.type):
        # Like scaled_dot_product_attention, attention runs in autocast's lower precision.
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = (t.to(dtype) if isinstance(t, torch.Tensor) else t for t in (q, k, v))
    _check_inputs(q, k, v, causal, dropout_p, softmax_scale, backend)
    dropout_p = float(dropout_p)
    softmax_scale = float(q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale)
    if not _use_triton(q, backend):
        return _attention_torch(q, k, v, causal, dropout_p, softmax_scale)
    if q.numel() == 0 or k.shape[2] == 0:
        # No query or no key: an empty output, or rows that see no key (zeros), as the eager path gives.
        return q.mul(0.0)
    if q.shape[-1] > 256:
        raise ValueError(f"head_dim {q.shape[-1]} is not supported by the Triton kernel (1 to 256)")
    if q.shape[0] > _MAX_GRID_YZ or q.shape[1] > _MAX_GRID_YZ:
        raise ValueError(f"batch {q.shape[0]} and heads {q.shape[1]} must each be at most {_MAX_GRID_YZ}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not _in_tile_offsets_fit(t):
            raise ValueError(
                f"{name} has strides {t.stride()}: the Triton kernel needs sequence and head-dim strides below "
                f"{_MAX_TILE_SPAN} elements; pass {name}.contiguous()"
            )
    return _attention_triton(q, k, v, causal, dropout_p, softmax_scale)
