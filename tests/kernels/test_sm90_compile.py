"""Every kernel compiles for Hopper (sm_90), with the configs and argument specializations a GPU run uses.

The interpreter runs the kernels' arithmetic but never the compiler: a construct the interpreter
accepts and Triton's compiler rejects (a non-constexpr global, a layout the backend cannot lower, a
config that overflows shared memory) would only show on a GPU. bench/sm90.py compiles the real thing
on any machine, with Triton's bundled ptxas, so these tests catch it here. Each case runs in a
subprocess: the test process has already imported the kernels for the interpreter.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
from helpers import ON_GPU

ROOT = pathlib.Path(__file__).resolve().parents[2]
# The forward, the deterministic backward (dQ then dK/dV) and the one-pass backward (preprocess, then
# dK/dV with dQ atomics).
KERNELS = {"_attn_fwd", "_attn_bwd_dq", "_attn_bwd_dkdv", "_attn_bwd_preprocess", "_attn_bwd"}
MATMUL_KERNELS = KERNELS - {"_attn_bwd_preprocess"}  # the preprocess only sums dO * O per row
MATMUL_KERNELS |= {"_attn_fwd_tma", "_attn_fwd_tma_persistent"}  # bench/hopper.py

# name: (head dim, dtypes, extra flags). Head dim 40 is not a multiple of 16, so the loads cannot assume
# aligned rows (another specialization). fp32-ieee: PyTorch's default exact float32 products.
CASES = {
    "D16": (16, ["bf16", "fp32"], []),
    "D40": (40, ["bf16", "fp32"], []),
    "D64": (64, ["bf16", "fp16", "fp32", "fp32-ieee"], []),
    "D64-non-causal": (64, ["bf16", "fp32"], ["--non-causal"]),
    "D64-window": (64, ["bf16"], ["--window", "255", "-1"]),  # the window's left-edge loops
    "D256-window": (256, ["bf16"], ["--window", "511", "-1"]),  # Gemma 3's head dim and window
    "D128": (128, ["bf16", "fp32", "fp32-ieee"], []),
    "D256": (256, ["bf16", "fp32"], []),
    "D64-varlen": (64, ["bf16"], ["--varlen"]),  # the packed batch's kernels, over their tile list
}


@pytest.mark.skipif(ON_GPU, reason="on a GPU the rest of the suite compiles and runs the real kernels")
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_kernel_compiles_for_hopper(case, tmp_path):
    out = tmp_path / "sm90.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton's default; set to quiet its deprecation warning
    head_dim, dtypes, extra = CASES[case]
    cmd = [sys.executable, "-m", "bench.sm90", "--head-dims", str(head_dim), "--dtypes", *dtypes, *extra]
    cmd += ["--dropout", "0", "0.1", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode == 3:  # bench.sm90.UNSUPPORTED: Triton's internals moved, not a kernel problem
        pytest.skip(proc.stdout.strip().splitlines()[-1])
    # Exit 1: a compile error, or a kernel over sm_90's 227 KiB of shared memory (the tool checks it).
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"

    reports = json.loads(out.read_text())
    by_case: dict[str, set] = {}
    for r in reports:
        by_case.setdefault(r["case"], set()).add(r["kernel"])
        assert r["regs"] > 0, f"{r['case']} {r['kernel']}: no register count in the cubin"
        half = " bf16 " in r["case"] or " fp16 " in r["case"]
        if half and r["kernel"] in MATMUL_KERNELS:  # half precision must reach Hopper's warpgroup matrix instructions
            assert r["hgmma"] > 0, f"{r['case']} {r['kernel']}: no HGMMA (wgmma) in the SASS"
        if r["kernel"].startswith("_attn_fwd_tma"):
            assert r["tma"] > 0, f"{r['case']} {r['kernel']}: no TMA load or store in the SASS"
    assert len(by_case) == len(dtypes) * 2, f"expected every dtype with dropout 0 and 0.1, got {sorted(by_case)}"
    for name, kernels in by_case.items():
        expected = set(KERNELS)
        if " p0.0" in name and "varlen" not in name:  # the TMA forwards and the decode kernels, without dropout
            expected |= {"_attn_fwd_tma", "_attn_fwd_tma_persistent", "_append_kv", "_decode_fwd", "_decode_combine"}
        if " fp32 " in name:  # TF32 allowed: the inputs are rounded to TF32 before the kernels
            expected |= {"_round_tf32_kernel"}
        assert kernels == expected, f"{name}: compiled {sorted(kernels)}, expected {sorted(expected)}"
