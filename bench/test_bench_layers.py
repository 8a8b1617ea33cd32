"""Layer-level pytest-benchmark comparisons (GPU only): pytest bench --benchmark-only

Not part of the test suite's CI budget; the timed callables synchronize, allocation stays outside.
"""

from __future__ import annotations

import pytest
import torch
from chapter3_flash.attention import reference as ref
from chapter3_flash.kernels import flash_attention

from bench.providers import sdpa
from chapter3_flash import attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="timings need a CUDA GPU")

B, T, WIDTH, HEADS = 8, 1024, 768, 12


def _layer(cls, dtype):
    torch.manual_seed(123)
    return cls(WIDTH, WIDTH, T, 0.0, HEADS).to("cuda", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["chapter", "ours"])
def test_multihead_attention_fwd_bwd(benchmark, impl, dtype):
    layer = _layer(ref.MultiHeadAttention if impl == "chapter" else attention.MultiHeadAttention, dtype)
    x = torch.randn(B, T, WIDTH, device="cuda", dtype=dtype, requires_grad=True)
    torch.backends.cuda.matmul.allow_tf32 = True

    def step():
        layer(x).sum().backward()
        torch.cuda.synchronize()

    step()
    benchmark(step)
    torch.backends.cuda.matmul.allow_tf32 = False


@pytest.mark.parametrize("impl", ["ours", "sdpa_flash"])
def test_attention_core_fwd(benchmark, impl):
    q, k, v = (torch.randn(B, HEADS, T, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    fn = (
        (lambda: flash_attention(q, k, v, causal=True))
        if impl == "ours"
        else (lambda: sdpa("FLASH_ATTENTION")(q, k, v, 0.0))
    )

    def call():
        fn()
        torch.cuda.synchronize()

    call()
    benchmark(call)
