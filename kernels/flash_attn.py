"""Fused attention in Triton: FlashAttention-2's algorithm, forward and backward, with dropout.

Computes ``dropout(softmax(q @ k^T * softmax_scale + mask)) @ v`` without ever storing the ``(Nq, Nk)``
score matrix: each program owns a tile of query rows, streams key/value tiles through an online
softmax (running row max ``m_i``, running normalizer ``l_i``, unnormalized output ``acc``) and writes
the output plus one float32 log-sum-exp per row. The backward recomputes the attention probabilities
tile by tile from that log-sum-exp, in one of two ways (``configs.one_pass_backward`` chooses, by what
an H100 measured):

- **two kernels** (the default): the dQ kernel (one program per query tile, which also writes
  ``delta = rowsum(dO * O)``) then the dK/dV kernel; no atomics, bit-reproducible, seven matmuls per tile.
- **one pass** (FlashAttention-2's design; chosen with dropout on short sequences): a small kernel writes
  ``delta`` and zeroes a float32 dQ buffer; then one program per key/value tile walks the query tiles that
  see it, accumulates dK and dV in registers and adds its share of dQ with float32 atomics: five matmuls
  per tile, the dropout bits made once per tile. The order of the atomic adds varies from run to run, so
  dQ's last bits do too: ``deterministic=True`` (or ``torch.use_deterministic_algorithms(True)``) rules it out.

Layout: ``q`` is ``(B, Hq, Nq, D)``, ``k`` and ``v`` are ``(B, Hkv, Nk, D)``, any strides. Query head
``h`` reads key/value head ``h // (Hq // Hkv)`` (grouped-query / multi-query attention); dK/dV programs
sum over the query heads of their group.

Which keys a query sees (causal, sliding window, ``Nq != Nk``): ``kernels/masks.py``, the rule's one
home. Tiles wholly outside a query tile's keys are never visited (a window costs ``N * W``, not
``N^2``), whole tiles inside need no mask, and only the edge tiles pay for it. A query row that sees no
key returns zeros and gets zero gradients. Dropout's bits: ``kernels/dropout.py``. Tiles and warps:
``kernels/configs.py``.

Head dims 1..256 are padded inside the kernel to a power of two ``BLOCK_D >= 16`` with load masks;
ragged ``Nq``/``Nk`` are masked too. No host-side padding or copies. The head dim, the sequence lengths
and the window are run-time arguments (Triton specializes them only on divisibility by 16), so a new
``N``, ``D`` within one ``BLOCK_D`` or window size does not recompile.

Launch grids: forward and dQ ``(cdiv(Nq, BLOCK_M), Hq, B)``, causal query tiles longest first; dK/dV
and the one-pass backward ``(cdiv(Nk, BLOCK_N), Hkv, B)``, whose first key tiles are the longest.

Exponentials are base 2: ``softmax_scale * log2(e)`` is folded into one multiplier ``qk_scale`` so the
inner loop uses ``exp2`` (one MUFU instruction) instead of ``exp``; the stored log-sum-exp is in the
same base-2 units.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import configs
from .dropout import _dropout_keep, keep_scale, keep_threshold, new_seed
from .launch import Launcher
from .masks import _key_range, _query_range, _visible, window_flags

# The interpreter must be chosen before the @triton.jit functions below are defined.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_HEAD_DIM = 256
MAX_TILE_SPAN = 2**31 // 256  # row and head-dim strides below this keep in-tile offsets in int32
_LOG2E = 1.4426950408889634


class Spec(NamedTuple):
    """What a call computes besides its tensors; travels unchanged from the public function to the
    kernels and into the backward. A new argument is added here, in the two custom ops' signatures,
    and where the launchers read it."""

    causal: bool
    dropout_p: float
    softmax_scale: float
    window_left: int = -1  # -1: unbounded
    window_right: int = -1
    deterministic: bool = False
    softcap: float = 0.0  # 0: no cap; else scores = softcap * tanh(scores / softcap) (Gemma 2)


@triton.jit
def _cast(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """x.to(dtype) for a store. Under the interpreter with bfloat16 (UPCAST) the cast is done by hand: the
    interpreter truncates float32 to bfloat16, the GPU rounds to nearest even, and tests must see the
    GPU's rounding (truncation biases every stored value by -2^-9 on average)."""
    if UPCAST:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


@triton.jit
def _tf32(x, ROUND_TF32: tl.constexpr):
    """A float32 matmul operand rounded to TF32's 10-bit mantissa, to nearest (ties away), as cuBLAS rounds
    its operands. Unrounded, the tensor cores drop the low 13 bits: a one-sided truncation, 3.5-4x the error
    of cuBLAS-TF32 attention (H200, run 4). Applied here to what a program makes in registers (P and dS; its
    own q, dO, k, v tile); the inputs themselves are rounded once before the launch (``round_tf32``), since
    rounding the tiles streamed through shared memory in the kernels spilled at head dim 128 (bench/NOTES.md).
    Float32 is sign and magnitude, so adding half of the dropped unit to the bits rounds both signs. A NaN
    stays itself: the GPU's NaN from arithmetic is 0x7FFFFFFF, whose rounded bits would carry into the sign
    and read -0.0 (a NaN in P or dS silently zero)."""
    if ROUND_TF32:
        bits = x.to(tl.int32, bitcast=True)
        rounded = ((bits + 0x1000) & -8192).to(tl.float32, bitcast=True)  # -8192 = ~0x1FFF: the low 13 bits
        x = tl.where(x != x, x, rounded)
    return x


@triton.jit
def _round_tf32_kernel(
    X, Y, stride_xz, stride_xh, stride_xm, stride_xk, H, N, head_dim, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr
):
    """Y (contiguous (B, H, N, D)) = X (any strides) with every element rounded by ``_tf32``."""
    off_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # rows x strides may pass 2^31
    off_h = tl.program_id(1)
    off_z = tl.program_id(2)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (off_m[:, None] < N) & (offs_d[None, :] < head_dim)
    x_base = X + off_z.to(tl.int64) * stride_xz + off_h.to(tl.int64) * stride_xh
    x = tl.load(x_base + off_m[:, None] * stride_xm + offs_d[None, :] * stride_xk, mask=mask)
    y_base = Y + (off_z.to(tl.int64) * H + off_h) * N * head_dim
    tl.store(y_base + off_m[:, None] * head_dim + offs_d[None, :], _tf32(x, True), mask=mask)


def round_tf32(t: torch.Tensor) -> torch.Tensor:
    """A float32 (B, H, N, D) tensor's values rounded to TF32 as cuBLAS rounds matmul operands (a contiguous
    copy, one read and one write): the TF32 kernels' inputs, so that the tiles they stream through shared
    memory, which the tensor cores would truncate, hold TF32 values already (GPU, TF32 allowed)."""
    B, H, N, D = t.shape
    out = torch.empty((B, H, N, D), dtype=t.dtype, device=t.device)
    if out.numel():
        block_m = max(1, 4096 // configs.block_d(D))
        _round_tf32_launcher(
            (configs.cdiv(N, block_m), H, B), t, out, *t.stride(), H, N, D, BLOCK_M=block_m, BLOCK_D=configs.block_d(D)
        )
    return out


@triton.jit
def _tanh(x):
    """tanh in float32 to a few ulps, from one exp2 (the MUFU unit) and a short polynomial (Triton's interpreter
    has no libdevice). ``|x| >= 1/4``: ``(1 - e) / (1 + e)`` with ``e = exp(-2|x|)`` (never overflows), the sign
    put back. Below, where ``1 - e`` would cancel and leave an absolute error of an ulp of 1 (times the cap: a
    cap of 10^4 moved scores by 10^-3), Taylor's series to x^9 (the first term left out is below 10^-8 of x)."""
    a = tl.abs(x)
    e = tl.math.exp2(a * -2.8853900817779268)  # -2 * log2(e)
    big = (1.0 - e) / (1.0 + e)
    x2 = x * x
    small = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    return tl.where(a < 0.25, small, tl.where(x < 0.0, -big, big))


@triton.jit
def _scores(qk, qk_scale, cap_log2, SOFTCAP: tl.constexpr):
    """The scores in the exp2 domain: ``qk * softmax_scale * log2(e)``, or with SOFTCAP (``qk_scale`` then
    ``softmax_scale / softcap``, ``cap_log2`` ``softcap * log2(e)``) Gemma 2's ``softcap * tanh(s / softcap)``."""
    if SOFTCAP:
        return _tanh(qk * qk_scale) * cap_log2
    return qk * qk_scale


@triton.jit
def _varlen_tile(CU, n_seq, pid, BLOCK: tl.constexpr, SEQ_BLOCK: tl.constexpr):
    """Tile ``pid`` of a packed batch whose tiles are listed sequence after sequence, each sequence's own only
    (``ceil(n / BLOCK)`` for a sequence of n rows, from ``cu_seqlens`` CU): ``(seq, tile)``, the tile's sequence
    and its number there; ``seq >= n_seq`` past the last one. Every program reads the ``n_seq + 1`` offsets
    (SEQ_BLOCK >= n_seq lanes) and scans them: no list to build before the launch."""
    b = tl.arange(0, SEQ_BLOCK)
    inside = b < n_seq
    n = tl.load(CU + b + 1, mask=inside, other=0) - tl.load(CU + b, mask=inside, other=0)
    ends = tl.cumsum((n + (BLOCK - 1)) // BLOCK, axis=0)  # tiles of sequences 0..b
    seq = tl.sum((ends <= pid).to(tl.int32), axis=0)  # the first sequence whose tiles end past pid
    before = tl.sum(tl.where(b + 1 == seq, ends, 0), axis=0)  # tiles of the sequences before it
    return seq, pid - before


@triton.jit
def _sequence(CU_Q, CU_K, seq):
    """Sequence ``seq`` of a packed (varlen) batch: ``(q_start, k_start, n_q, n_k)`` from ``cu_seqlens``."""
    q_start = tl.load(CU_Q + seq)
    k_start = tl.load(CU_K + seq)
    return q_start, k_start, tl.load(CU_Q + seq + 1) - q_start, tl.load(CU_K + seq + 1) - k_start


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
    cap_log2,
    seed,
    off_zh,
    drop_threshold,
    N_K,
    diag,
    left,
    right,
    head_dim,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    MASK_LEFT: tl.constexpr,
    MASK_RIGHT: tl.constexpr,
    DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    POS_SCALE: tl.constexpr,
    ROUND_TF32: tl.constexpr,
    SOFTCAP: tl.constexpr,
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
            # Only the blocks on the window's edges, the causal diagonal or past N_K pay for the mask.
            visible = _visible(offs_m[:, None], cols[None, :], N_K, diag, left, right, MASK_LEFT, MASK_RIGHT, True)
            qk = tl.where(visible, _scores(qk, qk_scale, cap_log2, SOFTCAP), float("-inf"))
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
            qk = _scores(qk, qk_scale, cap_log2, SOFTCAP)
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
        acc = tl.dot(_tf32(p.to(v.dtype), ROUND_TF32), v, acc, input_precision=INPUT_PRECISION)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(
    Q,
    K,
    V,
    Out,
    LSE,
    SEED,
    SINKS,
    CU_Q,
    CU_K,
    qk_scale,
    cap_log2,
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
    N_SEQ,
    left,
    right,
    head_dim,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_LEFT: tl.constexpr,
    MASK_RIGHT: tl.constexpr,
    DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    POS_SCALE: tl.constexpr,
    ROUND_TF32: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    VARLEN: tl.constexpr,
    SEQ_BLOCK: tl.constexpr,
):
    start_m = tl.program_id(0)
    if MASK_RIGHT:
        # Causal rows near the end see the most keys: launch them first to shorten the tail.
        start_m = tl.num_programs(0) - 1 - start_m
    off_h = tl.program_id(1)
    off_z = tl.program_id(2)
    if SEQ_BLOCK > 0:  # a packed batch's list of real tiles (kernels/varlen.py): program 0 walks it
        off_z, start_m = _varlen_tile(CU_Q, N_SEQ, start_m, BLOCK_M, SEQ_BLOCK)
        if off_z >= N_SEQ:
            return
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
    if VARLEN:
        # off_z is a sequence of a packed batch (the z strides are 0): its rows start at q_start / k_start, the
        # LSE is (H, total_q) (N_Q came in as total_q), and a tile past the sequence's own rows has no work.
        lse_row = off_h.to(tl.int64) * N_Q
        q_start, k_start, N_Q, N_K = _sequence(CU_Q, CU_K, off_z)
        if first_row >= N_Q:
            return
        lse_row += q_start
        off_zh = off_h  # dropout: positions within the sequence, batch 0 (kernels/varlen.py)
        q_base += q_start.to(tl.int64) * stride_qm
        o_base += q_start.to(tl.int64) * stride_om
        k_base += k_start.to(tl.int64) * stride_kn
        v_base += k_start.to(tl.int64) * stride_vn

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
    q = _tf32(q, ROUND_TF32)
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    diag, lo, full_lo, full_hi, hi = _key_range(
        first_row, N_Q, N_K, left, right, BLOCK_M, BLOCK_N, MASK_LEFT, MASK_RIGHT
    )
    if MASK_LEFT:  # the window's left edge: blocks that some rows of the tile no longer see
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kk, stride_vn, stride_vk, first_row, offs_d,
            lo, full_lo, qk_scale, cap_log2, seed, off_zh, drop_threshold, N_K, diag, left, right,
            head_dim=head_dim, BLOCK_N=BLOCK_N, MASKED=True, MASK_LEFT=MASK_LEFT, MASK_RIGHT=MASK_RIGHT,
            DROPOUT=DROPOUT, INPUT_PRECISION=INPUT_PRECISION, UPCAST=UPCAST, POS_SCALE=POS_SCALE,
            ROUND_TF32=ROUND_TF32, SOFTCAP=SOFTCAP,
        )  # fmt: skip
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kk, stride_vn, stride_vk, first_row, offs_d,
        full_lo, full_hi, qk_scale, cap_log2, seed, off_zh, drop_threshold, N_K, diag, left, right,
        head_dim=head_dim, BLOCK_N=BLOCK_N, MASKED=False, MASK_LEFT=MASK_LEFT, MASK_RIGHT=MASK_RIGHT,
        DROPOUT=DROPOUT, INPUT_PRECISION=INPUT_PRECISION, UPCAST=UPCAST, POS_SCALE=POS_SCALE,
        ROUND_TF32=ROUND_TF32, SOFTCAP=SOFTCAP,
    )  # fmt: skip
    # The causal diagonal, the window's right edge and the ragged end.
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kk, stride_vn, stride_vk, first_row, offs_d,
        full_hi, hi, qk_scale, cap_log2, seed, off_zh, drop_threshold, N_K, diag, left, right,
        head_dim=head_dim, BLOCK_N=BLOCK_N, MASKED=True, MASK_LEFT=MASK_LEFT, MASK_RIGHT=MASK_RIGHT,
        DROPOUT=DROPOUT, INPUT_PRECISION=INPUT_PRECISION, UPCAST=UPCAST, POS_SCALE=POS_SCALE,
        ROUND_TF32=ROUND_TF32, SOFTCAP=SOFTCAP,
    )  # fmt: skip

    # Rows that saw no key: output 0 and lse = +inf, so the backward's exp2(s - lse) is 0 there.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    if DROPOUT:
        acc = acc * inv_keep
    if HAS_SINKS:
        # GPT-OSS's sink joins the denominator only: + 2^(sink - m) in the running max's units. The stored
        # log-sum-exp below leaves it out (the public convention); the backward adds it back on the host.
        sink = tl.load(SINKS + off_h).to(tl.float32) * 1.4426950408889634
        acc = acc / tl.where(empty, 1.0, l_i + tl.math.exp2(sink - m_i))[:, None]
    else:
        acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    if VARLEN:
        lse_ptrs = LSE + lse_row + offs_m
    else:
        lse_ptrs = LSE + off_zh.to(tl.int64) * N_Q + offs_m
    tl.store(lse_ptrs, lse, mask=row_mask)
    tl.store(
        o_base + rows[:, None] * stride_om + offs_d[None, :] * stride_ok,
        _cast(acc, Out.dtype.element_ty, UPCAST),
        mask=row_mask[:, None] & mask_d[None, :],
    )


# ----------------------------------------------------------------------------------------------
# Backward, deterministic: dQ (which writes delta) then dK/dV
# ----------------------------------------------------------------------------------------------


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
    cap_log2,
    inv_keep,
    seed,
    off_zh,
    drop_threshold,
    N_K,
    diag,
    left,
    right,
    head_dim,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    MASK_LEFT: tl.constexpr,
    MASK_RIGHT: tl.constexpr,
    DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    ROUND_TF32: tl.constexpr,
    SOFTCAP: tl.constexpr,
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
        if SOFTCAP:
            t = _tanh(qk * qk_scale)
            p = tl.math.exp2(t * cap_log2 - lse[:, None])
        else:
            p = tl.math.exp2(qk * qk_scale - lse[:, None])
        if MASKED:
            visible = _visible(offs_m[:, None], cols[None, :], N_K, diag, left, right, MASK_LEFT, MASK_RIGHT, True)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, vT, input_precision=INPUT_PRECISION)
        if DROPOUT:
            keep = _dropout_keep(seed, off_zh, row0, start_n, drop_threshold, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp * inv_keep, 0.0)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)  # through the cap: d(softcap * tanh(s / softcap)) / ds
        dq = tl.dot(_tf32(ds.to(kT.dtype), ROUND_TF32), tl.trans(kT), dq, input_precision=INPUT_PRECISION)
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
    CU_Q,
    CU_K,
    softmax_scale,
    qk_scale,
    cap_log2,
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
    N_SEQ,
    left,
    right,
    head_dim,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_LEFT: tl.constexpr,
    MASK_RIGHT: tl.constexpr,
    DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    ROUND_TF32: tl.constexpr,
    SOFTCAP: tl.constexpr,
    VARLEN: tl.constexpr,
    SEQ_BLOCK: tl.constexpr,
):
    start_m = tl.program_id(0)
    if MASK_RIGHT:
        start_m = tl.num_programs(0) - 1 - start_m
    off_h = tl.program_id(1)
    off_z = tl.program_id(2)
    if SEQ_BLOCK > 0:  # as in the forward
        off_z, start_m = _varlen_tile(CU_Q, N_SEQ, start_m, BLOCK_M, SEQ_BLOCK)
        if off_z >= N_SEQ:
            return
    off_zh = off_z * H + off_h
    off_hk = off_h // GROUP
    first_row = start_m * BLOCK_M
    if VARLEN:  # as in the forward
        lse_row = off_h.to(tl.int64) * N_Q
        q_start, k_start, N_Q, N_K = _sequence(CU_Q, CU_K, off_z)
        if first_row >= N_Q:
            return
        lse_row += q_start
        off_zh = off_h
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
    if VARLEN:
        q_base += q_start.to(tl.int64) * stride_qm
        do_base += q_start.to(tl.int64) * stride_dom
        k_base += k_start.to(tl.int64) * stride_kn
        v_base += k_start.to(tl.int64) * stride_vn
    q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :] * stride_qk, mask=qo_mask, other=0.0)
    do = tl.load(do_base + rows[:, None] * stride_dom + offs_d[None, :] * stride_dok, mask=qo_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    if VARLEN:
        lse_ptrs = LSE + lse_row + offs_m
    else:
        lse_ptrs = LSE + off_zh.to(tl.int64) * N_Q + offs_m
    lse = tl.load(lse_ptrs, mask=row_mask, other=float("inf"))
    # delta_i = rowsum(dO_i * O_i) = rowsum(P_i * dP_i), the softmax backward's correction term (O already
    # carries dropout's kept, rescaled weights). Computed here, where dO is loaded anyway, and stored for
    # the dK/dV kernel launched after this one: no separate launch for it.
    o_base = Out + off_z.to(tl.int64) * stride_oz + off_h.to(tl.int64) * stride_oh + row0 * stride_om
    if VARLEN:
        o_base += q_start.to(tl.int64) * stride_om
    o = tl.load(o_base + rows[:, None] * stride_om + offs_d[None, :] * stride_ok, mask=qo_mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    if VARLEN:
        tl.store(DELTA + lse_row + offs_m, delta, mask=row_mask)
    else:
        tl.store(DELTA + off_zh.to(tl.int64) * N_Q + offs_m, delta, mask=row_mask)
    q, do = _tf32(q, ROUND_TF32), _tf32(do, ROUND_TF32)  # after delta, which takes dO as it is
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED)

    # The same key range as the forward: the window's left edge, whole blocks, then the masked tail.
    diag, lo, full_lo, full_hi, hi = _key_range(
        first_row, N_Q, N_K, left, right, BLOCK_M, BLOCK_N, MASK_LEFT, MASK_RIGHT
    )
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if MASK_LEFT:
        dq = _attn_bwd_dq_inner(
            dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kk, stride_vn, stride_vk, first_row, offs_d,
            lo, full_lo, qk_scale, cap_log2, inv_keep, seed, off_zh, drop_threshold, N_K, diag, left, right,
            head_dim=head_dim, BLOCK_N=BLOCK_N, MASKED=True, MASK_LEFT=MASK_LEFT, MASK_RIGHT=MASK_RIGHT,
            DROPOUT=DROPOUT, INPUT_PRECISION=INPUT_PRECISION, UPCAST=UPCAST, ROUND_TF32=ROUND_TF32, SOFTCAP=SOFTCAP,
        )  # fmt: skip
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kk, stride_vn, stride_vk, first_row, offs_d,
        full_lo, full_hi, qk_scale, cap_log2, inv_keep, seed, off_zh, drop_threshold, N_K, diag, left, right,
        head_dim=head_dim, BLOCK_N=BLOCK_N, MASKED=False, MASK_LEFT=MASK_LEFT, MASK_RIGHT=MASK_RIGHT,
        DROPOUT=DROPOUT, INPUT_PRECISION=INPUT_PRECISION, UPCAST=UPCAST, ROUND_TF32=ROUND_TF32, SOFTCAP=SOFTCAP,
    )  # fmt: skip
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kk, stride_vn, stride_vk, first_row, offs_d,
        full_hi, hi, qk_scale, cap_log2, inv_keep, seed, off_zh, drop_threshold, N_K, diag, left, right,
        head_dim=head_dim, BLOCK_N=BLOCK_N, MASKED=True, MASK_LEFT=MASK_LEFT, MASK_RIGHT=MASK_RIGHT,
        DROPOUT=DROPOUT, INPUT_PRECISION=INPUT_PRECISION, UPCAST=UPCAST, ROUND_TF32=ROUND_TF32, SOFTCAP=SOFTCAP,
    )  # fmt: skip
    dq = dq * softmax_scale
    dq_base = DQ + off_z.to(tl.int64) * stride_dqz + off_h.to(tl.int64) * stride_dqh + row0 * stride_dqm
    if VARLEN:
        dq_base += q_start.to(tl.int64) * stride_dqm
    tl.store(
        dq_base + rows[:, None] * stride_dqm + offs_d[None, :] * stride_dqk,
        _cast(dq, DQ.dtype.element_ty, UPCAST),
        mask=qo_mask,
    )


@triton.jit
def _attn_bwd_kv_inner(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    dq_base,
    lse_base,
    delta_base,
    stride_qm,
    stride_qk,
    stride_dom,
    stride_dok,
    stride_dqm,
    stride_dqk,
    start_n,
    offs_n,
    offs_d,
    lo,
    hi,
    softmax_scale,
    qk_scale,
    cap_log2,
    inv_keep,
    seed,
    off_zh,
    drop_threshold,
    N_Q,
    N_K,
    diag,
    left,
    right,
    head_dim,
    BLOCK_M: tl.constexpr,
    MASKED: tl.constexpr,
    MASK_LEFT: tl.constexpr,
    MASK_RIGHT: tl.constexpr,
    DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    PER_LANE: tl.constexpr,
    DQ_ATOMIC: tl.constexpr,
    ROUND_TF32: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """Accumulate dK, dV of one key block over query blocks [lo, hi), in the transposed (keys, queries)
    orientation so that dV += P^T dO and dK += dS^T Q need no transposed accumulator. DQ_ATOMIC (the
    one-pass backward): also add this key block's share dS K of dQ into the float32 buffer.

    Rows past N_Q load q = 0, dO = 0, lse = +inf, delta = 0, so their P and dS are exactly 0 without a
    row mask; keys past N_K load k = v = 0: garbage rows of dK/dV that are never stored, and no share of dQ.
    """
    BLOCK_N: tl.constexpr = k.shape[0]
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
        if SOFTCAP:
            tT = _tanh(qkT * qk_scale)
            pT = tl.math.exp2(tT * cap_log2 - lse[None, :])
        else:
            pT = tl.math.exp2(qkT * qk_scale - lse[None, :])
        if MASKED:
            visible = _visible(offs_m[None, :], offs_n[:, None], N_K, diag, left, right, MASK_LEFT, MASK_RIGHT, False)
            pT = tl.where(visible, pT, 0.0)
        do = tl.load(
            do_base + start_m.to(tl.int64) * stride_dom + rows[:, None] * stride_dom + offs_d[None, :] * stride_dok,
            mask=row_mask[:, None] & mask_d[None, :],
            other=0.0,
        )  # (BLOCK_M, D)
        if UPCAST:
            do = do.to(tl.float32)
        if DROPOUT:
            # Made once per tile, used by dV and dP alike.
            keepT = _dropout_keep(
                seed, off_zh, start_m, start_n, drop_threshold, BLOCK_M, BLOCK_N, TRANS=True, PER_LANE=PER_LANE
            )
            pT_drop = tl.where(keepT, pT, 0.0)  # the 1 / (1 - p) goes on dV once, at the end
        else:
            pT_drop = pT
        dv = tl.dot(_tf32(pT_drop.to(do.dtype), ROUND_TF32), do, dv, input_precision=INPUT_PRECISION)
        delta = tl.load(delta_base + offs_m, mask=row_mask, other=0.0)
        dpT = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)  # (BLOCK_N, BLOCK_M)
        if DROPOUT:
            dpT = tl.where(keepT, dpT * inv_keep, 0.0)
        dsT = pT * (dpT - delta[None, :])
        if SOFTCAP:
            dsT = dsT * (1.0 - tT * tT)  # through the cap
        dsT = _tf32(dsT.to(qT.dtype), ROUND_TF32)
        dk = tl.dot(dsT, tl.trans(qT), dk, input_precision=INPUT_PRECISION)
        if DQ_ATOMIC:
            dq = tl.dot(tl.trans(dsT), k, input_precision=INPUT_PRECISION)  # (BLOCK_M, D)
            dq_ptrs = (
                dq_base + start_m.to(tl.int64) * stride_dqm + rows[:, None] * stride_dqm + offs_d[None, :] * stride_dqk
            )
            tl.atomic_add(dq_ptrs, dq * softmax_scale, mask=row_mask[:, None] & mask_d[None, :], sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_kv(
    Q,
    K,
    V,
    DO,
    DQ,
    DK,
    DV,
    LSE,
    DELTA,
    SEED,
    CU_Q,
    CU_K,
    softmax_scale,
    qk_scale,
    cap_log2,
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
    stride_dqz,
    stride_dqh,
    stride_dqm,
    stride_dqk,
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
    N_SEQ,
    left,
    right,
    head_dim,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_LEFT: tl.constexpr,
    MASK_RIGHT: tl.constexpr,
    DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    PER_LANE: tl.constexpr,
    DQ_ATOMIC: tl.constexpr,
    ROUND_TF32: tl.constexpr,
    SOFTCAP: tl.constexpr,
    VARLEN: tl.constexpr,
    SEQ_BLOCK: tl.constexpr,
):
    """dK and dV of one key/value tile, summed over the query heads of its group in this program. With
    DQ_ATOMIC (the one-pass backward) it also adds each tile's share of dQ (float32, atomics); without,
    the dQ kernel has run before and DQ is unused."""
    tile_n = tl.program_id(0)
    off_hk = tl.program_id(1)
    off_z = tl.program_id(2)
    if SEQ_BLOCK > 0:  # as in the forward, over the key tiles
        off_z, tile_n = _varlen_tile(CU_K, N_SEQ, tile_n, BLOCK_N, SEQ_BLOCK)
        if off_z >= N_SEQ:
            return
    start_n = tile_n * BLOCK_N
    total_q = N_Q
    if VARLEN:  # as in the forward: a key tile past the sequence's own keys has no work
        q_start, k_start, N_Q, N_K = _sequence(CU_Q, CU_K, off_z)
        if start_n >= N_K:
            return
    cols = tl.arange(0, BLOCK_N)  # offsets inside the key tile; offs_n the absolute key rows
    offs_n = start_n + cols
    offs_d = tl.arange(0, BLOCK_D)
    col_mask = offs_n < N_K
    mask_d = offs_d < head_dim
    kv_mask = col_mask[:, None] & mask_d[None, :]
    col0 = tile_n.to(tl.int64) * BLOCK_N
    k_base = K + off_z.to(tl.int64) * stride_kz + off_hk.to(tl.int64) * stride_kh + col0 * stride_kn
    v_base = V + off_z.to(tl.int64) * stride_vz + off_hk.to(tl.int64) * stride_vh + col0 * stride_vn
    if VARLEN:
        k_base += k_start.to(tl.int64) * stride_kn
        v_base += k_start.to(tl.int64) * stride_vn
    k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kk, mask=kv_mask, other=0.0)
    v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vk, mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    k, v = _tf32(k, ROUND_TF32), _tf32(v, ROUND_TF32)
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED)

    diag, lo, full_lo, full_hi, hi = _query_range(
        start_n, N_Q, N_K, left, right, BLOCK_M, BLOCK_N, MASK_LEFT, MASK_RIGHT
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(0, GROUP):
        off_h = off_hk * GROUP + g
        off_zh = off_z * H + off_h
        q_base = Q + off_z.to(tl.int64) * stride_qz + off_h.to(tl.int64) * stride_qh
        do_base = DO + off_z.to(tl.int64) * stride_doz + off_h.to(tl.int64) * stride_doh
        dq_base = DQ + off_z.to(tl.int64) * stride_dqz + off_h.to(tl.int64) * stride_dqh
        lse_base = LSE + off_zh.to(tl.int64) * N_Q
        delta_base = DELTA + off_zh.to(tl.int64) * N_Q
        if VARLEN:
            lse_base = LSE + off_h.to(tl.int64) * total_q + q_start
            delta_base = DELTA + off_h.to(tl.int64) * total_q + q_start
            off_zh = off_h  # dropout: positions within the sequence, batch 0
            q_base += q_start.to(tl.int64) * stride_qm
            do_base += q_start.to(tl.int64) * stride_dom
            dq_base += q_start.to(tl.int64) * stride_dqm
        if MASK_RIGHT:  # the causal diagonal / the window's right edge: rows that see part of the tile
            dk, dv = _attn_bwd_kv_inner(
                dk, dv, k, v, q_base, do_base, dq_base, lse_base, delta_base, stride_qm, stride_qk,
                stride_dom, stride_dok, stride_dqm, stride_dqk, start_n, offs_n, offs_d, lo, full_lo,
                softmax_scale, qk_scale, cap_log2, inv_keep, seed, off_zh, drop_threshold, N_Q, N_K, diag, left, right,
                head_dim=head_dim, BLOCK_M=BLOCK_M, MASKED=True, MASK_LEFT=MASK_LEFT, MASK_RIGHT=MASK_RIGHT,
                DROPOUT=DROPOUT, INPUT_PRECISION=INPUT_PRECISION, UPCAST=UPCAST, PER_LANE=PER_LANE,
                DQ_ATOMIC=DQ_ATOMIC, ROUND_TF32=ROUND_TF32, SOFTCAP=SOFTCAP,
            )  # fmt: skip
        dk, dv = _attn_bwd_kv_inner(
            dk, dv, k, v, q_base, do_base, dq_base, lse_base, delta_base, stride_qm, stride_qk,
            stride_dom, stride_dok, stride_dqm, stride_dqk, start_n, offs_n, offs_d, full_lo, full_hi,
            softmax_scale, qk_scale, cap_log2, inv_keep, seed, off_zh, drop_threshold, N_Q, N_K, diag, left, right,
            head_dim=head_dim, BLOCK_M=BLOCK_M, MASKED=False, MASK_LEFT=MASK_LEFT, MASK_RIGHT=MASK_RIGHT,
            DROPOUT=DROPOUT, INPUT_PRECISION=INPUT_PRECISION, UPCAST=UPCAST, PER_LANE=PER_LANE,
            DQ_ATOMIC=DQ_ATOMIC, ROUND_TF32=ROUND_TF32, SOFTCAP=SOFTCAP,
        )  # fmt: skip
        if MASK_LEFT:  # the window's left edge: rows that no longer see all of the tile
            dk, dv = _attn_bwd_kv_inner(
                dk, dv, k, v, q_base, do_base, dq_base, lse_base, delta_base, stride_qm, stride_qk,
                stride_dom, stride_dok, stride_dqm, stride_dqk, start_n, offs_n, offs_d, full_hi, hi,
                softmax_scale, qk_scale, cap_log2, inv_keep, seed, off_zh, drop_threshold, N_Q, N_K, diag, left, right,
                head_dim=head_dim, BLOCK_M=BLOCK_M, MASKED=True, MASK_LEFT=MASK_LEFT, MASK_RIGHT=MASK_RIGHT,
                DROPOUT=DROPOUT, INPUT_PRECISION=INPUT_PRECISION, UPCAST=UPCAST, PER_LANE=PER_LANE,
                DQ_ATOMIC=DQ_ATOMIC, ROUND_TF32=ROUND_TF32, SOFTCAP=SOFTCAP,
            )  # fmt: skip

    # dS was taken w.r.t. the scaled scores s = softmax_scale * q.k, hence one more factor here.
    dk = dk * softmax_scale
    if DROPOUT:
        dv = dv * inv_keep
    dk_base = DK + off_z.to(tl.int64) * stride_dkz + off_hk.to(tl.int64) * stride_dkh + col0 * stride_dkn
    dv_base = DV + off_z.to(tl.int64) * stride_dvz + off_hk.to(tl.int64) * stride_dvh + col0 * stride_dvn
    if VARLEN:
        dk_base += k_start.to(tl.int64) * stride_dkn
        dv_base += k_start.to(tl.int64) * stride_dvn
    tl.store(
        dk_base + cols[:, None] * stride_dkn + offs_d[None, :] * stride_dkk,
        _cast(dk, DK.dtype.element_ty, UPCAST),
        mask=kv_mask,
    )
    tl.store(
        dv_base + cols[:, None] * stride_dvn + offs_d[None, :] * stride_dvk,
        _cast(dv, DV.dtype.element_ty, UPCAST),
        mask=kv_mask,
    )


@triton.jit
def _attn_bwd_preprocess(
    Out,
    DO,
    DQ,
    DELTA,
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
    N_Q,
    head_dim,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """The one-pass backward's first step: delta = rowsum(dO * O) per query row, and the float32 dQ
    buffer zeroed (one launch for both, instead of a memset and a kernel)."""
    off_h = tl.program_id(1)
    off_z = tl.program_id(2)
    rows = tl.arange(0, BLOCK_M)
    offs_m = tl.program_id(0) * BLOCK_M + rows
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < N_Q)[:, None] & (offs_d < head_dim)[None, :]
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    o_base = Out + off_z.to(tl.int64) * stride_oz + off_h.to(tl.int64) * stride_oh + row0 * stride_om
    do_base = DO + off_z.to(tl.int64) * stride_doz + off_h.to(tl.int64) * stride_doh + row0 * stride_dom
    dq_base = DQ + off_z.to(tl.int64) * stride_dqz + off_h.to(tl.int64) * stride_dqh + row0 * stride_dqm
    o = tl.load(o_base + rows[:, None] * stride_om + offs_d[None, :] * stride_ok, mask=mask, other=0.0)
    do = tl.load(do_base + rows[:, None] * stride_dom + offs_d[None, :] * stride_dok, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + (off_z * H + off_h).to(tl.int64) * N_Q + offs_m, delta, mask=offs_m < N_Q)
    zeros = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    tl.store(dq_base + rows[:, None] * stride_dqm + offs_d[None, :] * stride_dqk, zeros, mask=mask)


# ----------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------

# Each kernel launched through the JIT on the first call of an argument signature, then straight through the
# compiled kernel's launcher (kernels/launch.py: the JIT's dispatch is ~20 us of host time a launch).
_round_tf32_launcher = Launcher(_round_tf32_kernel)
_attn_fwd_launcher = Launcher(_attn_fwd)
_attn_bwd_dq_launcher = Launcher(_attn_bwd_dq)
_attn_bwd_preprocess_launcher = Launcher(_attn_bwd_preprocess)
_attn_bwd_kv_launcher = Launcher(_attn_bwd_kv)


def _flags(q: torch.Tensor, spec: Spec) -> dict:
    """Run-time window bounds and the constexprs every kernel of one call shares (a fresh dict)."""
    return dict(_plan(None, q.shape[-1], q.dtype, torch.backends.cuda.matmul.allow_tf32, *spec[:5], spec.softcap))


def _precision(q: torch.Tensor) -> str:
    # float32 follows PyTorch's own matmul setting, so a drop-in layer is as exact as the eager one.
    return configs.precision(q.dtype, torch.backends.cuda.matmul.allow_tf32)


@functools.lru_cache(maxsize=1024)
def _plan(
    kernel, head_dim, dtype, allow_tf32, causal, dropout_p, softmax_scale, window_left, window_right, softcap=0.0
) -> dict:
    """Everything a launch passes by keyword besides tensors, strides and sizes: the window, the constexprs
    and (for ``kernel``) the config table's tile. Cached: a training step launches the same few kernels with
    the same settings every time, and the host path is what a small call costs (bench/NOTES.md)."""
    mask_left, mask_right, left, right = window_flags(causal, (window_left, window_right))
    prec = configs.precision(dtype, allow_tf32)
    kwargs = dict(
        left=left,
        right=right,
        head_dim=head_dim,
        BLOCK_D=configs.block_d(head_dim),
        MASK_LEFT=mask_left,
        MASK_RIGHT=mask_right,
        DROPOUT=dropout_p > 0.0,
        INPUT_PRECISION="ieee" if prec == "ieee" else "tf32",
        # The interpreter's tl.dot on bfloat16 operands is wrong; do those dots in float32 there.
        UPCAST=INTERPRET and dtype == torch.bfloat16,
        # TF32 operands rounded as cuBLAS rounds them (_tf32). On the interpreter too: its dots are exact float32
        # products, which on rounded operands are what the GPU's TF32 tensor cores compute.
        ROUND_TF32=prec == "tf32",
        SOFTCAP=softcap > 0.0,
    )
    if kernel is not None:
        narrow = mask_left and mask_right and configs.narrow_window(left, right)
        kwargs.update(configs.select(kernel, head_dim, prec, dropout=dropout_p > 0, interpret=INTERPRET, narrow=narrow))
    if kernel == "fwd":
        kwargs["POS_SCALE"] = softmax_scale > 0 and not softcap  # the cap's tanh does not fold into one FFMA
    return kwargs


def _launch_kwargs(kernel: str, q: torch.Tensor, spec: Spec, tile: dict | None) -> dict:
    kwargs = _plan(kernel, q.shape[-1], q.dtype, torch.backends.cuda.matmul.allow_tf32, *spec[:5], spec.softcap)
    return {**kwargs, **tile} if tile else kwargs


def _scales(spec: Spec) -> tuple[float, float]:
    """``(qk_scale, cap_log2)`` for the kernels' ``_scores``: ``softmax_scale * log2(e)`` and None, or with a
    softcap the tanh's argument scale ``softmax_scale / softcap`` and ``softcap * log2(e)``. What a call does not
    use is passed as None: Triton compiles a None argument in as a constant, so the kernels without softcap, sinks
    or a packed batch have the parameter list, and the code, they had before those existed (bench/sm90.py)."""
    if spec.softcap:
        return spec.softmax_scale / spec.softcap, spec.softcap * _LOG2E
    return spec.softmax_scale * _LOG2E, None


class Varlen(NamedTuple):
    """A packed batch (kernels/varlen.py): the launchers then take q, k, v as ``(1, H, total, D)`` views of the
    ``(total, H, D)`` tensors, run over the batch's tile list (``_tiles``), and lay the log-sum-exp out as
    ``(1, H, total_q)`` (the public ``(H, total_q)``)."""

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int


def _strides(t: torch.Tensor, varlen: Varlen | None) -> tuple[int, ...]:
    # A packed batch's programs find their rows through cu_seqlens; the batch stride of the view is never used.
    return (0, *t.stride()[1:]) if varlen is not None else t.stride()


def _grid_batch(B: int, N_Q: int, N_K: int, varlen: Varlen | None) -> tuple[int, int, int]:
    """(batch programs, query rows, keys) the grids cover: per sequence, up to the longest, with a varlen batch."""
    if varlen is None:
        return B, N_Q, N_K
    return varlen.cu_seqlens_q.shape[0] - 1, varlen.max_seqlen_q, varlen.max_seqlen_k


# A packed batch of up to this many sequences runs over the list of its real tiles: program i of grid axis 0 is the
# batch's tile i, sequence after sequence (``_varlen_tile``: each program scans the offsets, SEQ_BLOCK lanes), and
# the grid has at most n_seq - 1 slots more than there are tiles, which exit at once. A larger batch runs over
# (tiles of the longest sequence, heads, sequences), as FlashAttention-2's varlen grid does: a program whose tile
# lies past its own sequence exits at once.
TILE_LIST_MAX_SEQS = 1024


def _tiles(B: int, rows: int, block: int, total: int, varlen: Varlen | None) -> tuple[int, int, int, int]:
    """``(programs on axis 0, programs on axis 2, n_seq, SEQ_BLOCK)`` for tiles of ``block`` rows: ``rows`` per
    batch entry (the longest sequence's for a packed batch of ``total`` rows); SEQ_BLOCK 0 without a tile list."""
    if varlen is None or varlen.cu_seqlens_q.shape[0] - 1 > TILE_LIST_MAX_SEQS:
        return configs.cdiv(rows, block), B, B, 0
    n_seq = B
    # sum over sequences of ceil(n / block) <= (total + n_seq * (block - 1)) // block, and <= n_seq * the longest's.
    slots = min(n_seq * configs.cdiv(rows, block), (total + n_seq * (block - 1)) // block)
    return slots, 1, n_seq, max(16, triton.next_power_of_2(n_seq))


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: Spec,
    tile: dict | None = None,
    *,
    sinks=None,
    varlen: Varlen | None = None,
):
    """The forward launcher: returns ``(out, lse, seed)``, lse base 2, the sink excluded, +inf for a row that sees
    no key. ``sinks``: ``(Hq,)`` or None. ``varlen``: a packed batch (``Varlen``). ``tile`` (BLOCK_M, BLOCK_N,
    num_warps, num_stages) replaces the config table's row: for the tuning experiments."""
    B, H, N_Q, D = q.shape
    N_K = k.shape[2]
    # Same memory layout as q: for a (B, N, H, D) projection viewed as (B, H, N, D) the output's
    # transpose back to (B, N, H*D) is then free.
    o = torch.empty_like(q)
    lse = torch.empty((B, H, N_Q), dtype=torch.float32, device=q.device)
    seed = new_seed(q.device, spec.dropout_p)
    kwargs = _launch_kwargs("fwd", q, spec, tile)
    if kwargs["ROUND_TF32"]:
        q, k, v = round_tf32(q), round_tf32(k), round_tf32(v)
    programs, rows, _ = _grid_batch(B, N_Q, N_K, varlen)
    tiles, batch, n_seq, seq_block = _tiles(programs, rows, kwargs["BLOCK_M"], N_Q, varlen)
    cu_q, cu_k = (varlen.cu_seqlens_q, varlen.cu_seqlens_k) if varlen is not None else (None, None)
    _attn_fwd_launcher(
        (tiles, H, batch),
        q, k, v, o, lse, seed, sinks, cu_q, cu_k,
        *_scales(spec), keep_scale(spec.dropout_p), keep_threshold(spec.dropout_p),
        *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(o, varlen),
        H, H // k.shape[1], N_Q, N_K, n_seq,
        **kwargs, HAS_SINKS=sinks is not None, VARLEN=varlen is not None, SEQ_BLOCK=seq_block,
    )  # fmt: skip
    return o, lse, seed


def tile_offsets_fit(t: torch.Tensor) -> bool:
    """Row and head-dim strides small enough for int32 offsets inside a tile."""
    return t.stride(2) < MAX_TILE_SPAN and t.stride(3) < MAX_TILE_SPAN


def backward(
    do,
    q,
    k,
    v,
    o,
    lse,
    seed,
    spec: Spec,
    tiles: dict | None = None,
    per_lane_bits: bool | None = None,
    one_pass=None,
    *,
    sinks=None,
    varlen: Varlen | None = None,
):
    """The backward launcher: returns ``(dq, dk, dv)``, and ``dsinks`` after them when ``sinks`` is given. The
    two-kernel backward, or the one pass with dQ atomics where ``configs.one_pass_backward`` says it is faster and
    ``spec.deterministic`` does not forbid it. For the experiments: ``one_pass`` forces a path, ``tiles`` replaces
    the table's rows by kernel name ("bwd", "dq", "dkdv"), ``per_lane_bits`` the table's choice of how dK/dV
    computes its dropout bits. ``varlen``: a packed batch, as in ``forward``.

    Sinks: the kernels take the weights' normalizer with the sink in it, ``lse' = log2(2^lse + 2^sink')``
    (one elementwise op here), and need nothing else: dS = P (dP - delta) holds as it is. The sink's own
    gradient is ``dsink = -sum over rows of P_sink * delta``, ``P_sink = 2^(sink' - lse')`` (its weight, which
    multiplies every other weight's derivative), summed here from the delta the kernels wrote."""
    B, H, N_Q, D = q.shape
    H_KV, N_K = k.shape[1], k.shape[2]
    programs, rows, keys = _grid_batch(B, N_Q, N_K, varlen)
    block_d = configs.block_d(D)
    if not tile_offsets_fit(do):
        do = do.contiguous()  # a gradient with absurd strides: a copy beats wrong addresses
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    delta = torch.empty_like(lse)
    if sinks is not None:
        lse = torch.logaddexp2(lse, sinks.float()[None, :, None] * _LOG2E)  # (B, Hq, Nq); +inf stays +inf
    scales = (
        spec.softmax_scale,
        *_scales(spec),
        keep_scale(spec.dropout_p),
        keep_threshold(spec.dropout_p),
    )
    tiles = tiles or {}
    per_lane = block_d <= configs.PER_LANE_BITS_MAX_BLOCK_D if per_lane_bits is None else per_lane_bits
    if one_pass is None:
        one_pass = not spec.deterministic and configs.one_pass_backward(spec.dropout_p > 0, keys, D)
    # Gradients in their inputs' layouts; float32 dQ in q's for the one pass (for float32 inputs, dQ itself).
    dq = torch.empty_like(q) if not one_pass else torch.empty_like(q, dtype=torch.float32)
    kernel = "bwd" if one_pass else "dkdv"
    kwargs = _launch_kwargs(kernel, q, spec, tiles.get(kernel))
    if kwargs["ROUND_TF32"]:
        q, k, v, do = round_tf32(q), round_tf32(k), round_tf32(v), round_tf32(do)  # as the forward's inputs
    cu_q, cu_k = (varlen.cu_seqlens_q, varlen.cu_seqlens_k) if varlen is not None else (None, None)
    if not one_pass:
        # dQ first: it also writes delta = rowsum(dO * O), which the dK/dV kernel reads.
        dq_kwargs = _launch_kwargs("dq", q, spec, tiles.get("dq"))
        dq_tiles, batch, n_seq, seq_block = _tiles(programs, rows, dq_kwargs["BLOCK_M"], N_Q, varlen)
        _attn_bwd_dq_launcher(
            (dq_tiles, H, batch),
            q, k, v, o, do, dq, lse, delta, seed, cu_q, cu_k, *scales,
            *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(o, varlen),
            *_strides(do, varlen), *_strides(dq, varlen),
            H, H // H_KV, N_Q, N_K, n_seq,
            **dq_kwargs, VARLEN=varlen is not None, SEQ_BLOCK=seq_block,
        )  # fmt: skip
    else:
        # Row by row over (B, H, N_Q): a packed batch's (1, H, total_q) needs no sequence bounds here.
        _attn_bwd_preprocess_launcher(
            (configs.cdiv(N_Q, 64), H, B),
            o, do, dq, delta, *o.stride(), *do.stride(), *dq.stride(), H, N_Q, D,
            BLOCK_D=block_d, BLOCK_M=64,
        )  # fmt: skip
    kv_tiles, batch, n_seq, seq_block = _tiles(programs, keys, kwargs["BLOCK_N"], N_K, varlen)
    _attn_bwd_kv_launcher(
        (kv_tiles, H_KV, batch),
        q, k, v, do, dq, dk, dv, lse, delta, seed, cu_q, cu_k, *scales,
        *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(do, varlen),
        *_strides(dq, varlen), *_strides(dk, varlen), *_strides(dv, varlen),
        H, H // H_KV, N_Q, N_K, n_seq,
        **kwargs, PER_LANE=per_lane, DQ_ATOMIC=one_pass, VARLEN=varlen is not None, SEQ_BLOCK=seq_block,
    )  # fmt: skip
    dq = dq if dq.dtype == q.dtype else dq.to(q.dtype)
    if sinks is None:
        return dq, dk, dv
    p_sink = torch.exp2(sinks.float()[None, :, None] * _LOG2E - lse)  # (B, Hq, Nq); 0 where lse is +inf
    return dq, dk, dv, (-(p_sink * delta).sum(dim=(0, 2))).to(sinks.dtype)
