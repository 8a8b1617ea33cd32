"""Compile and run every kernel once at the GPT-2 shape, then report what the compiler made of each.

A fast first step on a fresh GPU (a compile error shows here, not half-way through a sweep), and the
numbers that explain speed without a profiler: registers per thread, spills, shared memory, and
whether the matrix products use Hopper's wgmma instructions.

    python -m bench.kernel_report
"""

from __future__ import annotations

import chapter3_flash.kernels.flash_attn as fa
import torch
from chapter3_flash.kernels import flash_attention

from bench.common import measure

KERNELS = ("_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_kv", "_attn_bwd_dq")


def compiled_kernels(jit_fn) -> list:
    """Every compiled specialization of a @triton.jit function (Triton 3.x cache layout)."""
    found = []
    for entry in getattr(jit_fn, "device_caches", {}).values():
        cache = entry[0] if isinstance(entry, tuple) else {}
        found += list(cache.values())
    return found


def describe(kernel) -> str:
    meta = kernel.metadata
    ptx = kernel.asm.get("ptx", "")
    return (
        f"regs {kernel.n_regs:>3}  spills {kernel.n_spills:>3}  smem {meta.shared:>6} B  warps {meta.num_warps}  "
        f"stages {meta.num_stages}  wgmma {'wgmma' in ptx}  mma {'mma.sync' in ptx}"
    )


def main() -> None:
    device = "cuda"
    B, H, N, D = 8, 12, 1024, 64
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for p in (0.0, 0.1):
            q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
            torch.backends.cuda.matmul.allow_tf32 = dtype == torch.float32
            for deterministic in (False, True):  # both backward paths compile
                out = flash_attention(q, k, v, causal=True, dropout_p=p, deterministic=deterministic)
                out.backward(torch.randn_like(out))
            fwd = lambda: flash_attention(q, k, v, causal=True, dropout_p=p)
            ms = measure(fwd, device).ms
            print(f"{str(dtype):>15} dropout {p}: fwd {ms:.3f} ms at (B {B}, H {H}, N {N}, D {D})")
    torch.backends.cuda.matmul.allow_tf32 = False
    for name in KERNELS:
        for kernel in compiled_kernels(getattr(fa, name)):
            print(f"{name:<22} {kernel.metadata.name[-40:]:>40}  {describe(kernel)}")


if __name__ == "__main__":
    main()
