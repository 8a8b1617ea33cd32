"""Which keys a query sees: the one home of the visibility rule, in the kernels and on the host.

The rule (FlashAttention's, bottom-right aligned): query ``i`` of ``Nq`` sits at position
``i' = i + (Nk - Nq)`` of a sequence of ``Nk`` keys (the ``Nq`` queries are its newest positions: a
KV cache, chunked prefill) and sees key ``j`` when

    i' - left <= j <= i' + right,        0 <= j < Nk

with ``left = -1`` / ``right = -1`` meaning unbounded on that side. ``causal=True`` is ``right = 0``.
A query row that sees no key returns zeros and gets zero gradients.

In the kernels the two bounds are run-time integers switched on by constexpr flags (``MASK_LEFT``,
``MASK_RIGHT``), so a window size never recompiles and the unwindowed kernels carry no window code.
Three helpers share the rule, in the manner of FlashAttention-3's ``block_info`` and ``mask``:

- ``_key_range``: the keys a query tile may see, split into blocks that need the in-tile mask and
  the blocks every row of the tile sees whole (no mask, no bound checks);
- ``_query_range``: the same from a key tile's side (the backward walks query tiles per key tile);
- ``_visible``: the in-tile mask, for any orientation (rows and columns broadcast).

On the host, ``visible_mask`` builds the same rule as a ``(Nq, Nk)`` bool tensor: the eager path,
the tests and the benchmarks' references all use it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def window_flags(causal: bool, window: tuple[int, int]) -> tuple[bool, bool, int, int]:
    """(MASK_LEFT, MASK_RIGHT, left, right) for the kernels: causal makes the right side 0."""
    left, right = window
    if causal:
        right = 0
    return left >= 0, right >= 0, max(left, 0), max(right, 0)


def visible_mask(n_q: int, n_k: int, *, causal: bool, window: tuple[int, int] = (-1, -1), device=None) -> torch.Tensor:
    """``(n_q, n_k)`` bool, True where query ``i`` sees key ``j`` (bottom-right aligned)."""
    mask_left, mask_right, left, right = window_flags(causal, window)
    pos = torch.arange(n_q, device=device)[:, None] + (n_k - n_q)  # (n_q, 1): i' = i + Nk - Nq
    keys = torch.arange(n_k, device=device)[None, :]  # (1, n_k)
    seen = torch.ones(n_q, n_k, dtype=torch.bool, device=device)
    if mask_right:
        seen &= keys <= pos + right
    if mask_left:
        seen &= keys >= pos - left
    return seen


@triton.jit
def _visible(
    rows, cols, N_K, diag, left, right, MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, KEY_BOUND: tl.constexpr
):
    """True where query row ``rows`` sees key ``cols`` (broadcast against each other: a (M, N) tile or its
    (N, M) transpose). ``diag = N_K - N_Q``. KEY_BOUND=False skips ``cols < N_K`` where keys past the end
    are harmless (zero-loaded K and V rows whose gradients are never stored)."""
    if KEY_BOUND:
        seen = cols < N_K
        if MASK_RIGHT:
            seen = seen & (cols <= rows + (diag + right))
    elif MASK_RIGHT:
        seen = cols <= rows + (diag + right)
    else:
        seen = cols >= 0
    if MASK_LEFT:
        seen = seen & (cols >= rows + (diag - left))
    return seen


@triton.jit
def _key_range(
    row0,
    N_Q,
    N_K,
    left,
    right,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_LEFT: tl.constexpr,
    MASK_RIGHT: tl.constexpr,
):
    """Keys the query tile rows ``row0 + [0, BLOCK_M)`` read, as ``lo <= full_lo <= full_hi <= hi``:
    ``[lo, full_lo)`` and ``[full_hi, hi)`` need the in-tile mask (the window's left edge; the causal
    diagonal, the window's right edge and the ragged end), ``[full_lo, full_hi)`` is whole blocks that
    every row of the tile sees, inside ``N_K``. All but ``hi`` are multiples of BLOCK_N; for a tile whose rows
    see no key at all ``hi`` may fall below 0, and every segment is empty.

    The first row of the tile has the smallest right bound and the last (real) row the largest left
    bound, so those two decide what is whole."""
    diag = N_K - N_Q
    if MASK_RIGHT:
        hi = tl.minimum(N_K, row0 + BLOCK_M + diag + right)
        full_hi = tl.minimum(row0 + diag + right + 1, hi)
    else:
        hi = N_K
        full_hi = N_K
    full_hi = tl.maximum(full_hi, 0) // BLOCK_N * BLOCK_N
    if MASK_LEFT:
        # Only here the clamps that keep lo <= full_lo <= full_hi <= hi: without a window the bounds above
        # already hold them, and the kernels' loop bounds stay as simple as they were (the compiler's
        # register allocation in the dropout forward moved by 37 registers with them, bench/sm90.py).
        last = tl.minimum(row0 + BLOCK_M, N_Q) - 1  # the tile's last real query row
        lo = tl.maximum(row0 + diag - left, 0) // BLOCK_N * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(last + diag - left, 0), BLOCK_N) * BLOCK_N
        hi = tl.maximum(hi, lo)
        full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
        full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    else:
        lo = 0
        full_lo = 0
    return diag, lo, full_lo, full_hi, hi


@triton.jit
def _query_range(
    col0,
    N_Q,
    N_K,
    left,
    right,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_LEFT: tl.constexpr,
    MASK_RIGHT: tl.constexpr,
):
    """Query rows that read the key tile ``col0 + [0, BLOCK_N)``, as ``lo <= full_lo <= full_hi <= hi``
    (multiples of BLOCK_M): ``[full_lo, full_hi)`` sees every key of the tile, the rest needs the mask.
    Rows past ``N_Q`` load zeros and a +inf log-sum-exp (their weights are exactly 0), so the end rounds
    up to whole blocks without a mask."""
    diag = N_K - N_Q
    m_end = tl.cdiv(N_Q, BLOCK_M) * BLOCK_M
    if MASK_RIGHT:
        # Query i sees key j from i >= j - right - diag on: the tile's first key decides where the band
        # starts, its last where every key of the tile is seen.
        lo = tl.maximum(col0 - right - diag, 0) // BLOCK_M * BLOCK_M
        full_lo = tl.cdiv(tl.maximum(col0 + BLOCK_N - 1 - right - diag, 0), BLOCK_M) * BLOCK_M
        full_lo = tl.minimum(tl.maximum(full_lo, lo), m_end)
    else:
        lo = 0
        full_lo = 0
    hi = m_end
    full_hi = m_end
    if MASK_LEFT:
        # Query i sees key j up to i <= j + left - diag: the first key decides where every key is seen no
        # more, the last where the band ends. Clamps only here, as in _key_range.
        last = tl.minimum(col0 + BLOCK_N, N_K) - 1  # the tile's last real key
        hi = tl.cdiv(tl.minimum(tl.maximum(last + left - diag + 1, 0), N_Q), BLOCK_M) * BLOCK_M
        full_hi = tl.maximum(col0 + left - diag + 1, 0) // BLOCK_M * BLOCK_M
        lo = tl.minimum(lo, m_end)
        hi = tl.maximum(hi, lo)
        full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
        full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return diag, lo, full_lo, full_hi, hi
