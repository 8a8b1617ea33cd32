"""The Gluon forward for Hopper (bench/gluon_attention.py, an experiment outside the package).

Gluon has no interpreter, so without a GPU only its compile is checked: for sm_90 through bench/sm90.py's
stand-in driver, with the static evidence of FlashAttention-3's structure (asynchronous wgmma, TMA, one
register budget per warp-specialized partition, no spills, shared memory under sm_90's limit). On a Hopper GPU
its output and log-sum-exp are checked against float64 and the pointer kernel (bench/gpu_check.sh stage
``gluon`` runs these tests before it times the kernel).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from chapter3_flash.kernels import flash_attn as fa
from helpers import DEVICE, ON_GPU, assert_close_to_reference, attention_eager, make_qkv

from bench import gluon_attention as ga

ROOT = pathlib.Path(__file__).resolve().parents[2]
SMEM_LIMIT = 232448  # bench.sm90.SMEM_LIMIT (that module refuses to import under the interpreter)
HOPPER = ON_GPU and torch.cuda.get_device_capability()[0] == 9
requires_hopper = pytest.mark.skipif(
    not HOPPER or ga.GLUON_MISSING is not None,
    reason=f"needs a Hopper GPU and Gluon's Hopper API (cuda: {ON_GPU}; {ga.GLUON_MISSING or 'Gluon present'})",
)


@pytest.mark.skipif(ON_GPU, reason="on a GPU the exactness tests below compile and run the kernel")
@pytest.mark.skipif(ga.GLUON_MISSING is not None, reason=str(ga.GLUON_MISSING))
def test_gluon_forward_compiles_for_hopper_with_fa3_structure(tmp_path):
    out = tmp_path / "gluon.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    cmd = [sys.executable, "-m", "bench.sm90", "--gluon", "--head-dims", "64", "128", "--dtypes", "bf16", "fp16"]
    cmd += ["--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode == 3:  # bench.sm90.UNSUPPORTED: this Triton lacks the offline compile's internals or Gluon's
        pytest.skip(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"

    reports = json.loads(out.read_text())
    found = {(r["case"], r["kernel"]) for r in reports}
    kernels = ("_attn_fwd_gluon", "_attn_fwd_gluon_overlap", "_attn_fwd_gluon_pingpong", "_attn_fwd_gluon_persistent")
    expected = {(f"D{d} {t} gluon", k) for d in (64, 128) for t in ("bf16", "fp16") for k in kernels}
    assert found == expected, f"compiled {sorted(found)}, expected {sorted(expected)}"
    for r in reports:
        what = f"{r['case']} {r['kernel']}"
        assert r["regs"] > 0, f"{what}: no register count in the cubin"
        assert r["local_bytes"] == 0, f"{what}: {r['local_bytes']} B of register spills"
        assert r["shared_bytes"] <= SMEM_LIMIT, f"{what}: {r['shared_bytes']} B of shared memory"
        assert r["hgmma"] > 0, f"{what}: no HGMMA (wgmma) in the SASS"
        assert r["sass"].get("UTMALDG", 0) > 0, f"{what}: no TMA load in the SASS"
        # Warp specialization took effect: the producer's warpgroup drops to 24 registers, the consumers rise to 240
        # (the 504 per thread of three warpgroups at the launch's 168: the whole register file).
        assert r["maxnreg"][0] == 24 and 240 in r["maxnreg"], f"{what}: setmaxnreg {r['maxnreg']}"
        if r["kernel"] != "_attn_fwd_gluon":
            # The next S wgmma (overlap, persistent) or this S with the previous P.V (ping-pong) in flight across a
            # wait.
            assert r["wgmma_waits"].get("1", 0) > 0, f"{what}: no wgmma wait leaving one group in flight"
        if r["kernel"] in ("_attn_fwd_gluon_overlap", "_attn_fwd_gluon_persistent"):
            # ... and the softmax's exponentials scheduled while it runs (ptxas may move a wait above them).
            assert r["exp_under_wgmma"] >= 64, f"{what}: {r['exp_under_wgmma']} exp2 beside an in-flight wgmma"


def test_unsupported_inputs_name_the_reason():
    q, k, v = make_qkv(1, 4, 2, 40, 40, 64, torch.bfloat16)
    if ga.GLUON_MISSING is not None:
        assert ga.unsupported(q, k, v, need_cuda=False) == ga.GLUON_MISSING
        assert not ga.supports(q, k, v)
        return
    assert ga.unsupported(q.cpu(), k.cpu(), v.cpu(), need_cuda=False) is None  # what the offline compile takes
    odd = make_qkv(1, 4, 2, 40, 40, 96, torch.bfloat16)
    assert "head dim" in ga.unsupported(*odd, need_cuda=False)
    assert "dtypes" in ga.unsupported(*(t.float() for t in (q, k, v)), need_cuda=False)
    assert "Hkv dividing" in ga.unsupported(q, k[:, :1].expand(1, 3, 40, 64), v[:, :1].expand(1, 3, 40, 64), False)
    wide = torch.zeros(1, 4, 40, 128, dtype=torch.bfloat16, device=q.device)[..., :64]
    assert ga.unsupported(wide, k, v, need_cuda=False) is None  # rows 256 B apart: TMA can address them
    strided = torch.zeros(1, 4, 40, 64, 2, dtype=torch.bfloat16, device=q.device)[..., 0]  # elements 4 B apart
    assert "TMA-addressable" in ga.unsupported(strided, k, v, need_cuda=False)
    expanded = k[:, :1].expand(1, 2, 40, 64)  # one key/value head shared by stride 0
    assert "stride of 0" in ga.unsupported(q, expanded, expanded, need_cuda=False)
    if not HOPPER:
        assert not ga.supports(q, k, v)
        with pytest.raises(ValueError, match="Hopper"):
            ga.forward(q, k, v, causal=True)
    else:
        with pytest.raises(ValueError, match="softmax_scale"):
            ga.forward(q, k, v, causal=True, softmax_scale=float("nan"))
        with pytest.raises(ValueError, match="variant"):
            ga.forward(q, k, v, causal=True, variant="persistent")


@requires_hopper
@pytest.mark.parametrize("variant", ga.VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "shape, causal",
    [
        pytest.param((2, 4, 2, 1000, 1000, 64), True, id="causal-ragged-d64-gqa"),
        pytest.param((2, 4, 4, 1000, 1000, 128), True, id="causal-ragged-d128"),
        pytest.param((1, 4, 2, 333, 1234, 128), True, id="causal-nq-lt-nk-d128"),  # bottom-right diagonal
        pytest.param((1, 2, 1, 700, 300, 64), True, id="causal-nq-gt-nk-d64"),  # rows that see no key
        pytest.param((1, 4, 4, 777, 1500, 64), False, id="full-ragged-d64"),
        pytest.param((2, 2, 2, 2049, 2049, 128), False, id="full-d128"),
    ],
)
def test_gluon_forward_matches_float64_and_pointer_kernel(shape, causal, dtype, variant):
    q, k, v = make_qkv(*shape, dtype)
    out, lse = ga.forward(q, k, v, causal=causal, variant=variant)
    ref64 = attention_eager(q.double(), k.double(), v.double(), causal)
    assert_close_to_reference("out", out, ref64, attention_eager(q, k, v, causal))
    _, lse_pointer, _ = fa.forward(q, k, v, fa.Spec(causal, 0.0, shape[-1] ** -0.5))
    torch.testing.assert_close(lse, lse_pointer, atol=1e-4, rtol=1e-5)  # the backward would read it


@requires_hopper
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_persistent_forward_runs_several_tiles_per_program(causal):
    # 8 query tiles x 64 heads = 512 tiles on at most 132 SMs: each program walks several tiles, so the K/V ring's
    # phases carry from one tile into the next and Q is handed back between tiles.
    q, k, v = make_qkv(4, 16, 4, 1000, 1000, 64, torch.bfloat16)
    out, lse = ga.forward(q, k, v, causal=causal, variant="persistent")
    ref64 = attention_eager(q.double(), k.double(), v.double(), causal)
    assert_close_to_reference("out", out, ref64, attention_eager(q, k, v, causal))
    _, lse_pointer, _ = fa.forward(q, k, v, fa.Spec(causal, 0.0, 64**-0.5))
    torch.testing.assert_close(lse, lse_pointer, atol=1e-4, rtol=1e-5)


@requires_hopper
@pytest.mark.parametrize("variant", ga.VARIANTS)
def test_gluon_forward_reads_strided_views_and_no_neighbouring_head(variant):
    # (B, N, H, D) projections viewed as (B, H, N, D); NaN in the second head's keys and values must not reach the
    # first head's output (its ragged last key tile ends where the TMA zero-fills, not in the next head's rows).
    B, N, H, D = 1, 300, 2, 128
    q, k, v = (torch.randn(B, N, H, D, device=DEVICE, dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    k[:, 1], v[:, 1] = float("nan"), float("nan")
    out, _ = ga.forward(q[:, :1], k[:, :1], v[:, :1], causal=True, variant=variant)
    ref64 = attention_eager(q[:, :1].double(), k[:, :1].double(), v[:, :1].double(), True)
    assert_close_to_reference("out", out, ref64, attention_eager(q[:, :1], k[:, :1], v[:, :1], True))
