"""Compile every kernel for Hopper (sm_90) on any machine, no GPU needed, and report what came out.

The host launchers run exactly as on a GPU (the same configs, the same argument specialization from
real tensors' strides and alignment), but against a stand-in driver that names an sm_90 device, and
each launch only compiles (Triton's warmup path). Triton ships its own ptxas and cuobjdump, so the
result is the real cubin an H100/H200 would run. Per kernel it reports registers per thread, local
memory (register spills), shared memory against Hopper's 227 KiB per block, whether the matrix
products became wgmma (HGMMA) instructions, the layout conversions left in the Triton GPU IR, and a
static count of SASS instructions by kind (a proxy for the non-matmul work, not a timing).

    python -m bench.sm90                        # GPT-2 shape, bf16 and fp32, dropout 0 and 0.1
    python -m bench.sm90 --head-dims 64 128 --dtypes bf16 --dropout 0.1 --sass

A compile error, a config that overflows shared memory, or spills show here on a laptop, before a GPU
session spends its minutes on them. Must run without TRITON_INTERPRET (the module refuses otherwise).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import inspect
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise SystemExit("bench.sm90 compiles real kernels: run it without TRITON_INTERPRET=1")

import chapter3_flash.kernels.flash_attn as fa
import torch
import triton
from chapter3_flash.kernels import decode

from bench import hopper

UNSUPPORTED = 3  # exit status: this Triton lacks the internals the offline compile relies on


def offline_compile_supported() -> str | None:
    """None when this Triton has what compile_only() uses (3.6 and 3.9 do), else what is missing."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError:
        return "triton.backends.compiler.GPUTarget"
    driver = getattr(getattr(triton, "runtime", None), "driver", None)
    if driver is None or not hasattr(driver, "set_active") or not hasattr(driver, "_active"):
        return "triton.runtime.driver.set_active / _active"
    if "warmup" not in inspect.signature(triton.runtime.JITFunction.run).parameters:
        return "JITFunction.run(..., warmup=...)"
    if not (pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        return "the bundled NVIDIA tools (backends/nvidia/bin/cuobjdump)"
    return None


_MISSING = offline_compile_supported()
if _MISSING is None:
    from triton.backends.compiler import GPUTarget

SM90 = GPUTarget("cuda", 90, 32) if _MISSING is None else None
SMEM_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)
# The jit functions launched, and the name each launch is reported under: _attn_bwd_kv is dK/dV of the
# deterministic backward (after dQ) or the whole one-pass backward (dQ by atomics), told apart by its DQ_ATOMIC.
# _attn_fwd_tma (bench/hopper.py) likewise by its PERSISTENT.
KERNELS = {
    "_attn_fwd": fa,
    "_attn_bwd_dq": fa,
    "_attn_bwd_kv": fa,
    "_attn_bwd_preprocess": fa,
    "_round_tf32_kernel": fa,
    "_attn_fwd_tma": hopper,
    "_append_kv": decode,
    "_decode_fwd": decode,
    "_decode_combine": decode,
}


def report_name(name: str, kwargs: dict) -> str:
    if name == "_attn_bwd_kv":
        return "_attn_bwd" if kwargs.get("DQ_ATOMIC") else "_attn_bwd_dkdv"
    if name.startswith("_attn_fwd_gluon"):  # bench/gluon_attention.py
        overlap = kwargs.get("OVERLAP") and name == "_attn_fwd_gluon"  # the persistent kernel always overlaps
        return name + ("_overlap" if overlap else "") + ("" if kwargs.get("CAUSAL") else "_noncausal")
    if name == "_attn_fwd_tma":
        return (
            "_attn_fwd_ws"
            if kwargs.get("WARP_SPECIALIZE")
            else "_attn_fwd_tma" + ("_persistent" if kwargs.get("PERSISTENT") else "")
        )
    return name


# fp32: TF32 allowed (wgmma in TF32); fp32-ieee: PyTorch's default, exact float32 products (FMA).
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp32-ieee": torch.float32}
_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
# An instruction line of cuobjdump -sass: "/*0a50*/  @!P0 HGMMA.64x64x16.F32.BF16 R24, ..."
_SASS_OP = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")


class _OfflineDriver:
    """Just enough of Triton's active driver for the JIT to specialize and compile for sm_90."""

    def get_current_target(self):
        return SM90

    def get_current_device(self):
        return "sm90-offline"

    def get_current_stream(self, device=None):
        return 0

    def __getattr__(self, name):
        raise RuntimeError(f"the offline sm_90 driver cannot {name}: nothing runs without a GPU")


@contextlib.contextmanager
def compile_only(found: dict[str, list], kernels: dict | None = None):
    """Every launch of the module's kernels (``kernels``: name -> module, default KERNELS) compiles for sm_90 and
    records the kernel; none runs."""
    kernels = KERNELS if kernels is None else kernels
    driver = triton.runtime.driver
    active = driver._active  # reset_active() would look for a real GPU driver, which may not exist
    driver.set_active(_OfflineDriver())
    saved = {}
    for name, module in kernels.items():
        jit = getattr(module, name)
        saved[name] = jit.__dict__.get("run")

        def run(*args, grid, warmup, _jit=jit, _name=name, **kwargs):
            kernel = type(_jit).run(_jit, *args, grid=grid, warmup=True, **kwargs)
            found.setdefault(report_name(_name, kwargs), []).append(kernel)
            return kernel

        jit.run = run
    try:
        yield
    finally:
        for name, module in kernels.items():
            jit = getattr(module, name)
            if saved[name] is None:
                del jit.run
            else:
                jit.run = saved[name]
        driver._active = active


@dataclasses.dataclass
class Report:
    case: str
    kernel: str
    regs: int
    local_bytes: int  # stack frame + local memory per thread: register spills (0 when none)
    shared_bytes: int
    num_warps: int
    num_stages: int
    hgmma: int  # wgmma instructions in the SASS (0: the dots fell back to mma.sync or FMA)
    tma: int  # TMA loads and stores in the SASS (UTMALDG / UTMASTG)
    setmaxnreg: int  # register reallocation between warp groups (USETMAXREG): warp specialization took effect
    convert_layout: int  # layout conversions in the Triton GPU IR (each one a trip through shared memory or shuffles)
    sass: dict[str, int]
    # wgmma waits by how many groups they leave in flight ({"0": n, "1": m}: a "1" lets a wgmma run on past the wait,
    # the async overlap), and the register counts setmaxnreg sets (one per warp-specialized partition).
    wgmma_waits: dict[str, int] = dataclasses.field(default_factory=dict)
    maxnreg: list[int] = dataclasses.field(default_factory=list)
    # Exponentials (MUFU.EX2) placed while a wgmma group is in flight, reading the SASS in address order (after an
    # HGMMA that closes a group, before the wait for none): the softmax overlapping a matrix product, as scheduled.
    exp_under_wgmma: int = 0

    def line(self) -> str:
        return (
            f"{self.case:<24} {self.kernel:<21} regs {self.regs:>3}  local {self.local_bytes:>4} B  "
            f"smem {self.shared_bytes:>6} B  warps {self.num_warps}  stages {self.num_stages}  "
            f"HGMMA {self.hgmma:>3}  TMA {self.tma:>2}  setmaxnreg {self.setmaxnreg}  "
            f"convert_layout {self.convert_layout:>3}  SASS {sum(self.sass.values()):>5}"
        )


def _tool(name: str, *args: str) -> str:
    out = subprocess.run([os.path.join(_BIN, name), *args], capture_output=True, text=True, check=True)
    return out.stdout


def read_cubin(case: str, name: str, kernel) -> Report:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = _tool("cuobjdump", "--dump-resource-usage", path)
        sass = _tool("cuobjdump", "-sass", path)
    reg = re.search(r"REG:(\d+)", usage)
    spill = [int(x) for x in re.findall(r"(?:STACK|LOCAL):(\d+)", usage)]
    ops = collections.Counter(m.split(".")[0] for m in _SASS_OP.findall(sass))
    waits = collections.Counter(str(int(n, 16)) for n in re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, (0x[0-9a-f]+)", sass))
    maxnreg = sorted({int(n, 16) for n in re.findall(r"USETMAXREG\.\S+ (?:UP\d, )?(0x[0-9a-f]+)", sass)})
    in_flight, exp_under_wgmma = False, 0
    for line in sass.splitlines():
        if "HGMMA" in line and "gsb0" in line:
            in_flight = True
        elif "WARPGROUP.DEPBAR.LE gsb0, 0x0" in line:
            in_flight = False
        elif "MUFU.EX2" in line and in_flight:
            exp_under_wgmma += 1
    meta = kernel.metadata
    return Report(
        case=case,
        kernel=name,
        regs=int(reg.group(1)) if reg else -1,
        local_bytes=sum(spill),
        shared_bytes=meta.shared,
        num_warps=meta.num_warps,
        num_stages=meta.num_stages,
        hgmma=ops.get("HGMMA", 0),
        tma=ops.get("UTMALDG", 0) + ops.get("UTMASTG", 0),
        setmaxnreg=ops.get("USETMAXREG", 0),
        convert_layout=kernel.asm["ttgir"].count("ttg.convert_layout"),
        sass=dict(ops.most_common()),
        wgmma_waits=dict(sorted(waits.items())),
        maxnreg=maxnreg,
        exp_under_wgmma=exp_under_wgmma,
    )


# A packed batch for --varlen: sequences of 0, 1 and hundreds of tokens, N tokens in all (kernels/varlen.py's layout).
VARLEN_LENGTHS = (0.5, 0.0, 0.25, None)  # fractions of N, the last takes the rest; one 1-token sequence added


def _varlen_batch(H: int, N: int, D: int, dtype: torch.dtype):
    lengths = [int(f * N) for f in VARLEN_LENGTHS[:-1]] + [1]
    lengths.append(N - sum(lengths))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = (torch.zeros(N, H, D, dtype=dtype).transpose(0, 1)[None] for _ in range(3))  # (1, H, total, D) views
    return q, k, v, fa.Varlen(cu, cu, max(lengths), max(lengths))


def compile_case(
    B, H, N, D, dtype: torch.dtype, causal: bool, dropout_p: float, tf32: bool = True, window=(-1, -1), varlen=False
):
    """Run the forward and both backward launchers on CPU tensors of this shape; returns {kernel: [compiled]}.
    ``varlen``: on a packed batch of N tokens instead (the varlen kernels, over their tile list), those only."""
    q, k, v = (torch.zeros(B, H, N, D, dtype=dtype) for _ in range(3))
    packed = None
    if varlen:
        q, k, v, packed = _varlen_batch(H, N, D, dtype)
    found: dict[str, list] = {}
    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        with compile_only(found):
            spec = fa.Spec(causal, dropout_p, D**-0.5, window[0], window[1])
            o, lse, seed = fa.forward(q, k, v, spec, varlen=packed)
            for one_pass in (False, True):
                fa.backward(torch.zeros_like(o), q, k, v, o, lse, seed, spec, one_pass=one_pass, varlen=packed)
            if varlen:
                return found
            for variant in hopper.VARIANTS[1:]:
                if hopper.supports(q, k, v, spec, variant):
                    hopper.forward(q, k, v, spec, variant)
            if dropout_p == 0.0:  # the KV-cache decode: a step of 2 queries on 8 groups, split 4 ways, appending in
                # the decode kernel; then without new keys, and the append kernel alone (no queries)
                qd = torch.zeros(B, H * 4, 2, D, dtype=dtype)
                cache = torch.zeros(B, H, N, D, dtype=dtype)
                new = torch.zeros(B, H, 2, D, dtype=dtype)
                decode.launch(qd, cache, cache.clone(), new, new.clone(), N - 8, N - 6, spec, num_splits=4)
                decode.launch(qd, cache, cache.clone(), None, None, N - 8, N - 8, spec, num_splits=4)  # no new keys
                decode.launch(qd[:, :, :0], cache, cache.clone(), new, new.clone(), N - 8, N - 6, spec)  # append only
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed
    return found


def reports(head_dims, dtypes, dropouts, causal=True, window=(-1, -1), varlen=False) -> list[Report]:
    out = []
    for D in head_dims:
        for dname in dtypes:
            for p in dropouts:
                case = f"D{D} {dname} p{p}{'' if causal else ' non-causal'}"
                if window != (-1, -1):
                    case += f" window{window[0]},{window[1]}"
                if varlen:
                    case += " varlen"
                tf32 = dname != "fp32-ieee"
                kernels = compile_case(1, 2, 256, D, DTYPES[dname], causal, p, tf32, window, varlen)
                for name, compiled in kernels.items():
                    distinct = list({id(kernel): kernel for kernel in compiled}.values())  # one per compiled variant
                    out += [read_cubin(case, name, kernel) for kernel in distinct]
    return out


def gluon_reports(head_dims, dtypes, causal=True) -> list[Report]:
    """The Gluon forward (bench/gluon_attention.py), each of its variants, per head dim and dtype,
    at a ragged N (bottom-right causal when causal). Raises what the compiler raised."""
    from bench import gluon_attention as ga

    if ga.GLUON_MISSING is not None:
        raise RuntimeError(ga.GLUON_MISSING)
    out = []
    for D in head_dims:
        for dname in dtypes:
            q = torch.zeros(1, 2, 300, D, dtype=DTYPES[dname])
            kv = torch.zeros(1, 1, 333, D, dtype=DTYPES[dname])  # grouped: two query heads per key/value head
            found: dict[str, list] = {}
            with compile_only(found, {f"_attn_fwd_gluon{k}": ga for k in ("", "_pingpong", "_persistent")}):
                for variant in ga.VARIANTS:
                    ga.launch(q, kv, kv, causal, D**-0.5, variant)
            for name, compiled in found.items():
                distinct = list({id(kernel): kernel for kernel in compiled}.values())
                out += [read_cubin(f"D{D} {dname} gluon", name, kernel) for kernel in distinct]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sm90", description=__doc__.split("\n")[0])
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64])
    ap.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp32"])
    ap.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.1])
    ap.add_argument("--non-causal", action="store_true", help="compile the non-causal kernels instead")
    ap.add_argument("--window", type=int, nargs=2, default=(-1, -1), metavar=("LEFT", "RIGHT"), help="sliding window")
    ap.add_argument("--varlen", action="store_true", help="the varlen kernels on a packed batch instead")
    ap.add_argument("--sass", action="store_true", help="print each kernel's SASS histogram too")
    ap.add_argument("--json", help="write the reports to this file")
    ap.add_argument("--gluon", action="store_true", help="only the Gluon forward (bench/gluon_attention.py)")
    args = ap.parse_args(argv)
    if _MISSING is not None:
        print(f"triton {triton.__version__}: cannot compile offline here, it lacks {_MISSING}")
        return UNSUPPORTED
    print(f"triton {triton.__version__}, target {SM90}")
    if args.gluon:
        from bench import gluon_attention as ga

        if ga.GLUON_MISSING is not None:
            print(f"cannot compile the Gluon forward here: {ga.GLUON_MISSING}")
            return UNSUPPORTED
        found = gluon_reports(args.head_dims, [d for d in args.dtypes if d in ("bf16", "fp16")], not args.non_causal)
    else:
        found = reports(args.head_dims, args.dtypes, args.dropout, not args.non_causal, tuple(args.window), args.varlen)
    bad = []
    for r in found:
        print(r.line())
        if args.sass:
            print("    " + ", ".join(f"{op} {n}" for op, n in r.sass.items() if n >= 4))
        if args.gluon:
            print(
                f"    wgmma waits (groups left in flight: count) {r.wgmma_waits}, setmaxnreg {r.maxnreg}, "
                f"exp2 under an in-flight wgmma {r.exp_under_wgmma}"
            )
        if r.shared_bytes > SMEM_LIMIT:
            bad.append(f"{r.case} {r.kernel}: {r.shared_bytes} B of shared memory > {SMEM_LIMIT}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in found], f, indent=1)
    for line in bad:
        print("FAIL", line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
