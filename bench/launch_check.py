"""Every direct launch (kernels/launch.py) is the launch Triton's JIT makes: checked without a GPU.

kernels/launch.py skips the JIT's dispatch after a signature's first call and calls the compiled kernel's
launcher itself. If its key merged two signatures Triton tells apart (an unaligned tensor, an integer that
is 1, or not divisible by 16), it would launch a kernel compiled for the other one: wrong addresses, no
error. This check runs our host launchers against bench/sm90.py's offline sm_90 driver, with each compiled
kernel's launcher replaced by a recorder, for call sequences chosen to cross those lines (an unaligned q,
a single head, lengths off a multiple of 16, a decode cache length that changes every step, TF32 inputs).
Each sequence runs once through the JIT alone and twice with direct launches; every launch of the direct
runs must be the JIT's (same compiled kernel, grid and arguments), and the second direct run must launch
everything directly.

    python -m bench.launch_check          # exit 0: all launches agree; 1: a mismatch; 3: Triton unsupported
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise SystemExit("bench.launch_check compiles real kernels: run it without TRITON_INTERPRET=1")

import torch
import triton
from chapter3_flash.kernels import decode, settings
from chapter3_flash.kernels import flash_attn as fa

from bench import sm90

B, H, N, D = 2, 4, 128, 64


def _describe(x):
    if isinstance(x, torch.Tensor):
        return ("tensor", x.dtype, tuple(x.shape), x.stride(), x.data_ptr() % 16)
    return (type(x), x)


_log: list = []  # the launches of the current recording


def _record(kernel, gx, gy, gz, stream, function, metadata, launch_metadata, enter_hook, exit_hook, *args):
    _log.append((kernel, (gx, gy, gz), tuple(map(_describe, args)), enter_hook is not None))
    if enter_hook is not None:  # as the real launcher does
        enter_hook(launch_metadata)


@contextlib.contextmanager
def recording(log: list):
    """Offline sm_90 driver; every compiled kernel 'launches' by appending (kernel, grid, arguments, through
    the JIT?) to ``log``. The JIT passes its launch hooks, a direct launch passes None."""
    global _log
    CompiledKernel = triton.compiler.CompiledKernel
    saved_init = CompiledKernel._init_handles

    def init_handles(kernel):
        if kernel.module is None:
            kernel.module, kernel.function = "offline", 0
            kernel._run = functools.partial(_record, kernel)

    _log = log
    driver = triton.runtime.driver
    active = driver._active
    driver.set_active(sm90._OfflineDriver())
    CompiledKernel._init_handles = init_handles
    try:
        yield
    finally:
        CompiledKernel._init_handles = saved_init
        driver._active = active


def _qkv(dtype=torch.bfloat16, h=H, h_kv=H, n=N, d=D):
    return (
        torch.empty(B, h, n, d, dtype=dtype),
        torch.empty(B, h_kv, n, d, dtype=dtype),
        torch.empty(B, h_kv, n, d, dtype=dtype),
    )


def _fwd_bwd(q, k, v, dropout_p=0.0, one_pass=None):
    spec = fa.Spec(True, dropout_p, 1 / math.sqrt(q.shape[-1]))
    o, lse, seed = fa.forward(q, k, v, spec)
    fa.backward(torch.empty_like(o), q, k, v, o, lse, seed, spec, one_pass=one_pass)


def _unaligned_q():
    flat = torch.empty(B * H * N * D + 1, dtype=torch.bfloat16)
    q = flat[1:].view(B, H, N, D)  # 2 bytes past an aligned address
    _, k, v = _qkv()
    _fwd_bwd(q, k, v)


def _decode_steps(seqlens_tensor: bool):
    q = torch.empty(B, H, 1, D, dtype=torch.bfloat16)
    k_cache, v_cache = (torch.empty(B, 256, 2, D, dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
    k_new, v_new = (torch.empty(B, 2, 1, D, dtype=torch.bfloat16) for _ in range(2))
    spec = fa.Spec(True, 0.0, 1 / math.sqrt(D))
    for length in (15, 16, 17, 33, 200):  # a cache length that changes every step, across multiples of 16
        seqlens = torch.full((B,), length, dtype=torch.int32) if seqlens_tensor else length
        splits = 4 if length > 32 else 1  # given: the heuristic asks the GPU for its SM count
        decode.launch(q, k_cache, v_cache, k_new, v_new, seqlens, length + 1, spec, num_splits=splits)


def _tf32():
    with _allow_tf32():
        _fwd_bwd(*_qkv(torch.float32, d=40, n=100))  # the inputs rounded by _round_tf32_kernel first


@contextlib.contextmanager
def _allow_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


CASES = {
    "forward+backward, one pass": lambda: _fwd_bwd(*_qkv(), one_pass=True),
    "forward+backward, two kernels, dropout": lambda: _fwd_bwd(*_qkv(), dropout_p=0.1, one_pass=False),
    "unaligned q": _unaligned_q,
    "one head, one key/value head": lambda: _fwd_bwd(*_qkv(h=1, h_kv=1)),  # H == 1 is a constant to Triton
    "grouped heads, ragged length": lambda: _fwd_bwd(*_qkv(h_kv=1, n=100)),  # 100: not a multiple of 16
    "decode, int lengths": lambda: _decode_steps(False),
    "decode, tensor lengths": lambda: _decode_steps(True),
    "float32 TF32, head dim 40": _tf32,
}


def check(name: str, case) -> list[str]:
    """The case's launches through the JIT against two direct runs: a list of what differs."""
    runs = []
    for direct in (False, True, True):
        log: list = []
        with settings.override(direct_launch=direct), recording(log):
            case()
        runs.append(log)
    jit, first, second = runs
    errors = []
    if not jit:
        errors.append(f"{name}: nothing launched")
    for label, run in (("first direct run", first), ("second direct run", second)):
        if len(run) != len(jit):
            errors.append(f"{name}, {label}: {len(run)} launches, the JIT made {len(jit)}")
            continue
        for i, (ours, theirs) in enumerate(zip(run, jit)):
            if ours[0] is not theirs[0]:
                errors.append(f"{name}, {label}, launch {i}: another compiled kernel than the JIT's ({ours[0].name})")
            elif ours[1:3] != theirs[1:3]:
                errors.append(f"{name}, {label}, launch {i} ({ours[0].name}): grid or arguments differ")
    through_jit = sum(entry[3] for entry in second)
    if through_jit:
        errors.append(f"{name}: {through_jit} of {len(second)} launches of the second direct run went through the JIT")
    return errors


def check_hooks() -> list[str]:
    """With a launch hook set (a profiler such as proton), every launch goes through the JIT, which calls it."""
    seen: list = []
    hooks = triton.knobs.runtime.launch_enter_hook
    hook = seen.append
    log: list = []
    with recording(log):
        _fwd_bwd(*_qkv())  # direct launches from here on, without the hook
        if not hasattr(hooks, "add"):
            return []  # this Triton's hooks are plain attributes; nothing to check
        hooks.add(hook)
        try:
            _fwd_bwd(*_qkv())
        finally:
            hooks.remove(hook)
    second = log[len(log) // 2 :]
    if not all(entry[3] for entry in second) or len(seen) != len(second):
        return [f"launch hook set: {len(seen)} of {len(second)} launches called it"]
    return []


def main() -> int:
    missing = sm90.offline_compile_supported()
    if missing is not None:
        print(f"unsupported: this Triton ({triton.__version__}) lacks {missing}")
        return sm90.UNSUPPORTED
    errors = []
    for name, case in CASES.items():
        found = check(name, case)
        print(f"{name}: {'ok' if not found else 'MISMATCH'}")
        errors += found
    found = check_hooks()
    print(f"launch hook set: {'ok' if not found else 'MISMATCH'}")
    errors += found
    for line in errors:
        print(line)
    print(f"{'all launches agree' if not errors else f'{len(errors)} mismatches'} (triton {triton.__version__})")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
