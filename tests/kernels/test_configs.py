"""Every tile configuration the GPU uses or the tuning experiments try is correct, checked here too.

The interpreter normally runs its own small tiles; these tests build the configs exactly as a GPU run
selects them (``configs.select(..., interpret=False)``) and run those tiles through the interpreter, so
a tile-size-dependent bug in the ranges, the ragged tails or the dropout bits shows on a CPU before any
GPU time is spent.
"""

from __future__ import annotations

import chapter3_flash.kernels.flash_attn as fa
import pytest
import torch
from chapter3_flash.kernels import configs, flash_attention
from helpers import allow_tf32, backward_path, check_against_reference, make_qkv

from bench.tune import EXPERIMENTS

# (head dim, dtype, TF32 allowed): one per head-dim class and precision the GPU tells apart.
CASES = [
    (head_dim, dtype, tf32)
    for head_dim in (40, 80, 200)  # classes 64 (not a multiple of 16: 8 warps), 128, 256
    for dtype, tf32 in ((torch.float16, False), (torch.float32, True), (torch.float32, False))
]


_SELECT, _PLAN = configs.select, fa._plan  # the real ones, whatever a test has patched since

# Every (kernel, tile) the tuning experiments try, once, with the experiment's head dim and whether it is windowed.
CANDIDATES = list(
    dict.fromkeys(
        (kernel, tuple(tile.items()), shape[3], window != (-1, 0))
        for _, shape, window, variants in EXPERIMENTS
        for kernel, tile in variants
    )
)


def _as_on_a_gpu(monkeypatch, override: dict | None = None):
    """Make the launchers pick the GPU's tiles (optionally one kernel's replaced) under the interpreter:
    the config table is asked as a GPU run asks it, and the launchers' cached plans are dropped."""

    def gpu_select(kernel, head_dim, prec, *, dropout, interpret, narrow=False):
        if override and kernel in override:
            return dict(override[kernel])
        return _SELECT(kernel, head_dim, prec, dropout=dropout, interpret=False, narrow=narrow)

    monkeypatch.setattr(configs, "select", gpu_select)
    _PLAN.cache_clear()
    seen = []
    real_plan = _PLAN

    def plan_spy(kernel, head_dim, dtype, allow_tf32, causal, dropout_p, scale, left=-1, right=-1, softcap=0.0):
        out = real_plan(kernel, head_dim, dtype, allow_tf32, causal, dropout_p, scale, left, right, softcap)
        if kernel is not None:
            prec = configs.precision(dtype, allow_tf32)
            narrow = 0 <= left and (causal or 0 <= right) and configs.narrow_window(left, 0 if causal else right)
            expected = gpu_select(kernel, head_dim, prec, dropout=dropout_p > 0, interpret=False, narrow=narrow)
            seen.append((kernel, all(out[key] == value for key, value in expected.items())))
        return out

    monkeypatch.setattr(fa, "_plan", plan_spy)
    return seen


@pytest.fixture(autouse=True)
def _fresh_plans():
    _PLAN.cache_clear()
    yield
    _PLAN.cache_clear()


def _id(case):
    head_dim, dtype, tf32 = case
    return f"d{head_dim}-{str(dtype).removeprefix('torch.')}{'-tf32' if tf32 else ''}"


@pytest.mark.parametrize("backward", ["one-pass", "two-kernel"])
@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_gpu_tiles_are_correct(case, backward, monkeypatch):
    head_dim, dtype, tf32 = case
    seen = _as_on_a_gpu(monkeypatch)
    # Grouped heads, Nq < Nk, both ragged against every block size used.
    with allow_tf32(tf32):
        check_against_reference(*make_qkv(1, 4, 2, 150, 190, head_dim, dtype), causal=True, backward=backward)
    assert seen and all(ok for _, ok in seen), f"a launch did not use the GPU's tile: {seen}"


@pytest.mark.parametrize("head_dim", [128, 64, 256, 200])
def test_gpu_tiles_are_correct_with_a_narrow_window(head_dim, monkeypatch):
    # WINDOW_TABLE's rows where they apply (half precision, whole-tile head dims), the table's elsewhere (200:
    # element-wise loads); the window (37 keys back) crosses several of the GPU's blocks, left edges included.
    seen = _as_on_a_gpu(monkeypatch)
    q, k, v = make_qkv(1, 4, 2, 150, 190, head_dim, torch.float16)
    check_against_reference(q, k, v, causal=True, window=(37, -1), backward="two-kernel")
    # Two-sided and not causal (narrow too), more queries than keys: rows past the keys' end, right edges.
    q, k, v = make_qkv(1, 2, 1, 130, 90, head_dim, torch.float16)
    check_against_reference(q, k, v, causal=False, window=(21, 40), backward="one-pass")
    assert seen and all(ok for _, ok in seen), f"a launch did not use the GPU's tile: {seen}"


@pytest.mark.parametrize(
    "kernel, override, head_dim, windowed",
    CANDIDATES,
    ids=[f"tune{i}-{c[0]}-d{c[2]}{'-window' if c[3] else ''}" for i, c in enumerate(CANDIDATES)],
)
def test_tuning_candidates_are_correct(kernel, override, head_dim, windowed, monkeypatch):
    _as_on_a_gpu(monkeypatch, {kernel: dict(override)})
    check_against_reference(
        *make_qkv(1, 4, 2, 150, 190, head_dim, torch.float16),
        causal=True,
        window=(37, -1) if windowed else (-1, -1),
        backward="two-kernel" if kernel in ("dq", "dkdv") else "one-pass",
    )


def test_dropout_bits_do_not_depend_on_tiles(monkeypatch):
    q, k, v = make_qkv(1, 2, 1, 140, 200, 64, torch.float32)
    tile_sets = [None, (torch.float16, False), (torch.float32, True), (torch.float32, False)]
    seen, outs = set(), []
    for choice in tile_sets:
        if choice is None:  # the interpreter's own tiles
            tiles = {name: configs.INTERPRETER[name]._asdict() for name in ("fwd", "dq", "dkdv", "bwd")}
        else:
            dtype, tf32 = choice
            prec = configs.precision(dtype, tf32)
            tiles = {name: _SELECT(name, 64, prec, dropout=True, interpret=False) for name in ("fwd", "dq", "bwd")}
            _as_on_a_gpu(monkeypatch, {name: tiles[name] for name in tiles})
        seen.add(tuple(sorted((n, tuple(t.values())) for n, t in tiles.items())))
        for path in ("one-pass", "two-kernel"):
            qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
            torch.manual_seed(9)
            with backward_path(path):
                out = flash_attention(qq, kk, vv, causal=True, dropout_p=0.3, backend="triton")
                out.backward(torch.ones_like(out))
            outs.append((out, qq.grad, kk.grad, vv.grad))
    assert len(seen) == len(tile_sets), "the tile sets compared must differ"
    for other in outs[1:]:
        for a, b in zip(other, outs[0]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_config_choice_rules():
    half = configs.select("fwd", 64, "half", dropout=False, interpret=False)
    assert half == configs.TABLE[("fwd", 64, "half")]._asdict()
    # Head dims 1..64 share one class; exact float32 gets the FMA dots' own tiles.
    assert (
        configs.select("dq", 16, "half", dropout=False, interpret=False) == configs.TABLE[("dq", 64, "half")]._asdict()
    )
    for kernel in ("fwd", "dq", "dkdv", "bwd"):
        for d in (16, 64, 128, 256):
            ieee = configs.select(kernel, d, "ieee", dropout=True, interpret=False)
            assert ieee == configs.TABLE[(kernel, max(64, configs.block_d(d)), "ieee")]._asdict()
    # Dropout's Philox words and the element-wise loads of head dims off multiples of 16: 8 warps.
    for cfg in (
        configs.select("fwd", 64, "half", dropout=True, interpret=False),
        configs.select("bwd", 40, "half", dropout=False, interpret=False),
    ):
        assert cfg["num_warps"] == 8
    assert configs.select("fwd", 64, "half", dropout=False, interpret=True) == configs.INTERPRETER["fwd"]._asdict()
    # A narrow window's own rows: only where the table has one, without dropout, at whole-tile head dims.
    window_row = configs.WINDOW_TABLE[("fwd", 128, "half")]._asdict()
    assert configs.select("fwd", 128, "half", dropout=False, interpret=False, narrow=True) == window_row
    assert configs.select("fwd", 128, "half", dropout=False, interpret=False) != window_row
    assert configs.select("fwd", 128, "half", dropout=True, interpret=False, narrow=True) != window_row
    assert configs.select("fwd", 120, "half", dropout=False, interpret=False, narrow=True) != window_row
    assert configs.select("dq", 128, "half", dropout=False, interpret=False, narrow=True) == configs.select(
        "dq", 128, "half", dropout=False, interpret=False
    )
    # The backward's path: the one pass at head dims padded to 256, or with dropout on short sequences.
    assert configs.one_pass_backward(False, 4096, 256) and configs.one_pass_backward(False, 100, 200)
    assert not configs.one_pass_backward(False, 4096, 128) and not configs.one_pass_backward(False, 100, 64)
    assert configs.one_pass_backward(True, 1024, 64) and not configs.one_pass_backward(True, 1025, 64)
    limit = configs.NARROW_WINDOW_KEYS
    assert configs.narrow_window(limit - 1, 0) and configs.narrow_window(511, 0) and configs.narrow_window(100, 100)
    assert not configs.narrow_window(limit, 0) and not configs.narrow_window(-1, 0) and not configs.narrow_window(5, -1)
    assert [configs.block_d(d) for d in (1, 16, 17, 64, 65, 256)] == [16, 16, 32, 64, 128, 256]


def test_every_tile_fits_the_dropout_bits():
    # The dropout bits are grouped by 16 rows and 16 keys: every tile edge must be a multiple of 16.
    for key, tile in list(configs.TABLE.items()) + list(configs.INTERPRETER.items()):
        assert tile.BLOCK_M % 16 == 0 and tile.BLOCK_N % 16 == 0, (key, tile)
    for key, tile in configs.WINDOW_TABLE.items():
        assert tile.BLOCK_M % 16 == 0 and tile.BLOCK_N % 16 == 0, (key, tile)
    for kernel, override, *_ in CANDIDATES:
        assert dict(override)["BLOCK_M"] % 16 == 0 and dict(override)["BLOCK_N"] % 16 == 0, (kernel, override)


def test_every_kernel_has_a_row_for_every_class_and_precision():
    for kernel in ("fwd", "dq", "dkdv", "bwd", "decode"):
        for d in (64, 128, 256):
            for prec in ("half", "tf32", "ieee"):
                assert (kernel, d, prec) in configs.TABLE, (kernel, d, prec)
