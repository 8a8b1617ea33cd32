"""Direct launches (kernels/launch.py): the key never merges what Triton's specialization tells apart.

A direct launch reuses the kernel the JIT compiled for an earlier call with the same key. If the key were
coarser than Triton's specialization (an unaligned tensor, an integer that is 1 or off a multiple of 16),
it would launch a kernel compiled for other arguments: wrong addresses, no error. Checked three ways: the
key against Triton's own specialization function, value by value (here, any machine); our launchers
replayed through both paths against Hopper-compiled kernels (bench/launch_check.py, in a subprocess: this
process imported the kernels for the interpreter); and on a GPU, the outputs of both paths bit for bit.
"""

from __future__ import annotations

import itertools
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from chapter3_flash.kernels import launch, settings
from helpers import ON_GPU, make_qkv

ROOT = pathlib.Path(__file__).resolve().parents[2]

INTS = [0, 1, 2, 15, 16, 17, 32, 48, -1, -16, -17, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16, -(2**31), -(2**31) - 1]
INTS += [2**32, 2**63 - 1, 2**63, 2**64 - 16]  # past i32: i64, then u64


def _triton_class(x, specialize: bool, align: bool):
    from triton._C.libtriton import native_specialize_impl
    from triton.backends import BaseBackend

    return native_specialize_impl(BaseBackend, x, False, specialize, align)


def _tensors():
    flat = torch.zeros(64, dtype=torch.float32)
    half = torch.zeros(64, dtype=torch.bfloat16)
    # offsets of 0, 4, 8, 16 bytes (float32) and 2, 16 bytes (bfloat16): aligned to 16 or not
    return [
        flat[:8],
        flat[1:9],
        flat[2:10],
        flat[4:12],
        half[:8],
        half[1:9],
        half[8:16],
        torch.zeros(3, dtype=torch.int32),
    ]


@pytest.mark.parametrize("specialize, align", [(True, True), (False, True), (True, False)])
def test_the_key_separates_exactly_what_triton_specializes(specialize, align):
    # Two arguments share a key if and only if Triton specializes them alike: a finer key would only cost a
    # JIT call, but a coarser one launches the wrong kernel, so equality both ways is checked.
    values = INTS + [0.5, 1.0, 16.0, -2.0, True, False, None] + _tensors()
    flags = [(specialize, align)]
    ours = [launch.signature([x], flags) for x in values]
    theirs = [_triton_class(x, specialize, align) for x in values]
    for (x, a, ta), (y, b, tb) in itertools.combinations(zip(values, ours, theirs), 2):
        assert (a == b) == (ta == tb), f"{x!r} and {y!r}: our keys {a}, {b}; Triton's {ta}, {tb}"


def test_a_constexpr_is_keyed_by_its_value():
    assert launch.signature([64], [None]) != launch.signature([128], [None])
    assert launch.signature([object()], [(True, True)]) is None  # another type: the call goes through the JIT


def test_direct_launches_and_the_fused_append_are_off_by_default():
    # Neither has passed a GPU run yet (bench/gpu_check.sh's launch stage): a default path must have run on its
    # hardware. Checked in a fresh interpreter with neither variable set.
    code = "from chapter3_flash.kernels import settings; print(settings.current)"
    env = {k: v for k, v in os.environ.items() if k not in ("KERNELS_DIRECT_LAUNCH", "KERNELS_FUSED_APPEND")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert (
        proc.stdout.strip()
        == "Settings(direct_launch=False, fused_append=False, check_cu_seqlens=False, backend='auto')"
    ), proc.stderr[-2000:]


@pytest.mark.parametrize(
    "raw, expected",
    [("1", True), ("ON", True), ("yes", True), ("True", True), ("y", True), (" true ", True)]
    + [("0", False), ("off", False), ("No", False), ("FALSE", False), ("n", False)],
)
def test_the_switches_parse_as_pytorch_parses_booleans(monkeypatch, raw, expected):
    monkeypatch.setenv("KERNELS_DIRECT_LAUNCH", raw)
    assert settings.env_flag("KERNELS_DIRECT_LAUNCH", not expected) is expected


def test_a_value_that_is_no_boolean_warns_and_keeps_the_default(monkeypatch):
    monkeypatch.setenv("KERNELS_DIRECT_LAUNCH", "maybe")
    with pytest.warns(UserWarning, match="maybe"):
        assert settings.env_flag("KERNELS_DIRECT_LAUNCH", False) is False


def test_the_environment_sets_the_switches_for_a_run():
    code = "from chapter3_flash.kernels import settings; print(settings.current.direct_launch)"
    for value, expected in (("off", "False"), ("on", "True"), ("false", "False")):
        env = {**os.environ, "KERNELS_DIRECT_LAUNCH": value}
        proc = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.stdout.strip() == expected, proc.stderr[-2000:]


def test_override_restores_and_refuses_unknown_settings():
    before = settings.current.direct_launch
    with settings.override(direct_launch=not before):
        assert settings.current.direct_launch is (not before)
    assert settings.current.direct_launch is before
    with pytest.raises(TypeError, match="unknown settings"):
        with settings.override(direct_lunch=True):
            pass
    with pytest.raises(TypeError, match="must be a bool"):
        with settings.override(direct_launch="yes"):
            pass


@pytest.mark.skipif(ON_GPU, reason="on a GPU the bit-for-bit test below runs the real launches")
def test_every_direct_launch_is_the_jits_for_hopper_compiled_kernels():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton's default; set to quiet its deprecation warning
    cmd = [sys.executable, "-m", "bench.launch_check"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode == 3:  # bench.sm90.UNSUPPORTED: Triton's internals moved, not a launcher problem
        pytest.skip(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "all launches agree" in proc.stdout


def _both_paths(fn):
    """fn's outputs with direct launches and through the JIT, the RNG reset before each."""
    outs = []
    for direct in (True, False):
        torch.manual_seed(0)
        with settings.override(direct_launch=direct):
            outs.append(fn())
    return outs


@pytest.mark.skipif(not ON_GPU, reason="launches real kernels; off a GPU the offline replay above checks the launches")
@pytest.mark.parametrize(
    "B, H, H_KV, N, D, dtype, offset, dropout_p",
    [
        (2, 4, 4, 128, 64, torch.bfloat16, 0, 0.0),
        (2, 4, 4, 128, 64, torch.bfloat16, 1, 0.0),  # q 2 bytes off a 16-byte address
        (1, 1, 1, 100, 40, torch.float16, 0, 0.1),  # one head (a constant to Triton); 100, 40 off multiples of 16
        (2, 8, 2, 77, 128, torch.bfloat16, 3, 0.1),  # grouped heads, unaligned, dropout
        (2, 4, 4, 64, 64, torch.float32, 0, 0.0),
    ],
)
def test_direct_and_jit_launches_agree_bit_for_bit(B, H, H_KV, N, D, dtype, offset, dropout_p):
    from chapter3_flash.kernels import flash_attention

    q, k, v = make_qkv(B, H, H_KV, N, N, D, dtype)
    flat = torch.empty(q.numel() + offset, dtype=dtype, device=q.device)
    q = flat[offset:].view_as(q).copy_(q)
    do = torch.randn_like(q)

    def call():
        for _ in range(2):  # the second call of a signature is the first direct launch, forward and backward
            qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
            out = flash_attention(qg, kg, vg, causal=True, dropout_p=dropout_p, deterministic=True)
            out.backward(do)
        return out, qg.grad, kg.grad, vg.grad

    direct, jit = _both_paths(call)
    for name, a, b in zip(("out", "dq", "dk", "dv"), direct, jit):
        assert torch.equal(a, b), f"{name} differs between the direct launch and the JIT's"


@pytest.mark.skipif(not ON_GPU, reason="launches real kernels; off a GPU the offline replay above checks the launches")
@pytest.mark.parametrize("lengths_tensor", [False, True])
def test_decode_steps_agree_bit_for_bit(lengths_tensor):
    from chapter3_flash.kernels import flash_attention_with_kvcache

    B, H, H_KV, D = 2, 8, 2, 64
    q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16)
    new_k, new_v = (torch.randn(B, H_KV, 1, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    base = [torch.randn(B, 600, H_KV, D, device="cuda", dtype=torch.bfloat16) for _ in range(2)]

    def steps():
        k_cache, v_cache = (t.clone().transpose(1, 2) for t in base)  # the book's (b, T, H, d) cache
        outs = []
        for length in (15, 16, 17, 33, 511):  # a cache length that changes every step
            lengths = torch.full((B,), length, device="cuda", dtype=torch.int32) if lengths_tensor else length
            outs.append(flash_attention_with_kvcache(q, k_cache, v_cache, new_k, new_v, cache_seqlens=lengths))
        return torch.stack(outs), k_cache

    direct, jit = _both_paths(steps)
    assert torch.equal(direct[0], jit[0]) and torch.equal(direct[1], jit[1])
    assert math.isfinite(direct[0].float().abs().sum().item())
