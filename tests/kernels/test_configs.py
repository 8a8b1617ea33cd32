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
