"""A warp-specialized attention forward for Hopper in Gluon (Triton's tile-level dialect): an experiment.

FlashAttention-3's structure as far as it goes here, prepared without a GPU (compile-time evidence only:
``bench/results/sm90-static/2026-12-06-gluon-triton3.6.txt``; Gluon has no interpreter, so whether it is exact and how
fast it runs is known only after a GPU run, ``bench/gpu_check.sh`` stage ``gluon``):

- one **producer warp** (``_producer``, 24 registers after ``setmaxnreg``) issues the TMA loads: the query
  tile once, then key and value tiles into a ring of ``STAGES`` shared-memory slots, each slot with a
  "full" mbarrier (the TMA's bytes arrived) and an "empty" one (the consumers are done with it);
- the **consumers** (``_consumer``, the default partition: 8 warps, two warpgroups of 64 query rows each)
  run asynchronous wgmma for ``S = Q K^T``, the online softmax in base 2, and ``O += P V`` with P taken
  from registers (no shared-memory round trip);
- variant ``"overlap"``: the next block's ``S`` wgmma is issued before this block's softmax (FA3's
  intra-warpgroup overlap: the tensor cores work on the next ``Q K^T`` while the warps compute exponentials);
- variant ``"pingpong"`` (``_attn_fwd_gluon_pingpong``): the two consumer warpgroups in partitions of their own
  (64 query rows each) take turns at the tensor cores, handing the turn over by mbarrier, so one's softmax runs
  while the other's wgmma do (FA3's inter-warpgroup ping-pong); in its turn a warpgroup issues this block's ``S``
  and the previous block's ``P V`` together;
- variant ``"persistent"`` (``_attn_fwd_gluon_persistent``): ``"overlap"``'s partitions looping over tiles, one
  program per SM, longest causal tiles first; the K/V ring runs on from one tile into the next;
- variant ``"plain"``: none of these (each ``S`` waited for before its softmax), the baseline.

Not done (bench/NOTES.md, session 9): ping-pong together with the intra-warpgroup overlap (tried: ptxas put the
P V wait above the exponentials, so it was the ping-pong again) or with the persistent loop.

The result follows ``kernels/flash_attn.py``'s forward: ``(out, lse)`` with ``lse`` the base-2 log-sum-exp of
the scaled scores (``softmax_scale * log2(e)`` folded into one multiplier), ``+inf`` for a query row that sees
no key (its output row is 0); causal masks align bottom-right (query ``i`` sits at position
``i + Nk - Nq``). Inputs ``(B, H, N, D)``, bf16 or fp16, head dim 64 or 128, key/value heads dividing the
query heads; the tensors are addressed through 4-D TMA descriptors over ``(B, H, N, D)``, so any strides with
contiguous rows and 16-byte-aligned other strides work, and rows past ``N`` read as zero (no head reads its
neighbour's rows). Not wired into ``kernels.flash_attention``: a default only after a GPU run shows it exact and
faster than the pointer kernel.

    python -m bench.gluon_attention --json out.json          # on a GPU: exactness, then timings
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch
import triton

_LOG2E = 1.4426950408889634
HEAD_DIMS = (64, 128)
# plain: the 8-warp consumer partition, each S waited for before its softmax; overlap: plus the next block's S in
# flight during this block's softmax; pingpong: two 4-warp consumer partitions taking turns at the tensor cores;
# persistent: overlap's partitions looping over tiles, one program per SM.
VARIANTS = ("plain", "overlap", "pingpong", "persistent")
DTYPES = (torch.bfloat16, torch.float16)

# Gluon's Hopper API as Triton 3.6 (the GPU image's) spells it, with the three names Triton 3.9 (the CI's) changed
# picked below. A Triton without them (older, or a later rename) leaves GLUON_MISSING set and supports() False with
# its reason.
try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # The TMA load: async_copy_global_to_shared in 3.6; async_load later (the old name raises when compiled).
    _tma_load = getattr(tma, "async_load", None) or getattr(tma, "async_copy_global_to_shared", None)
    if _tma_load is None:
        raise ImportError("triton.experimental.gluon.language.nvidia.hopper.tma.async_load")
    for _name in ("warp_specialize", "NVMMASharedLayout", "NVMMADistributedLayout", "DotOperandLayout"):
        if not hasattr(gl, _name):
            raise ImportError(f"triton.experimental.gluon.language.{_name}")
    GLUON_MISSING = None
    # Triton 3.6 spells a shared-memory view of other shape and layout _reinterpret; later versions reinterpret.
    _PUBLIC_REINTERPRET = gl.constexpr(hasattr(gl.shared_memory_descriptor, "reinterpret"))
    # A barrier over the partition's warps: thread_barrier in 3.6, barrier later.
    _sync_warps = gl.thread_barrier if hasattr(gl, "thread_barrier") else gl.barrier
except (ImportError, AttributeError) as e:  # pragma: no cover - depends on the installed Triton
    GLUON_MISSING = f"triton {triton.__version__} lacks Gluon's Hopper API ({e})"


def config(head_dim: int) -> dict:
    """Tiles per head dim. Shared memory (bf16): Q tile + STAGES x (K tile + V tile).
    D 128: 32 KB + 2 x 64 KB = 160 KB (3 stages would be 224 KB, at the 227 KiB edge); D 64: 16 KB + 3 x 32 KB.
    Consumers: 8 warps (two warpgroups of 64 rows); at D 128 four warps spilled (../shared/GLUON36-HOPPER.md)."""
    if head_dim == 128:
        return {"BLOCK_M": 128, "BLOCK_N": 128, "STAGES": 2, "num_warps": 8}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "STAGES": 3, "num_warps": 8}


if GLUON_MISSING is None:

    @gluon.jit
    def _producer(
        q_desc,
        k_desc,
        v_desc,
        q_smem,
        k_smem,
        v_smem,
        q_bar,
        k_full,
        k_empty,
        v_full,
        v_empty,
        off_z,
        off_h,
        off_hk,
        first_row,
        n_blocks,
        base,
        BLOCK_N: gl.constexpr,
        STAGES: gl.constexpr,
        Q_PARTS: gl.constexpr,
    ):
        """One warp: Q once (in Q_PARTS boxes of rows, one per consumer partition), then block i's K and V into
        slot i % STAGES once the consumers emptied it."""
        Q_ROWS: gl.constexpr = q_desc.block_type.shape[2]
        mbarrier.expect(q_bar, Q_PARTS * q_desc.block_type.nbytes)
        for part in gl.static_range(Q_PARTS):
            _tma_load(q_desc, [off_z, off_h, first_row + part * Q_ROWS, 0], q_bar, q_smem.index(part))
        for i in range(n_blocks):
            s = (base + i) % STAGES  # the ring's base + i-th load (base: earlier tiles' blocks, when persistent)
            # A fresh barrier counts as having completed the phase before phase 0: waiting on the opposite phase
            # lets the first round of slots through.
            phase = (((base + i) // STAGES) & 1) ^ 1
            mbarrier.wait(k_empty.index(s), phase)
            mbarrier.expect(k_full.index(s), k_desc.block_type.nbytes)
            _tma_load(k_desc, [off_z, off_hk, i * BLOCK_N, 0], k_full.index(s), k_smem.index(s))
            mbarrier.wait(v_empty.index(s), phase)
            mbarrier.expect(v_full.index(s), v_desc.block_type.nbytes)
            _tma_load(v_desc, [off_z, off_hk, i * BLOCK_N, 0], v_full.index(s), v_smem.index(s))

    @gluon.jit
    def _softmax_block(
        s_acc,
        acc,
        m_i,
        l_i,
        start_n,
        offs_m,
        offs_n,
        qk_scale,
        N_K,
        shift,
        mask_block,
        CAUSAL: gl.constexpr,
        dtype: gl.constexpr,
        p_layout: gl.constexpr,
    ):
        """Online softmax on one block of scores (base 2): returns P as the P.V wgmma's register operand, the
        output rescaled, and the new row max and sum. mask_block (a run-time flag, the same for every warp): this
        block holds keys past N_K or past some row's diagonal; the blocks before need no mask."""
        qk = s_acc * qk_scale
        if mask_block:
            cols = start_n + offs_n
            seen = cols[None, :] < N_K
            if CAUSAL:
                seen = seen & (cols[None, :] <= offs_m[:, None] + shift)  # bottom-right: query i at i + Nk - Nq
            qk = gl.where(seen, qk, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(qk, 1))
        m_sub = gl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: exp2(-inf - 0) = 0
        p = gl.exp2(qk - m_sub[:, None])
        alpha = gl.exp2(m_i - m_sub)
        l_i = l_i * alpha + gl.sum(p, 1)
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, acc.type.layout))[:, None]
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        return p_op, acc, m_new, l_i

    @gluon.jit
    def _consumer(
        q_smem,
        k_smem,
        v_smem,
        q_bar,
        k_full,
        k_empty,
        v_full,
        v_empty,
        first_row,
        n_full,
        n_blocks,
        qk_scale,
        N_K,
        shift,
        base,
        q_phase,
        BLOCK_M: gl.constexpr,
        BLOCK_N: gl.constexpr,
        HEAD_DIM: gl.constexpr,
        STAGES: gl.constexpr,
        CAUSAL: gl.constexpr,
        OVERLAP: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        """The consumers' work on one query tile: S = Q K^T, softmax, O += P V per block; returns (acc, m_i, l_i).
        Block i of the tile is the ring's base + i-th load (base: the blocks of this program's earlier tiles, in
        the persistent kernel); the tile's Q is the q_phase-th (0 or 1 by parity) load into q_smem."""
        dtype: gl.constexpr = q_smem.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 16]
        )
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, HEAD_DIM, 16]
        )
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        offs_m = first_row + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
        offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
        l_i = gl.full([BLOCK_M], 0.0, gl.float32, layout=gl.SliceLayout(1, s_layout))
        acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
        mbarrier.wait(q_bar, q_phase)
        if OVERLAP:
            # FA3's intra-warpgroup overlap: block i + 1's S wgmma is in flight while block i's softmax runs. The
            # S of block 0 first; each iteration then issues the next S, waits for this one, and so on.
            if n_blocks > 0:
                first = base % STAGES
                mbarrier.wait(k_full.index(first), (base // STAGES) & 1)
                s_tok = warpgroup_mma(q_smem, k_smem.index(first).permute((1, 0)), s_zero, use_acc=False, is_async=True)
                s_acc = warpgroup_mma_wait(0, deps=(s_tok, q_smem, k_smem.index(first)))[0]
                _sync_warps()  # both warpgroups done reading the slot before it is handed back
                mbarrier.arrive(k_empty.index(first), count=1)
            else:
                s_acc = s_zero
            for i in range(n_blocks - 1):
                s = (base + i) % STAGES
                phase = ((base + i) // STAGES) & 1
                nxt = (base + i + 1) % STAGES
                # The next block's S, issued before this block's softmax.
                mbarrier.wait(k_full.index(nxt), ((base + i + 1) // STAGES) & 1)
                s_tok = warpgroup_mma(q_smem, k_smem.index(nxt).permute((1, 0)), s_zero, use_acc=False, is_async=True)
                p_op, acc, m_i, l_i = _softmax_block(
                    s_acc, acc, m_i, l_i, i * BLOCK_N, offs_m, offs_n, qk_scale, N_K, shift, i >= n_full,
                    CAUSAL, dtype, p_layout,
                )  # fmt: skip
                mbarrier.wait(v_full.index(s), phase)
                o_tok = warpgroup_mma(p_op, v_smem.index(s), acc, is_async=True)
                # wgmma groups retire in order: waiting for all but the newest (P.V) retires the next S.
                s_next = warpgroup_mma_wait(1, deps=(s_tok, q_smem, k_smem.index(nxt)))[0]
                acc = warpgroup_mma_wait(0, deps=(o_tok, p_op, v_smem.index(s)))[0]
                _sync_warps()
                mbarrier.arrive(k_empty.index(nxt), count=1)
                mbarrier.arrive(v_empty.index(s), count=1)
                s_acc = s_next
            if n_blocks > 0:  # the last block: no next S to issue
                last = n_blocks - 1
                p_op, acc, m_i, l_i = _softmax_block(
                    s_acc, acc, m_i, l_i, last * BLOCK_N, offs_m, offs_n, qk_scale, N_K, shift, last >= n_full,
                    CAUSAL, dtype, p_layout,
                )  # fmt: skip
                s = (base + last) % STAGES
                mbarrier.wait(v_full.index(s), ((base + last) // STAGES) & 1)
                o_tok = warpgroup_mma(p_op, v_smem.index(s), acc, is_async=True)
                acc = warpgroup_mma_wait(0, deps=(o_tok, p_op, v_smem.index(s)))[0]
                _sync_warps()
                mbarrier.arrive(v_empty.index(s), count=1)
        else:
            for i in range(n_blocks):
                s = (base + i) % STAGES
                phase = ((base + i) // STAGES) & 1
                mbarrier.wait(k_full.index(s), phase)
                s_tok = warpgroup_mma(q_smem, k_smem.index(s).permute((1, 0)), s_zero, use_acc=False, is_async=True)
                s_acc = warpgroup_mma_wait(0, deps=(s_tok, q_smem, k_smem.index(s)))[0]
                _sync_warps()  # both warpgroups done reading the slot before it is handed back
                mbarrier.arrive(k_empty.index(s), count=1)
                p_op, acc, m_i, l_i = _softmax_block(
                    s_acc, acc, m_i, l_i, i * BLOCK_N, offs_m, offs_n, qk_scale, N_K, shift, i >= n_full,
                    CAUSAL, dtype, p_layout,
                )  # fmt: skip
                mbarrier.wait(v_full.index(s), phase)
                o_tok = warpgroup_mma(p_op, v_smem.index(s), acc, is_async=True)
                acc = warpgroup_mma_wait(0, deps=(o_tok, p_op, v_smem.index(s)))[0]
                _sync_warps()
                mbarrier.arrive(v_empty.index(s), count=1)
        return (acc, m_i, l_i)

    @gluon.jit
    def _attn_fwd_gluon(
        q_desc,
        k_desc,
        v_desc,
        Out,
        LSE,
        qk_scale,
        stride_oz,
        stride_oh,
        stride_om,
        H,
        GROUP,
        N_Q,
        N_K,
        BLOCK_M: gl.constexpr,
        BLOCK_N: gl.constexpr,
        HEAD_DIM: gl.constexpr,
        STAGES: gl.constexpr,
        CAUSAL: gl.constexpr,
        OVERLAP: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        num_m = gl.cdiv(N_Q, BLOCK_M)
        start_m = gl.program_id(0)
        if CAUSAL:
            start_m = num_m - 1 - start_m  # the tiles that see the most keys first
        off_h = gl.program_id(1)
        off_z = gl.program_id(2)
        first_row = start_m * BLOCK_M
        shift = N_K - N_Q  # bottom-right causal: query row r sees keys up to r + shift
        if CAUSAL:
            hi = gl.minimum(N_K, first_row + BLOCK_M + shift)  # past the tile's last row's diagonal
            full_hi = gl.minimum(N_K, first_row + 1 + shift)  # every row of the tile sees keys below this
        else:
            hi = N_K
            full_hi = N_K
        n_blocks = gl.cdiv(gl.maximum(hi, 0), BLOCK_N)
        n_full = gl.maximum(full_hi, 0) // BLOCK_N  # blocks that need no mask; the rest are masked

        dtype: gl.constexpr = q_desc.dtype
        q_smem = gl.allocate_shared_memory(dtype, [1] + q_desc.block_type.shape, q_desc.layout)
        # The ring: a leading slot dimension over the descriptors' tiles (a layout may be one rank short of its shape).
        k_smem = gl.allocate_shared_memory(dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for s in gl.static_range(STAGES):
            mbarrier.init(k_full.index(s), count=1)
            mbarrier.init(k_empty.index(s), count=1)
            mbarrier.init(v_full.index(s), count=1)
            mbarrier.init(v_empty.index(s), count=1)
        fence_async_shared()

        # The descriptors' 4-D tiles (1, 1, rows, D) seen as the 2-D (rows, D) tiles the wgmma reads: the same bytes
        # (the swizzle runs over rows of D elements, whatever the unit dimensions in front), a rank-2 layout.
        mma_layout: gl.constexpr = gl.NVMMASharedLayout(
            swizzle_byte_width=q_desc.layout.swizzle_byte_width, element_bitwidth=q_desc.layout.element_bitwidth
        )
        if _PUBLIC_REINTERPRET:
            q2 = q_smem.reinterpret(dtype, [BLOCK_M, HEAD_DIM], mma_layout)  # the one Q box
            k2 = k_smem.reinterpret(dtype, [STAGES, BLOCK_N, HEAD_DIM], mma_layout)
            v2 = v_smem.reinterpret(dtype, [STAGES, BLOCK_N, HEAD_DIM], mma_layout)
        else:
            q2 = q_smem._reinterpret(dtype, [BLOCK_M, HEAD_DIM], mma_layout)
            k2 = k_smem._reinterpret(dtype, [STAGES, BLOCK_N, HEAD_DIM], mma_layout)
            v2 = v_smem._reinterpret(dtype, [STAGES, BLOCK_N, HEAD_DIM], mma_layout)
        acc, m_i, l_i = gl.warp_specialize(
            [
                (
                    _consumer,
                    (q2, k2, v2, q_bar, k_full, k_empty, v_full, v_empty, first_row, n_full, n_blocks, qk_scale,
                     N_K, shift, 0, 0, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, OVERLAP, num_warps),
                ),
                (
                    _producer,
                    (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_full, k_empty, v_full, v_empty,
                     off_z, off_h, off_h // GROUP, first_row, n_blocks, 0, BLOCK_N, STAGES, 1),
                ),
            ],
            [1],
            [24],
        )  # fmt: skip

        _store_tile(acc, m_i, l_i, Out, LSE, off_z, off_h, first_row, stride_oz, stride_oh, stride_om, H, N_Q,
                    BLOCK_M, HEAD_DIM)  # fmt: skip

    @gluon.jit
    def _store_tile(
        acc, m_i, l_i, Out, LSE, off_z, off_h, first_row, stride_oz, stride_oh, stride_om, H, N_Q,
        ROWS: gl.constexpr, HEAD_DIM: gl.constexpr,
    ):  # fmt: skip
        """Normalize and store rows first_row + [0, ROWS) of (off_z, off_h): a row that saw no key gets output 0
        and lse +inf (as the pointer kernel). Stored through pointers, not TMA: a TMA store of a (1, 1, ROWS, D) box
        would clip at N_Q as well, but needs the tile in shared memory; this writes from the wgmma's registers."""
        o_layout: gl.constexpr = acc.type.layout
        empty = l_i == 0.0
        lse = gl.where(empty, float("inf"), m_i + gl.log2(gl.where(empty, 1.0, l_i)))
        inv = gl.convert_layout(1.0 / gl.where(empty, 1.0, l_i), gl.SliceLayout(1, o_layout))
        out = (acc * inv[:, None]).to(Out.dtype.element_ty)
        rows = first_row + gl.arange(0, ROWS, layout=gl.SliceLayout(1, o_layout))
        cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        base = Out + off_z.to(gl.int64) * stride_oz + off_h.to(gl.int64) * stride_oh
        ptrs = base + rows.to(gl.int64)[:, None] * stride_om + cols[None, :]
        gl.store(ptrs, out, mask=rows[:, None] < N_Q)
        lse_rows = first_row + gl.arange(0, ROWS, layout=lse.type.layout)
        gl.store(LSE + (off_z * H + off_h).to(gl.int64) * N_Q + lse_rows, lse, mask=lse_rows < N_Q)

    @gluon.jit
    def _consumer_pingpong(
        WG: gl.constexpr,
        q_smem,
        k_smem,
        v_smem,
        q_bar,
        k_full,
        k_empty,
        v_full,
        v_empty,
        turn,
        Out,
        LSE,
        off_z,
        off_h,
        first_row,
        n_full,
        n_blocks,
        qk_scale,
        stride_oz,
        stride_oh,
        stride_om,
        H,
        N_Q,
        N_K,
        shift,
        ROWS: gl.constexpr,
        BLOCK_N: gl.constexpr,
        HEAD_DIM: gl.constexpr,
        STAGES: gl.constexpr,
        CAUSAL: gl.constexpr,
    ):
        """Consumer warpgroup WG (0 or 1) of the ping-pong: rows first_row + WG * ROWS + [0, ROWS) of the tile.

        FA3's inter-warpgroup ping-pong: the two warpgroups take turns at the tensor cores. In its turn a warpgroup
        issues this block's S and the previous block's P.V together, then hands the turn over (an mbarrier each,
        ``turn``) and waits for them while the other warpgroup's matrix products run; its softmax then overlaps
        the other's wgmma. Turns alternate strictly (0, 1, 0, 1, ...), n_blocks + 1 per warpgroup."""
        dtype: gl.constexpr = q_smem.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16]
        )
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16]
        )
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row0 = first_row + WG * ROWS
        offs_m = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
        offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
        l_i = gl.full([ROWS], 0.0, gl.float32, layout=gl.SliceLayout(1, s_layout))
        acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout)
        s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
        q = q_smem.index(WG)
        my_turn = turn.index(WG)
        their_turn = turn.index(1 - WG)
        # Turn t of this warpgroup waits for the other's t-th hand-over; warpgroup 0's first turn is free (a fresh
        # barrier counts as having completed the phase before phase 0, so it waits on parity 1).
        first_parity: gl.constexpr = 1 if WG == 0 else 0
        mbarrier.wait(q_bar, 0)
        if n_blocks > 0:
            mbarrier.wait(k_full.index(0), 0)
            mbarrier.wait(my_turn, first_parity)
            s_tok = warpgroup_mma(q, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            mbarrier.arrive(their_turn, count=1)
            s_acc = warpgroup_mma_wait(0, deps=(s_tok, q, k_smem.index(0)))[0]
            _sync_warps()
            mbarrier.arrive(k_empty.index(0), count=1)
            p_op, acc, m_i, l_i = _softmax_block(
                s_acc, acc, m_i, l_i, 0, offs_m, offs_n, qk_scale, N_K, shift, 0 >= n_full, CAUSAL, dtype, p_layout
            )
            for i in range(1, n_blocks):
                s = i % STAGES
                prev = (i - 1) % STAGES
                mbarrier.wait(k_full.index(s), (i // STAGES) & 1)
                mbarrier.wait(v_full.index(prev), ((i - 1) // STAGES) & 1)
                mbarrier.wait(my_turn, (i & 1) ^ first_parity)
                s_tok = warpgroup_mma(q, k_smem.index(s).permute((1, 0)), s_zero, use_acc=False, is_async=True)
                o_tok = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
                mbarrier.arrive(their_turn, count=1)
                s_acc = warpgroup_mma_wait(1, deps=(s_tok, q, k_smem.index(s)))[0]
                acc = warpgroup_mma_wait(0, deps=(o_tok, p_op, v_smem.index(prev)))[0]
                _sync_warps()
                mbarrier.arrive(k_empty.index(s), count=1)
                mbarrier.arrive(v_empty.index(prev), count=1)
                p_op, acc, m_i, l_i = _softmax_block(
                    s_acc, acc, m_i, l_i, i * BLOCK_N, offs_m, offs_n, qk_scale, N_K, shift, i >= n_full,
                    CAUSAL, dtype, p_layout,
                )  # fmt: skip
            last = (n_blocks - 1) % STAGES
            mbarrier.wait(v_full.index(last), ((n_blocks - 1) // STAGES) & 1)
            mbarrier.wait(my_turn, (n_blocks & 1) ^ first_parity)
            o_tok = warpgroup_mma(p_op, v_smem.index(last), acc, is_async=True)
            mbarrier.arrive(their_turn, count=1)
            acc = warpgroup_mma_wait(0, deps=(o_tok, p_op, v_smem.index(last)))[0]
            _sync_warps()
            mbarrier.arrive(v_empty.index(last), count=1)
        _store_tile(acc, m_i, l_i, Out, LSE, off_z, off_h, row0, stride_oz, stride_oh, stride_om, H, N_Q,
                    ROWS, HEAD_DIM)  # fmt: skip

    @gluon.jit
    def _attn_fwd_gluon_pingpong(
        q_desc,
        k_desc,
        v_desc,
        Out,
        LSE,
        qk_scale,
        stride_oz,
        stride_oh,
        stride_om,
        H,
        GROUP,
        N_Q,
        N_K,
        BLOCK_M: gl.constexpr,
        BLOCK_N: gl.constexpr,
        HEAD_DIM: gl.constexpr,
        STAGES: gl.constexpr,
        CAUSAL: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        """The forward with two consumer warpgroups in separate partitions (4 warps each, BLOCK_M // 2 rows each)
        that ping-pong on the tensor cores (``_consumer_pingpong``), and the 1-warp producer. num_warps is 4: the
        default partition is consumer warpgroup 0."""
        ROWS: gl.constexpr = BLOCK_M // 2
        num_m = gl.cdiv(N_Q, BLOCK_M)
        start_m = gl.program_id(0)
        if CAUSAL:
            start_m = num_m - 1 - start_m
        off_h = gl.program_id(1)
        off_z = gl.program_id(2)
        first_row = start_m * BLOCK_M
        shift = N_K - N_Q
        if CAUSAL:
            hi = gl.minimum(N_K, first_row + BLOCK_M + shift)
            full_hi = gl.minimum(N_K, first_row + 1 + shift)
        else:
            hi = N_K
            full_hi = N_K
        n_blocks = gl.cdiv(gl.maximum(hi, 0), BLOCK_N)  # the same for both warpgroups: their turns pair up
        n_full = gl.maximum(full_hi, 0) // BLOCK_N

        dtype: gl.constexpr = q_desc.dtype
        q_smem = gl.allocate_shared_memory(dtype, [2] + q_desc.block_type.shape, q_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        k_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        mbarrier.init(turn.index(0), count=1)
        mbarrier.init(turn.index(1), count=1)
        for s in gl.static_range(STAGES):
            mbarrier.init(k_full.index(s), count=1)
            mbarrier.init(k_empty.index(s), count=2)  # both consumer warpgroups hand each slot back
            mbarrier.init(v_full.index(s), count=1)
            mbarrier.init(v_empty.index(s), count=2)
        fence_async_shared()

        mma_layout: gl.constexpr = gl.NVMMASharedLayout(
            swizzle_byte_width=q_desc.layout.swizzle_byte_width, element_bitwidth=q_desc.layout.element_bitwidth
        )
        if _PUBLIC_REINTERPRET:
            q2 = q_smem.reinterpret(dtype, [2, ROWS, HEAD_DIM], mma_layout)
            k2 = k_smem.reinterpret(dtype, [STAGES, BLOCK_N, HEAD_DIM], mma_layout)
            v2 = v_smem.reinterpret(dtype, [STAGES, BLOCK_N, HEAD_DIM], mma_layout)
        else:
            q2 = q_smem._reinterpret(dtype, [2, ROWS, HEAD_DIM], mma_layout)
            k2 = k_smem._reinterpret(dtype, [STAGES, BLOCK_N, HEAD_DIM], mma_layout)
            v2 = v_smem._reinterpret(dtype, [STAGES, BLOCK_N, HEAD_DIM], mma_layout)
        gl.warp_specialize(
            [
                (
                    _consumer_pingpong,
                    (0, q2, k2, v2, q_bar, k_full, k_empty, v_full, v_empty, turn, Out, LSE, off_z, off_h, first_row,
                     n_full, n_blocks, qk_scale, stride_oz, stride_oh, stride_om, H, N_Q, N_K, shift,
                     ROWS, BLOCK_N, HEAD_DIM, STAGES, CAUSAL),
                ),
                (
                    _consumer_pingpong,
                    (1, q2, k2, v2, q_bar, k_full, k_empty, v_full, v_empty, turn, Out, LSE, off_z, off_h, first_row,
                     n_full, n_blocks, qk_scale, stride_oz, stride_oh, stride_om, H, N_Q, N_K, shift,
                     ROWS, BLOCK_N, HEAD_DIM, STAGES, CAUSAL),
                ),
                (
                    _producer,
                    (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_full, k_empty, v_full, v_empty,
                     off_z, off_h, off_h // GROUP, first_row, n_blocks, 0, BLOCK_N, STAGES, 2),
                ),
            ],
            [4, 1],
            [240, 24],
        )  # fmt: skip

    @gluon.jit
    def _tile_of(t, num_m, B, H, CAUSAL: gl.constexpr):
        """The persistent kernel's t-th tile: query tile, then (batch, head); causal tiles that see the most keys
        first (a greedy longest-first order that evens out the causal tail across programs)."""
        bh = t % (B * H)
        start_m = t // (B * H)
        if CAUSAL:
            start_m = num_m - 1 - start_m
        return start_m, bh % H, bh // H

    @gluon.jit
    def _producer_persistent(
        q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, q_empty, k_full, k_empty, v_full, v_empty,
        B, H, GROUP, N_Q, N_K,
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr,
    ):  # fmt: skip
        """The producer over this program's tiles: the ring runs on across tiles (base), so the next tile's first
        K/V loads start while the consumers finish this one; Q waits until the consumers' last S of the previous
        tile retired (q_empty)."""
        num_m = gl.cdiv(N_Q, BLOCK_M)
        base = 0
        j = 0
        for t in range(gl.program_id(0), num_m * B * H, gl.num_programs(0)):
            start_m, off_h, off_z = _tile_of(t, num_m, B, H, CAUSAL)
            first_row = start_m * BLOCK_M
            n_blocks, n_full = _block_counts(first_row, N_Q, N_K, BLOCK_M, BLOCK_N, CAUSAL)
            mbarrier.wait(q_empty, (j & 1) ^ 1)
            _producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_full, k_empty, v_full, v_empty,
                      off_z, off_h, off_h // GROUP, first_row, n_blocks, base, BLOCK_N, STAGES, 1)  # fmt: skip
            base += n_blocks
            j += 1

    @gluon.jit
    def _consumer_persistent(
        q_smem, k_smem, v_smem, q_bar, q_empty, k_full, k_empty, v_full, v_empty, Out, LSE, qk_scale,
        stride_oz, stride_oh, stride_om, B, H, N_Q, N_K,
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
        CAUSAL: gl.constexpr, OVERLAP: gl.constexpr, num_warps: gl.constexpr,
    ):  # fmt: skip
        """The consumers over this program's tiles, in the producer's order: each tile as the one-tile kernel's,
        then Q handed back before the tile's output is stored (the next Q loads during the store)."""
        num_m = gl.cdiv(N_Q, BLOCK_M)
        base = 0
        j = 0
        for t in range(gl.program_id(0), num_m * B * H, gl.num_programs(0)):
            start_m, off_h, off_z = _tile_of(t, num_m, B, H, CAUSAL)
            first_row = start_m * BLOCK_M
            n_blocks, n_full = _block_counts(first_row, N_Q, N_K, BLOCK_M, BLOCK_N, CAUSAL)
            acc, m_i, l_i = _consumer(
                q_smem, k_smem, v_smem, q_bar, k_full, k_empty, v_full, v_empty, first_row, n_full, n_blocks,
                qk_scale, N_K, N_K - N_Q, base, j & 1, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, OVERLAP, num_warps,
            )  # fmt: skip
            _sync_warps()  # every warp's last wgmma on this Q retired
            mbarrier.arrive(q_empty, count=1)
            _store_tile(acc, m_i, l_i, Out, LSE, off_z, off_h, first_row, stride_oz, stride_oh, stride_om, H, N_Q,
                        BLOCK_M, HEAD_DIM)  # fmt: skip
            base += n_blocks
            j += 1

    @gluon.jit
    def _attn_fwd_gluon_persistent(
        q_desc, k_desc, v_desc, Out, LSE, qk_scale, stride_oz, stride_oh, stride_om, B, H, GROUP, N_Q, N_K,
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
        CAUSAL: gl.constexpr, OVERLAP: gl.constexpr, num_warps: gl.constexpr,
    ):  # fmt: skip
        """The one-tile kernel's partitions, looping over tiles t = program, program + programs, ... (one program
        per SM): the launch and the ring's fill are paid once per SM, not once per tile."""
        dtype: gl.constexpr = q_desc.dtype
        q_smem = gl.allocate_shared_memory(dtype, [1] + q_desc.block_type.shape, q_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        mbarrier.init(q_empty, count=1)
        for s in gl.static_range(STAGES):
            mbarrier.init(k_full.index(s), count=1)
            mbarrier.init(k_empty.index(s), count=1)
            mbarrier.init(v_full.index(s), count=1)
            mbarrier.init(v_empty.index(s), count=1)
        fence_async_shared()
        mma_layout: gl.constexpr = gl.NVMMASharedLayout(
            swizzle_byte_width=q_desc.layout.swizzle_byte_width, element_bitwidth=q_desc.layout.element_bitwidth
        )
        if _PUBLIC_REINTERPRET:
            q2 = q_smem.reinterpret(dtype, [BLOCK_M, HEAD_DIM], mma_layout)
            k2 = k_smem.reinterpret(dtype, [STAGES, BLOCK_N, HEAD_DIM], mma_layout)
            v2 = v_smem.reinterpret(dtype, [STAGES, BLOCK_N, HEAD_DIM], mma_layout)
        else:
            q2 = q_smem._reinterpret(dtype, [BLOCK_M, HEAD_DIM], mma_layout)
            k2 = k_smem._reinterpret(dtype, [STAGES, BLOCK_N, HEAD_DIM], mma_layout)
            v2 = v_smem._reinterpret(dtype, [STAGES, BLOCK_N, HEAD_DIM], mma_layout)
        gl.warp_specialize(
            [
                (
                    _consumer_persistent,
                    (q2, k2, v2, q_bar, q_empty, k_full, k_empty, v_full, v_empty, Out, LSE, qk_scale,
                     stride_oz, stride_oh, stride_om, B, H, N_Q, N_K,
                     BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, OVERLAP, num_warps),
                ),
                (
                    _producer_persistent,
                    (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, q_empty, k_full, k_empty, v_full,
                     v_empty, B, H, GROUP, N_Q, N_K, BLOCK_M, BLOCK_N, STAGES, CAUSAL),
                ),
            ],
            [1],
            [24],
        )  # fmt: skip

    @gluon.jit
    def _block_counts(first_row, N_Q, N_K, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
        """(key blocks the query tile starting at first_row visits, how many of them need no mask)."""
        shift = N_K - N_Q  # bottom-right causal: query row r sees keys up to r + shift
        if CAUSAL:
            hi = gl.minimum(N_K, first_row + BLOCK_M + shift)  # past the tile's last row's diagonal
            full_hi = gl.minimum(N_K, first_row + 1 + shift)  # every row of the tile sees keys below this
        else:
            hi = N_K
            full_hi = N_K
        return gl.cdiv(gl.maximum(hi, 0), BLOCK_N), gl.maximum(full_hi, 0) // BLOCK_N


def unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, need_cuda: bool = True) -> str | None:
    """Why this forward cannot take these tensors, or None: Gluon's Hopper API present, a Hopper GPU (unless
    ``need_cuda`` is False: the offline compile), (B, H, N, D) tensors of one half dtype, D 64 or 128, key/value
    heads dividing the query heads, and what TMA can address (contiguous rows, 16-byte-aligned bases and strides)."""
    if GLUON_MISSING is not None:
        return GLUON_MISSING
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            return f"{name} must be a 4-D (B, H, N, D) tensor, got {type(t).__name__} {getattr(t, 'shape', '')}"
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes must be one of bf16/fp16 and equal, got q {q.dtype}, k {k.dtype}, v {v.dtype}"
    B, H, N_Q, D = q.shape
    if D not in HEAD_DIMS or k.shape[-1] != D or v.shape[-1] != D:
        return f"head dim must be one of {HEAD_DIMS} for q, k and v, got {D}, {k.shape[-1]}, {v.shape[-1]}"
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] == 0 or H % k.shape[1]:
        return f"k and v must be (B, Hkv, Nk, D), Hkv dividing q's {H} heads: {tuple(k.shape)}, {tuple(v.shape)}"
    if min(N_Q, k.shape[2], B, H) == 0:
        return f"empty inputs: q {tuple(q.shape)}, k {tuple(k.shape)}"
    for name, t in (("q", q), ("k", k), ("v", v)):
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(s * size % 16 for s in t.stride()[:-1]):
            return f"{name} is not TMA-addressable (rows must be contiguous, base and strides 16-byte aligned)"
        if 0 in t.stride()[:-1]:  # an expanded tensor: a TMA descriptor's strides must be positive
            return f"{name} has a stride of 0 (expanded): strides {tuple(t.stride())}; pass it materialized"
    if need_cuda:
        if not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] != 9:
            return f"needs a Hopper (sm_90) GPU, got {q.device}"
        if k.device != q.device or v.device != q.device:
            return f"q, k, v on different devices: {q.device}, {k.device}, {v.device}"
    return None


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, need_cuda: bool = True) -> bool:
    return unsupported(q, k, v, need_cuda) is None


def _descriptor(t: torch.Tensor, rows: int) -> TensorDescriptor:
    """A 4-D TMA descriptor over t's (B, H, N, D) with (1, 1, rows, D) boxes: rows past N read as zero."""
    block = [1, 1, rows, t.shape[-1]]
    layout = gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16)
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block, layout)


def launch(q, k, v, causal: bool, softmax_scale: float, variant: str = "overlap", tile: dict | None = None):
    """Allocate the outputs and launch (no checks: ``forward`` checks; bench/sm90.py calls this on CPU tensors)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    B, H, N_Q, D = q.shape
    o = torch.empty_like(q)
    lse = torch.empty((B, H, N_Q), dtype=torch.float32, device=q.device)
    cfg = dict(tile or config(D))
    grid = (triton.cdiv(N_Q, cfg["BLOCK_M"]), H, B)
    common = (
        _descriptor(k, cfg["BLOCK_N"]), _descriptor(v, cfg["BLOCK_N"]),
        o, lse, softmax_scale * _LOG2E, o.stride(0), o.stride(1), o.stride(2),
        H, H // k.shape[1], N_Q, k.shape[2],
    )  # fmt: skip
    if variant == "persistent":
        # One program per SM; an offline compile (bench/sm90.py, CPU tensors) takes an H100's 132.
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 132
        _attn_fwd_gluon_persistent[(min(grid[0] * H * B, sms),)](
            _descriptor(q, cfg["BLOCK_M"]), *common[:-4], B, *common[-4:],
            HEAD_DIM=D, CAUSAL=bool(causal), OVERLAP=True, **cfg,
        )  # fmt: skip
    elif variant == "pingpong":  # two 4-warp consumer partitions, each with its own half of the query rows
        cfg["num_warps"] = 4
        _attn_fwd_gluon_pingpong[grid](
            _descriptor(q, cfg["BLOCK_M"] // 2), *common, HEAD_DIM=D, CAUSAL=bool(causal), **cfg
        )
    else:
        _attn_fwd_gluon[grid](
            _descriptor(q, cfg["BLOCK_M"]), *common, HEAD_DIM=D, CAUSAL=bool(causal), OVERLAP=variant == "overlap",
            **cfg,
        )  # fmt: skip
    return o, lse


def forward(q, k, v, causal: bool = True, softmax_scale: float | None = None, variant: str = "overlap"):
    """``(out, lse)`` as ``kernels.flash_attn.forward``'s first two results (base-2 lse); ValueError naming the
    reason where ``supports`` is False (the caller falls back to ``kernels.flash_attention``). ``variant``: one of
    ``VARIANTS`` (module docstring)."""
    reason = unsupported(q, k, v)
    if reason is not None:
        raise ValueError(f"the Gluon forward cannot run this: {reason}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    if not (isinstance(softmax_scale, (int, float)) and math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be a positive finite number, got {softmax_scale!r}")
    return launch(q, k, v, causal, float(softmax_scale), variant)


def _flops(B: int, H: int, N: int, D: int, causal: bool) -> float:
    """Two matmuls of 2 N^2 D flops per head; causal does half."""
    return 4.0 * B * H * N * N * D / (2 if causal else 1)


def bench_rows(head_dims, seq_lens, dtype=torch.bfloat16, tokens: int = 16384) -> list[dict]:
    """Per (D, N), causal (as ``providers.sdpa`` is): each Gluon variant, our pointer forward, SDPA's cuDNN and
    flash forwards; B * N = ``tokens``, H * D = 2048. Each Gluon output is checked against the pointer kernel's
    before it is timed (a variant that differs is recorded as failed and not timed)."""
    from chapter3_flash.kernels import flash_attn as fa

    from bench import providers
    from bench.common import measure

    rows = []
    for D in head_dims:
        for N in seq_lens:
            B, H = max(1, tokens // N), 2048 // D
            q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=dtype) for _ in range(3))
            causal = True
            spec = fa.Spec(causal, 0.0, D**-0.5)
            ref_o, ref_lse, _ = fa.forward(q, k, v, spec)
            candidates = {
                f"gluon_{variant}": lambda variant=variant: forward(q, k, v, causal, variant=variant)
                for variant in VARIANTS
            }
            candidates["pointer"] = lambda: fa.forward(q, k, v, spec)
            for name in ("CUDNN_ATTENTION", "FLASH_ATTENTION"):
                run = providers.sdpa(name)
                candidates[f"sdpa_{name.split('_')[0].lower()}"] = lambda run=run: run(q, k, v, 0.0)
            row = {"D": D, "N": N, "B": B, "H": H, "dtype": str(dtype).split(".")[-1], "causal": causal}
            for name, fn in candidates.items():
                try:
                    if name.startswith("gluon"):
                        o, lse = fn()
                        err = (o.float() - ref_o.float()).abs().max().item()
                        lse_err = (lse - ref_lse).abs().max().item()
                        row[f"{name}_max_err"], row[f"{name}_lse_err"] = err, lse_err
                        if not (err <= 2e-2 and lse_err <= 1e-3):  # bf16 rounding of O ~ 4e-3 at |O| <= 1
                            row[f"{name}_failed"] = "output differs from the pointer kernel's"
                            continue
                    t = measure(fn, "cuda")
                    row[f"{name}_ms"] = t.median
                    row[f"{name}_tflops"] = _flops(B, H, N, D, causal) / t.median / 1e9
                except providers.Unavailable as e:
                    row[f"{name}_failed"] = str(e)
            for name in (f"gluon_{variant}" for variant in VARIANTS):
                for base in ("pointer", "sdpa_cudnn"):
                    if f"{name}_ms" in row and f"{base}_ms" in row:
                        row[f"{name}_vs_{base}"] = row[f"{base}_ms"] / row[f"{name}_ms"]  # > 1: Gluon faster
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gluon_attention", description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write the rows here (rewritten after every row)")
    ap.add_argument("--head-dims", type=int, nargs="+", default=list(HEAD_DIMS), choices=HEAD_DIMS)
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    args = ap.parse_args(argv)
    hopper = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
    if not hopper or GLUON_MISSING is not None:
        print(f"needs a Hopper GPU and Gluon's Hopper API: {GLUON_MISSING or 'no Hopper (sm_90) device here'}")
        return 3
    from bench.common import metadata, save_json

    result = {"meta": metadata("cuda"), "rows": []}
    for D in args.head_dims:
        result["rows"] += bench_rows([D], args.seq_lens)
        save_json(args.json, result)
    return 1 if any(k.endswith("_failed") and k.startswith("gluon") for r in result["rows"] for k in r) else 0


if __name__ == "__main__":
    sys.exit(main())
