"""Every tile configuration the GPU uses or the tuning experiments try is correct, checked here too.

The interpreter normally runs small fixed tiles; these tests swap in the GPU's configs (and the
candidates of bench/tune.py) so a tile-size-dependent bug in the causal bounds, the ragged tails or
the dropout bits shows on a CPU before any GPU time is spent.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_flash_attention import check_against_reference, make_qkv

import kernels.flash_attn as fa
from bench.tune import VARIANTS
from kernels import flash_attention


def _gpu_config_sets():
    """(id, {kernel: config}) for each padded head dim and element size the GPU distinguishes."""
    sets = []
    for block_d, head_dim in ((64, 40), (128, 80), (256, 200)):
        for wide, dtype in ((False, torch.float16), (True, torch.float32)):
            cfgs = fa._base_configs(block_d, torch.float32 if wide else torch.float16)
            sets.append(pytest.param(head_dim, dtype, cfgs, id=f"d{block_d}-{'fp32' if wide else 'half'}"))
        cfgs = fa._ieee_configs(block_d)  # float32 with exact products (TF32 not allowed)
        sets.append(pytest.param(head_dim, torch.float32, cfgs, id=f"d{block_d}-fp32-ieee"))
    return sets


def _tune_config_sets():
    sets = []
    for i, (kernel, override) in enumerate(VARIANTS):
        for block_d, head_dim in ((64, 64), (128, 128)):
            cfgs = copy.deepcopy(fa._base_configs(block_d, torch.float16))
            cfgs[kernel] = dict(override)
            sets.append(pytest.param(head_dim, torch.float16, cfgs, id=f"tune{i}-{kernel}-d{block_d}"))
    return sets


@pytest.mark.parametrize("head_dim, dtype, cfgs", _gpu_config_sets() + _tune_config_sets())
def test_config_is_correct(head_dim, dtype, cfgs, monkeypatch):
    monkeypatch.setattr(fa, "_configs", lambda *args, **kwargs: copy.deepcopy(cfgs))
    # Grouped heads, Nq < Nk, both ragged against every block size used.
    check_against_reference(*make_qkv(1, 4, 2, 150, 190, head_dim, dtype), causal=True)


def test_dropout_bits_do_not_depend_on_tiles(monkeypatch):
    q, k, v = make_qkv(1, 2, 1, 140, 200, 64, torch.float32)
    outs = []
    for cfgs in (None, fa._base_configs(64, torch.float16), fa._base_configs(64, torch.float32), fa._ieee_configs(64)):
        if cfgs is not None:
            monkeypatch.setattr(fa, "_configs", lambda *args, c=cfgs, **kwargs: copy.deepcopy(c))
        torch.manual_seed(9)
        outs.append(flash_attention(q, k, v, causal=True, dropout_p=0.3, backend="triton"))
    for other in outs[1:]:
        torch.testing.assert_close(other, outs[0], atol=1e-5, rtol=1e-5)


def test_config_choice_on_a_gpu(monkeypatch):
    # What the launchers ask for on a GPU (the interpreter always runs its own small tiles).
    monkeypatch.setattr(fa, "_INTERPRET", False)
    half = fa._configs(64, torch.float16, False)
    assert half == fa._base_configs(64, torch.float16)
    # Exact float32 products (TF32 not allowed) get the FMA dots' own spill-free tiles.
    for block_d in (16, 64, 128, 256):
        assert fa._configs(block_d, torch.float32, False, ieee=True) == fa._ieee_configs(block_d)
    # Dropout's Philox words and the element-wise loads of head dims off multiples of 16: 8 warps.
    for cfgs in (fa._configs(64, torch.float16, True), fa._configs(64, torch.float16, False, aligned=False)):
        assert all(cfg["num_warps"] == 8 for cfg in cfgs.values())
        assert {k: {**c, "num_warps": 0} for k, c in cfgs.items()} == {
            k: {**c, "num_warps": 0} for k, c in half.items()
        }
    q = torch.zeros(1, 1, 8, 40)
    flags = fa._kernel_flags(q, causal=True, dropout_p=0.0)
    assert all(cfg["num_warps"] == 8 for cfg in fa._kernel_configs(q, flags).values())


@pytest.mark.parametrize("block_d", [16, 32, 64, 128, 256])
def test_every_tile_fits_the_dropout_bits(block_d, monkeypatch):
    # The dropout bits are grouped by 16 rows and 16 keys: every tile edge must be a multiple of 16.
    monkeypatch.setattr(fa, "_INTERPRET", False)
    tables = [fa._base_configs(block_d, dtype) for dtype in (torch.float16, torch.float32)]
    for cfgs in tables + [fa._ieee_configs(block_d)]:
        for name, cfg in cfgs.items():
            assert cfg["BLOCK_M"] % 16 == 0 and cfg["BLOCK_N"] % 16 == 0, (name, cfg)
