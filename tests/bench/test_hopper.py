"""The Hopper forward variants (bench/hopper.py, an experiment outside the package: TMA loads, a persistent grid)
compute the same attention as the pointer kernel: output and log-sum-exp, against float64 by the suite's rule."""

from __future__ import annotations

import pytest
import torch
from chapter3_flash.kernels import flash_attn as fa
from helpers import DEVICE, assert_close_to_reference, attention_eager, make_qkv, requires_gpu

from bench import hopper


@pytest.mark.parametrize("variant", hopper.VARIANTS[1:])
@pytest.mark.parametrize(
    "shape, dtype, causal, window",
    [
        pytest.param((2, 4, 2, 70, 53, 40), torch.float16, True, (-1, -1), id="gqa-ragged-d40"),  # TMA zero-fills
        pytest.param((1, 2, 2, 100, 100, 64), torch.bfloat16, True, (-1, -1), id="causal-bf16"),
        pytest.param((1, 2, 2, 64, 90, 128), torch.float16, False, (-1, -1), id="full-d128"),
        pytest.param((1, 2, 1, 80, 80, 16), torch.float16, True, (10, -1), id="window"),
        pytest.param((1, 2, 2, 70, 30, 32), torch.float16, True, (-1, -1), id="nq-gt-nk"),  # rows that see nothing
        pytest.param((1, 2, 2, 50, 50, 32), torch.float32, True, (-1, -1), id="fp32"),
    ],
)
def test_variant_matches_reference_and_pointer_kernel(shape, dtype, causal, window, variant):
    q, k, v = make_qkv(*shape, dtype)
    spec = fa.Spec(causal, 0.0, shape[-1] ** -0.5, window[0], window[1])
    assert hopper.supports(q, k, v, spec, variant)
    out, lse, _ = hopper.forward(q, k, v, spec, variant)
    ref64 = attention_eager(q.double(), k.double(), v.double(), causal, window=window)
    assert_close_to_reference("out", out, ref64, attention_eager(q, k, v, causal, window=window))
    _, lse_pointer, _ = fa.forward(q, k, v, spec)
    torch.testing.assert_close(lse, lse_pointer, atol=1e-4, rtol=1e-5)  # the backward reads it


def test_supports_only_what_tma_can_address():
    q, k, v = make_qkv(1, 2, 2, 32, 32, 64, torch.float16)
    spec = fa.Spec(True, 0.0, 0.125)
    assert hopper.supports(q, k, v, spec, "tma")
    assert not hopper.supports(q, k, v, spec._replace(dropout_p=0.1), "tma")  # dropout: the pointer kernel
    odd = torch.randn(1, 2, 32, 3, device=DEVICE, dtype=torch.float16)  # 6-byte rows: not 16-byte aligned
    assert not hopper.supports(odd, odd, odd, spec, "tma")
    assert not hopper.supports(q[..., ::2], k[..., ::2], v[..., ::2], spec, "tma")  # rows not contiguous
    wide = torch.randn(1, 2, 32, 256, device=DEVICE, dtype=torch.float16)
    assert hopper.supports(wide, wide, wide, spec, "tma")
    with pytest.raises(ValueError, match="variant"):
        hopper.forward(q, k, v, spec, "pointer")


@requires_gpu
@pytest.mark.parametrize("variant", hopper.VARIANTS[1:])
@pytest.mark.parametrize("D", [64, 128])
def test_variant_on_gpu_sizes(variant, D):
    q, k, v = make_qkv(2, 4, 2, 2049, 2049, D, torch.bfloat16)
    spec = fa.Spec(True, 0.0, D**-0.5)
    out, _, _ = hopper.forward(q, k, v, spec, variant)
    ref64 = attention_eager(q.double(), k.double(), v.double(), True)
    assert_close_to_reference("out", out, ref64, attention_eager(q, k, v, True))
