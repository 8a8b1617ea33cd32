"""Experiments that inform the kernel's fixed configs (GPU): tile shapes, warps, host overhead.

Times the forward and forward+backward at one long causal shape for a few alternative
(BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, each against the current choice, and profiles
the host side of a tiny call (where launch overhead is all there is). Prints tables; changes nothing.

    python -m bench.tune --deadline 60
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import pstats
import time

import torch

import kernels.flash_attn as fa
from bench.common import fwd_and_fwd_bwd_ms, measure
from bench.sweep import _sdpa, ours
from kernels import flash_attention

# (kernel, override) pairs tried against the current config; BLOCK_M/BLOCK_N/warps/stages.
VARIANTS = [
    ("fwd", dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)),
    ("fwd", dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)),  # D 64's config before session 3
    ("fwd", dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=4)),
    ("fwd", dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=4)),
    ("dkdv", dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=3)),
    ("dkdv", dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=3)),
    ("dkdv", dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)),
    ("dq", dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=3)),  # the config before run 2's tuning
    ("dq", dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3)),
    ("dq", dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)),
]


def _time(q, k, v, p) -> tuple[float, float]:
    return fwd_and_fwd_bwd_ms(ours, q, k, v, p)


def configs(deadline: float, shapes) -> None:
    real = fa._configs
    for B, H, N, D, p in shapes:
        q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        base_fwd, base_fb = _time(q, k, v, p)
        current = real(fa._block_d(D), torch.bfloat16, p > 0)
        print(f"\nbf16 B{B} H{H} N{N} D{D} dropout {p}: current {current}")
        print(f"  current: fwd {base_fwd:.3f} ms, fwd+bwd {base_fb:.3f} ms")
        for kernel, override in VARIANTS:
            if time.perf_counter() > deadline:
                print("  (deadline reached)")
                return
            if p > 0 and kernel != "fwd" and override["num_warps"] == 4:
                continue

            def patched(*args, kernel=kernel, override=override, **kwargs):
                cfgs = copy.deepcopy(real(*args, **kwargs))
                cfgs[kernel] = dict(override)
                return cfgs

            fa._configs = patched
            try:
                f, fb = _time(q, k, v, p)
                gain = f"fwd {f:.3f} ms ({base_fwd / f:.2f}x), fwd+bwd {fb:.3f} ms ({base_fb / fb:.2f}x)"
                print(f"  {kernel:<5} {override}: {gain}")
            except Exception as err:  # a config that does not compile (shared memory) is a result too
                print(f"  {kernel:<5} {override}: {type(err).__name__}: {str(err).splitlines()[0][:100]}")
            finally:
                fa._configs = real


def host_overhead() -> None:
    """A call too small for the GPU to matter: what the host spends per call, and where."""
    q, k, v = (torch.randn(1, 1, 128, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    ours_fwd_bwd = lambda: flash_attention(q, k, v, causal=True).backward(do)
    sdpa = lambda: _sdpa("FLASH_ATTENTION")(q, k, v, 0.0).backward(do)
    with torch.no_grad():
        fwd_ms = measure(lambda: flash_attention(q, k, v, causal=True), "cuda")[0]
    print(f"\nhost-bound call (1, 1, 128, 64): fwd ours {fwd_ms:.3f} ms")
    print(f"fwd+bwd ours {measure(ours_fwd_bwd, 'cuda')[0]:.3f} ms, sdpa_flash {measure(sdpa, 'cuda')[0]:.3f} ms")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        ours_fwd_bwd()
    torch.cuda.synchronize()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(14)
    print("host profile of 200 fwd+bwd calls, by own time:")
    print("\n".join(line for line in out.getvalue().splitlines() if line.strip())[:3000])


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.tune")
    ap.add_argument("--deadline", type=float, default=120.0, help="seconds for the config experiments")
    args = ap.parse_args()
    host_overhead()
    shapes = [(8, 12, 4096, 64, 0.0), (8, 16, 4096, 128, 0.0), (8, 12, 4096, 64, 0.1)]
    configs(time.perf_counter() + args.deadline, shapes)


if __name__ == "__main__":
    main()
