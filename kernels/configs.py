"""Tile sizes, warps and pipeline depth of every kernel: one flat table, keyed by what selects a row.

Fixed per (kernel, head-dim class, precision) rather than autotuned per sequence length, so a new N
never recompiles or re-benchmarks. Each row carries the reason it is what it is; the measurements
behind the reasons are in ``bench/NOTES.md`` (H200 runs), the static counts (registers, spills) from
``bench/sm90.py`` (Triton 3.6, sm_90). ``bench/tune.py`` times alternatives against these rows.

Head-dim class: the padded head dim ``BLOCK_D`` (a power of two >= 16) with everything up to 64 in
one class. Precision: ``half`` (fp16 / bf16), ``tf32`` (float32 with TF32 matmuls allowed) and
``ieee`` (float32 with exact products, PyTorch's default, whose FMA dots hold whole operand strips
in registers and need tiles of their own).

Two rules apply on top of the table, outside ``ieee``: with dropout the Philox words need registers
(4 warps spilled on an H200, run 1), and head dims off multiples of 16 load element-wise through
pointers (632 B of spills in the forward at head dim 40 with 4 warps, none with 8): both run 8 warps per
tile (the TMA kernels load whole tiles at any head dim and keep their rows).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Tile(NamedTuple):
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int


T = Tile
# kernel: "fwd" forward; "dq" and "dkdv" the deterministic two-kernel backward; "bwd" the one-pass backward
# (dK/dV per key tile, dQ by float32 atomics); "decode" the KV-cache kernel (kernels/decode.py).
TABLE: dict[tuple[str, int, str], Tile] = {
    # (kernel, head-dim class, precision):  tile            why
    ("fwd", 64, "half"): T(128, 64, 8, 3),  # 8 warps: 1.08x forward over 4 at N 4096 (run 2)
    ("fwd", 64, "tf32"): T(128, 32, 4, 3),  # 4-byte tiles: half the keys per stage of shared memory
    ("fwd", 64, "ieee"): T(64, 32, 8, 2),  # 94 registers, no spill (the TF32 tile spilled 992 B)
    ("fwd", 128, "half"): T(128, 64, 8, 3),  # run 2's tune: 128x128 0.98x, 64x64 0.76x
    ("fwd", 128, "tf32"): T(64, 32, 8, 3),
    ("fwd", 128, "ieee"): T(32, 16, 8, 2),  # 79 registers, no spill (was 696 B)
    ("fwd", 256, "half"): T(64, 32, 8, 2),  # two stages: operands of 256 columns fill shared memory
    ("fwd", 256, "tf32"): T(32, 32, 8, 2),
    ("fwd", 256, "ieee"): T(32, 32, 8, 2),  # 217 registers
    ("dq", 64, "half"): T(128, 64, 8, 3),  # 1.06x forward+backward over 128x32 with 4 warps (run 2)
    ("dq", 64, "tf32"): T(64, 32, 4, 3),
    ("dq", 64, "ieee"): T(64, 32, 8, 2),  # 120 registers, no spill (was 104 B)
    ("dq", 128, "half"): T(128, 64, 8, 3),  # 1.21x forward+backward over 128x32 (run 2)
    ("dq", 128, "tf32"): T(64, 32, 8, 2),
    ("dq", 128, "ieee"): T(32, 32, 8, 2),  # 168 registers (4 warps spilled 768 B with dropout)
    ("dq", 256, "half"): T(64, 32, 8, 2),  # two stages: 328 B of spills -> none
    ("dq", 256, "tf32"): T(32, 32, 8, 2),  # 424 B of spills -> none
    ("dq", 256, "ieee"): T(16, 16, 4, 2),  # 255 registers, 8 B of spills
    ("dkdv", 64, "half"): T(32, 128, 4, 3),  # run 2's best; 16 B of spills without dropout
    ("dkdv", 64, "tf32"): T(32, 64, 4, 3),
    ("dkdv", 64, "ieee"): T(16, 64, 8, 2),  # 104 registers, no spill (was 792 B)
    ("dkdv", 128, "half"): T(64, 128, 8, 3),  # 1.09x forward+backward over 32x128 (run 2)
    ("dkdv", 128, "tf32"): T(32, 64, 8, 2),  # 224 B of spills; 32x32 has none but loses wgmma
    ("dkdv", 128, "ieee"): T(16, 32, 4, 2),  # 168 registers (was 1200 B of spills)
    ("dkdv", 256, "half"): T(16, 64, 8, 2),  # 640 B of spills -> 24 B
    ("dkdv", 256, "tf32"): T(16, 32, 8, 1),
    ("dkdv", 256, "ieee"): T(16, 32, 8, 1),  # 104 B of spills with dropout
    # The one-pass backward: dK/dV's work plus the (BLOCK_M, D) share of dQ per tile; registers and spills
    # per thread from bench/sm90.py (Triton 3.6), dropout 0 / 0.1. Timings: bench/NOTES.md.
    ("bwd", 64, "half"): T(32, 128, 8, 3),  # 188 / 187 registers; 4 warps spilled 40 B
    ("bwd", 64, "tf32"): T(32, 64, 8, 3),  # 224 / 248, wgmma
    ("bwd", 64, "ieee"): T(16, 64, 8, 2),  # 108 / 142
    ("bwd", 128, "half"): T(32, 128, 8, 3),  # 244 / 255, no spill; 64x128 spilled 240 B
    ("bwd", 128, "tf32"): T(16, 32, 4, 2),  # 217 / 222, no spill but no wgmma; every wgmma tile spilled >= 104 B
    ("bwd", 128, "ieee"): T(16, 32, 8, 2),  # 127 / 140
    ("bwd", 256, "half"): T(16, 64, 8, 2),  # 24 / 96 B of spills, as dK/dV's row; no tile tried had none with wgmma
    ("bwd", 256, "tf32"): T(16, 32, 8, 1),  # 219 / 255, no spill
    ("bwd", 256, "ieee"): T(16, 16, 8, 1),  # 173 / 177; 16x32 spilled 24 B
    # The TMA forwards (bench/hopper.py, an experiment): the pointer forward's tiles.
    ("fwd_tma", 64, "half"): T(128, 64, 8, 3),
    ("fwd_tma", 64, "tf32"): T(128, 32, 4, 3),
    ("fwd_tma", 64, "ieee"): T(64, 32, 8, 2),
    ("fwd_tma", 128, "half"): T(128, 64, 8, 3),
    ("fwd_tma", 128, "tf32"): T(64, 32, 8, 3),
    ("fwd_tma", 128, "ieee"): T(32, 16, 8, 2),
    ("fwd_tma", 256, "half"): T(64, 32, 8, 2),
    ("fwd_tma", 256, "tf32"): T(32, 32, 8, 2),
    ("fwd_tma", 256, "ieee"): T(32, 32, 8, 2),
    # The KV-cache decode kernel: memory-bound, BLOCK_M is the packed query rows (set by the launcher, not
    # here); BLOCK_N keys per load, three loads in flight.
    ("decode", 64, "half"): T(16, 64, 4, 3),
    ("decode", 64, "tf32"): T(16, 64, 4, 3),
    ("decode", 64, "ieee"): T(16, 64, 4, 2),
    ("decode", 128, "half"): T(16, 64, 4, 3),
    ("decode", 128, "tf32"): T(16, 32, 4, 3),
    ("decode", 128, "ieee"): T(16, 32, 4, 2),
    ("decode", 256, "half"): T(16, 32, 4, 3),
    ("decode", 256, "tf32"): T(16, 32, 4, 2),
    ("decode", 256, "ieee"): T(16, 16, 4, 2),
}
# Narrow sliding windows (a query sees at most NARROW_WINDOW_KEYS keys): each forward program walks a few
# blocks, so its fixed cost (the q tile, the output, three short pipelined loops) weighs more than in a long
# causal row; small 4-warp tiles let several programs share an SM and hide it. H100, bench/tune.py, bf16,
# window 512 at N 16384 against the table's forward row in the same run (runs 5 and 6): head dim 64 1.59x,
# 128 1.27x (64x64: 1.22x; with 8 warps 0.62x), 256 2.08x; at window 2048, head dim 128, 64x64 still 1.07x.
# Rows apply without dropout and at head dims that load whole tiles (the rules below would change them). The
# backward's rows stay: no tile tried beat them by more than 3% at window 512.
NARROW_WINDOW_KEYS = 2048
WINDOW_TABLE: dict[tuple[str, int, str], Tile] = {
    ("fwd", 64, "half"): T(64, 32, 4, 3),
    ("fwd", 128, "half"): T(64, 32, 4, 3),
    ("fwd", 256, "half"): T(64, 32, 4, 2),  # the table's row with 4 warps instead of 8
}
# Under TRITON_INTERPRET: small tiles with BLOCK_M != BLOCK_N, so that small test inputs cross several
# blocks and an off-centre causal diagonal (and run in seconds).
INTERPRETER: dict[str, Tile] = {
    "fwd": T(32, 16, 4, 1),
    "dq": T(32, 16, 4, 1),
    "dkdv": T(16, 32, 4, 1),
    "bwd": T(16, 32, 4, 1),
    "decode": T(16, 16, 4, 1),
    "fwd_tma": T(32, 16, 4, 1),
}
# The dK/dV kernels' dropout bits: computed per lane (no exchange between lanes, twice the Philox work) up
# to this padded head dim; above it the registers are scarcer (56 B of spills at 128 against 8 B with the
# exchange, bench/sm90.py), so there the forward's grouping and one layout conversion.
PER_LANE_BITS_MAX_BLOCK_D = 64
# Kernels that load through TMA descriptors: no element-wise loads at any head dim.
_TMA_KERNELS = ("fwd_tma",)


# Which backward runs: the two-kernel one (dQ, then dK/dV; deterministic) or the one pass (dK/dV per key tile,
# dQ by float32 atomics, the dropout mask made once). At head dims 64 and 128 the two kernels were faster at
# every shape measured without dropout, and with dropout from 4096 keys on; the one pass with dropout at 1024
# keys, where making the mask once matters most (H100, run 3: bench/NOTES.md). At head dim 256 (Gemma 3) the
# second kernel's recomputed Q K^T and dO V^T are twice as long and every tile spills: Gemma 3's local block
# trained in 6.38 ms with the one pass (run 3) and 8.43 ms with the two kernels (run 6), the book's 6.6; so
# the one pass there (a prediction for bench.tune's "backward D256" experiment on the next GPU run).
ONE_PASS_MAX_KEYS_WITH_DROPOUT = 1024
ONE_PASS_MIN_BLOCK_D = 256


def one_pass_backward(dropout: bool, n_keys: int, head_dim: int) -> bool:
    """Whether a backward that need not be deterministic runs in one pass."""
    return block_d(head_dim) >= ONE_PASS_MIN_BLOCK_D or (dropout and n_keys <= ONE_PASS_MAX_KEYS_WITH_DROPOUT)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the launchers' host arithmetic: ``triton.cdiv`` is a constexpr function there, 2 us a
    call, and the decode kernel's split heuristic called it 250 times per step (bench/NOTES.md)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), without ``triton.next_power_of_2``'s call cost."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def block_d(head_dim: int) -> int:
    """The padded head dim: tl.dot needs every dimension >= 16; the load masks zero-pad the rest."""
    return max(16, next_power_of_2(head_dim))


def precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    if dtype == torch.float32:
        return "tf32" if allow_tf32 else "ieee"
    return "half"


def narrow_window(window_left: int, window_right: int) -> bool:
    """Whether a window (FlashAttention's (left, right), -1 unbounded) lets a query see at most
    NARROW_WINDOW_KEYS keys: then WINDOW_TABLE's rows apply."""
    return 0 <= window_left and 0 <= window_right and window_left + window_right + 1 <= NARROW_WINDOW_KEYS


def select(
    kernel: str, head_dim: int, prec: str, *, dropout: bool, interpret: bool, narrow: bool = False
) -> dict[str, int]:
    """The launch config of one kernel: BLOCK_M, BLOCK_N, num_warps, num_stages (keyword arguments).
    ``narrow``: the call's window is narrow (``narrow_window``)."""
    if interpret:
        return INTERPRETER[kernel]._asdict()
    key = (kernel, max(64, block_d(head_dim)), prec)
    element_wise_loads = head_dim % 16 and kernel not in _TMA_KERNELS
    if narrow and key in WINDOW_TABLE and not dropout and not element_wise_loads:
        return WINDOW_TABLE[key]._asdict()
    tile = TABLE[key]
    if prec != "ieee" and (dropout or element_wise_loads):
        tile = tile._replace(num_warps=8)
    return tile._asdict()
