"""Dropout inside the kernels: which attention weights are kept, by a documented Philox counter.

Weight ``(b, h, i, j)`` (batch, query head, query row, key) is kept with probability ``1 - p`` and then
scaled by ``1 / (1 - p)``: exactly ``nn.Dropout`` applied to the softmax's output. Its keep bit comes
from Philox4x32-7 keyed by a 64-bit seed drawn per call. One Philox call yields four 32-bit words,
split into eight 16-bit numbers, which decide the eight weights rows ``{i, i + 8}`` by keys
``{j, j + 1, j + 8, j + 9}`` with ``i % 16 < 8``, ``j % 16 < 8``, ``j`` even: the eight weights one
thread of a Hopper wgmma accumulator holds, so the bits land in the registers that use them. The
counter of that call is

    (c0, c1, c2, c3) = ((j // 16) * 4 + (j % 8) // 2,  (i // 16) * 8 + i % 8,  b * Hq + h,  0)

and weight (row + 8r, key + k + 8s), r, s, k in {0, 1}, reads 16-bit half ``k`` (low for the even
key) of word ``2r + s``. A weight is kept when its number is ``>= round(p * 2^16)``, so ``p`` acts
rounded to a multiple of ``2^-16``; ``p = 1`` keeps nothing. The bits depend on the position only,
never on tile sizes or launch order: the backward regenerates the forward's mask, nothing of size
``N^2`` is stored, and ``tests/kernels/test_dropout.py`` recomputes the mask in numpy from this text.

The seed is drawn from PyTorch's default generator of the input's device on every call, inside the
op: reproducible under ``torch.manual_seed``, the same bits eager and under ``torch.compile``, and a
fresh seed on every replay of a captured CUDA graph (PyTorch's CUDA generator is graph-safe).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# The smallest Philox4x32 that passes TestU01's BigCrush (Salmon et al., SC'11). A constexpr: kernels may
# read module globals only as constexprs (Triton 3.6 rejects plain ones).
PHILOX_ROUNDS = tl.constexpr(7)


def keep_threshold(dropout_p: float) -> int:
    """Keep a weight when its 16-bit number is >= this: p rounded to the nearest multiple of 2^-16
    (< 7.7e-6 off), never up to 1 unless it is 1 (then nothing is kept, as nn.Dropout)."""
    return 2**16 if dropout_p == 1.0 else min(round(dropout_p * 2**16), 2**16 - 1)


def keep_scale(dropout_p: float) -> float:
    """The kept weights' scale; p = 1 keeps nothing, and 0 (not inf) keeps 0 * scale from turning into NaN."""
    return 0.0 if dropout_p == 1.0 else 1.0 / (1.0 - dropout_p)


def new_seed(device: torch.device, dropout_p: float) -> torch.Tensor:
    """A 62-bit seed on the input's device, from its default generator: advances it, honours
    manual_seed, and stays on the device (no host sync, capturable in a CUDA graph)."""
    if dropout_p == 0.0:
        return torch.empty(1, dtype=torch.int64, device=device)  # never read: no fill kernel
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


@triton.jit
def _philox_words(seed, c0, c1, off_zh):
    """Philox4x32-7 on the counters (c0, c1, b * Hq + h, 0), c0 and c1 broadcast against each other:
    four 32-bit words per position."""
    c0, c1 = tl.broadcast(c0.to(tl.uint32), c1.to(tl.uint32))
    c3 = tl.zeros_like(c0)
    return tl.philox(seed, c0, c1, c3 + off_zh.to(tl.uint32), c3, n_rounds=PHILOX_ROUNDS)


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
    """Keep mask of query rows ``row0 + [0, BLOCK_M)`` by keys ``start_n + [0, BLOCK_N)``, (BLOCK_M, BLOCK_N),
    or (BLOCK_N, BLOCK_M) with TRANS (the backward's keys-by-queries orientation). ``row0`` and
    ``start_n`` are multiples of 16. PER_LANE (with TRANS): computed the way a keys-by-queries
    accumulator holds the bits, without exchanging them between lanes, at twice the Philox work.
    The bits are the same either way."""
    if TRANS and PER_LANE:
        keep = _keep_keys_by_queries(seed, off_zh, row0, start_n, threshold, BLOCK_M, BLOCK_N)
    else:
        keep = _keep_mma_groups(seed, off_zh, row0, start_n, threshold, BLOCK_M, BLOCK_N, TRANS)
    return keep


@triton.jit
def _keep_mma_groups(
    seed, off_zh, row0, start_n, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TRANS: tl.constexpr
):
    """One Philox call per eight weights, joined straight into the accumulator's layout: no layout
    conversion through shared memory in the forward and dQ kernels."""
    tl.static_assert(BLOCK_M % 16 == 0)
    tl.static_assert(BLOCK_N % 16 == 0)
    rows = row0 // 2 + tl.arange(0, BLOCK_M // 2)
    keys = start_n // 4 + tl.arange(0, BLOCK_N // 4)
    r0, r1, r2, r3 = _philox_words(seed, keys[None, :], rows[:, None], off_zh)  # (M/2, N/4)
    # P(bits >= threshold) = 1 - threshold / 2^16 = 1 - dropout_p.
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
def _keep_keys_by_queries(seed, off_zh, row0, start_n, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The same bits as _keep_mma_groups(TRANS=True), (BLOCK_N, BLOCK_M), laid out as a keys-by-queries
    accumulator holds them: a thread holds keys {j, j + 8} of queries {i, i + 8}, but key j + 1 sits in
    another lane. So each key parity runs its own Philox call and keeps its half of each word: nothing
    crosses lanes, for twice the forward's Philox work (the register cost decides where it pays: the
    config table's ``per_lane_bits``)."""
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
