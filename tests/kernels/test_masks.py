"""The visibility rule's one home (kernels/masks.py): the kernels' tile ranges against the host mask.

A tiny kernel writes what _key_range and _query_range return for every tile; each range must hold every
visible key (or query), its unmasked middle must be visible to the whole tile, and a window must cut the
work to about N * W.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from chapter3_flash.kernels.masks import _key_range, _query_range, visible_mask, window_flags
from helpers import DEVICE, visible


@triton.jit
def _store4(ptr, a, b, c, d):
    tl.store(ptr, a)
    tl.store(ptr + 1, b)
    tl.store(ptr + 2, c)
    tl.store(ptr + 3, d)


@triton.jit
def _ranges_kernel(
    KEYS,
    QUERIES,
    N_Q,
    N_K,
    left,
    right,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_LEFT: tl.constexpr,
    MASK_RIGHT: tl.constexpr,
):
    t = tl.program_id(0)
    if t * BLOCK_M < N_Q:
        _, lo, full_lo, full_hi, hi = _key_range(
            t * BLOCK_M, N_Q, N_K, left, right, BLOCK_M, BLOCK_N, MASK_LEFT, MASK_RIGHT
        )
        _store4(KEYS + 4 * t, lo, full_lo, full_hi, hi)
    if t * BLOCK_N < N_K:
        _, lo, full_lo, full_hi, hi = _query_range(
            t * BLOCK_N, N_Q, N_K, left, right, BLOCK_M, BLOCK_N, MASK_LEFT, MASK_RIGHT
        )
        _store4(QUERIES + 4 * t, lo, full_lo, full_hi, hi)


def ranges(n_q, n_k, causal, window, block_m, block_n):
    mask_left, mask_right, left, right = window_flags(causal, window)
    tiles = max(triton.cdiv(n_q, block_m), triton.cdiv(n_k, block_n))
    keys = torch.full((tiles, 4), -1, dtype=torch.int32, device=DEVICE)
    queries = torch.full((tiles, 4), -1, dtype=torch.int32, device=DEVICE)
    _ranges_kernel[(tiles,)](
        keys, queries, n_q, n_k, left, right,
        BLOCK_M=block_m, BLOCK_N=block_n, MASK_LEFT=mask_left, MASK_RIGHT=mask_right,
    )  # fmt: skip
    return keys[: triton.cdiv(n_q, block_m)].tolist(), queries[: triton.cdiv(n_k, block_n)].tolist()


CASES = [
    # (Nq, Nk, causal, window)
    (100, 100, True, (-1, -1)),  # plain causal
    (37, 77, True, (-1, -1)),  # Nq < Nk: the diagonal moves right
    (70, 30, True, (-1, -1)),  # Nq > Nk: rows that see nothing
    (90, 90, False, (-1, -1)),  # everything visible
    (130, 130, True, (16, -1)),  # sliding window
    (130, 100, False, (7, 3)),  # two-sided window, Nq > Nk
    (45, 140, False, (-1, 5)),  # right bound only
    (64, 64, True, (0, -1)),  # each query sees only itself
]


@pytest.mark.parametrize("n_q, n_k, causal, window", CASES + [(5, 9, True, (2, 7)), (9, 5, False, (0, 0))])
def test_the_host_mask_is_the_documented_rule(n_q, n_k, causal, window):
    assert torch.equal(visible_mask(n_q, n_k, causal=causal, window=window), visible(n_q, n_k, causal, window))


@pytest.mark.parametrize("block_m, block_n", [(16, 32), (32, 16), (64, 64)])
@pytest.mark.parametrize("n_q, n_k, causal, window", CASES)
def test_tile_ranges_follow_the_host_rule(n_q, n_k, causal, window, block_m, block_n):
    seen = visible(n_q, n_k, causal, window)  # the tests' own rule, not kernels.masks
    keys, queries = ranges(n_q, n_k, causal, window, block_m, block_n)
    for t, (lo, full_lo, full_hi, hi) in enumerate(keys):
        rows = seen[t * block_m : (t + 1) * block_m]  # (<= BLOCK_M, Nk)
        # A tile whose rows see no key at all can end below 0: then every segment is empty.
        assert lo <= full_lo <= full_hi <= max(hi, full_lo) and lo % block_n == 0
        cols = rows.any(0).nonzero().flatten().tolist()
        assert all(lo <= j < hi for j in cols), f"query tile {t}: a visible key outside [{lo}, {hi})"
        assert rows[:, full_lo:full_hi].all(), f"query tile {t}: [{full_lo}, {full_hi}) is not visible to every row"
        assert full_lo % block_n == 0 or full_lo == hi
    for t, (lo, full_lo, full_hi, hi) in enumerate(queries):
        cols = seen[:, t * block_n : (t + 1) * block_n]  # (Nq, <= BLOCK_N)
        assert lo <= full_lo <= full_hi <= hi and all(x % block_m == 0 for x in (lo, full_lo, full_hi, hi))
        rows = cols.any(1).nonzero().flatten().tolist()
        assert all(lo <= i < hi for i in rows), f"key tile {t}: a query that sees it outside [{lo}, {hi})"
        assert cols[full_lo:full_hi].all(), f"key tile {t}: rows [{full_lo}, {full_hi}) do not see all of it"


def test_a_window_cuts_the_work_to_n_times_w():
    n, w, block = 1024, 32, 32
    full, _ = ranges(n, n, True, (-1, -1), block, block)
    windowed, _ = ranges(n, n, True, (w - 1, -1), block, block)
    tiles = lambda rs: sum(triton.cdiv(hi - lo, block) for lo, _, _, hi in rs)
    # Causal: about (N / block)^2 / 2 key tiles; window: about N / block * (W / block + 1).
    assert tiles(full) >= 500 and tiles(windowed) <= 2 * (n // block) * (w // block + 1)


def test_host_mask_matches_the_books_sliding_window():
    # ch04/06_swa and Gemma 3: masked where j > i or i - j >= W, i.e. window (W - 1, 0).
    n, w = 12, 4
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    book = (j > i) | (i - j >= w)
    assert torch.equal(visible_mask(n, n, causal=True, window=(w - 1, -1)), ~book)
