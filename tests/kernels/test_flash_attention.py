"""kernels.flash_attention against float64 attention: forward and all three gradients, shapes that break tiles.

Every agreement case runs on the Triton path (the interpreter on a CPU) and on the SDPA path (PyTorch's
fused kernels with our semantics); the gradients through both backward passes of the Triton path.
"""

from __future__ import annotations

import math

import chapter3_flash.kernels.flash_attn as fa
import pytest
import torch
import triton
import triton.language as tl
from chapter3_flash.kernels import configs, flash_attention
from helpers import (
    DEVICE,
    INTERPRETED,
    ON_GPU,
    allow_tf32,
    assert_close_to_reference,
    attention_eager,
    backward_path,
    check_against_reference,
    make_qkv,
    requires_gpu,
    tf32_round,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# (B, Hq, Hkv, Nq, Nk, D) and what each breaks.
SHAPES = [
    pytest.param((1, 1, 1, 1, 1, 64), id="N1"),  # one query, one key
    pytest.param((2, 3, 3, 100, 100, 64), id="ragged100"),  # N not a multiple of any block
    pytest.param((1, 2, 2, 17, 17, 1), id="d1"),  # head dim 1 (the chapter's smallest), padded to 16
    pytest.param((1, 2, 2, 33, 33, 2), id="d2"),  # head dim 2, as in the chapter's examples
    pytest.param((1, 2, 2, 50, 50, 24), id="d24"),  # not a power of two
    pytest.param((1, 2, 2, 40, 40, 40), id="d40"),
    pytest.param((1, 1, 1, 65, 65, 80), id="d80"),
    pytest.param((1, 1, 1, 48, 48, 96), id="d96"),
    pytest.param((1, 1, 1, 40, 40, 128), id="d128"),
    pytest.param((1, 1, 1, 33, 33, 256), id="d256"),  # the largest supported head dim
    pytest.param((1, 4, 2, 37, 77, 40), id="gqa-chunked-prefill"),  # grouped heads, Nq < Nk
    pytest.param((1, 4, 1, 5, 70, 64), id="mqa-decode"),  # multi-query, a few new tokens on a cache
    pytest.param((1, 2, 2, 1, 64, 64), id="decode1"),  # one new token sees all keys
    pytest.param((1, 2, 2, 70, 30, 32), id="nq-gt-nk"),  # causal rows that see no key at all
]
BACKENDS = ["triton", "sdpa"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_fp32(shape, causal, backend):
    check_against_reference(*make_qkv(*shape, torch.float32), causal, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_fp16(shape, causal, backend):
    check_against_reference(*make_qkv(*shape, torch.float16), causal, backend=backend)


# bfloat16: the interpreter's bf16 tl.dot is broken, the kernel upcasts its tiles there (UPCAST flag).
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", SHAPES[1:4] + SHAPES[10:])
def test_matches_reference_bf16(shape, causal, backend):
    check_against_reference(*make_qkv(*shape, torch.bfloat16), causal, backend=backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[10], SHAPES[13]])
def test_deterministic_backward_matches_reference(shape, dtype):
    # deterministic=True: the two-kernel backward (dQ, then dK/dV; no atomics) whatever the case.
    check_against_reference(*make_qkv(*shape, dtype), causal=True, deterministic=True)


# Sliding windows (left, right), FlashAttention's rule: what each breaks.
WINDOWS = [
    pytest.param(True, (16, -1), id="causal-w16"),  # left edge inside a tile, causal diagonal
    pytest.param(True, (0, -1), id="causal-w0"),  # each query sees only its own key
    pytest.param(True, (45, -1), id="causal-w45"),  # left edge off every block boundary
    pytest.param(False, (7, 3), id="w7-3"),  # two-sided, not causal
    pytest.param(False, (-1, 5), id="right5"),  # bounded on the right only
    pytest.param(False, (20, -1), id="left20"),  # bounded on the left only, sees all the future
    pytest.param(True, (500, -1), id="causal-wide"),  # wider than the sequence: plain causal
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal, window", WINDOWS)
@pytest.mark.parametrize(
    "shape",
    [
        pytest.param((1, 2, 2, 90, 90, 32), id="self"),
        pytest.param((1, 4, 2, 37, 77, 40), id="gqa-nq-lt-nk"),
        pytest.param((1, 2, 1, 70, 30, 16), id="nq-gt-nk"),  # rows that see nothing
    ],
)
def test_sliding_window(shape, causal, window, backend):
    check_against_reference(*make_qkv(*shape, torch.float32), causal, window=window, backend=backend)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sliding_window_half_and_deterministic(dtype):
    q, k, v = make_qkv(1, 4, 2, 80, 80, 64, dtype)
    check_against_reference(q, k, v, causal=True, window=(24, -1))
    check_against_reference(q, k, v, causal=True, window=(24, -1), deterministic=True)


def test_gemma_like_window_head_dim_256():
    # Gemma 3: head dim 256, one KV head, a sliding window (512 there; 40 at test size).
    check_against_reference(*make_qkv(1, 4, 1, 100, 100, 256, torch.float16), causal=True, window=(39, -1))


def test_transposed_inputs_need_no_copy():
    # (B, N, H, D) tensors viewed as (B, H, N, D): strides (N*H*D, D, H*D, 1), not contiguous.
    B, N, H, D = 2, 45, 3, 32
    q, k, v = (torch.randn(B, N, H, D, device=DEVICE).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    out = check_against_reference(q, k, v, causal=True)
    assert out.stride() == q.stride(), "the output should share q's memory layout"
    check_against_reference(q, k, v, causal=True, backend="sdpa")


@pytest.mark.parametrize("backend", ["triton", "sdpa", "torch"])
def test_head_vectors_with_a_stride(backend):
    """A last dimension that is not contiguous (every other element of a wider tensor; a (D, N, H, B) tensor
    permuted): the reference's answer on every path, forward and backward. PyTorch's CPU flash kernel reads a head
    vector as consecutive elements whatever its stride: wrong values and no error, before the "sdpa" path copied
    such inputs."""
    q = torch.randn(2, 3, 21, 64, device=DEVICE)[..., ::2]
    k = torch.randn(32, 21, 3, 2, device=DEVICE).permute(3, 2, 1, 0)
    v = torch.randn(2, 3, 21, 96, device=DEVICE)[..., 32:64]
    assert q.stride(-1) == 2 and k.stride(-1) == 21 * 3 * 2
    check_against_reference(q, k, v, causal=True, backend=backend)
    check_against_reference(q, k, v, causal=False, backend=backend, window=(5, 2), return_lse=False)


def test_strided_dout():
    # A gradient arriving as a non-contiguous view.
    q, k, v = make_qkv(1, 2, 2, 40, 40, 32, torch.float32)
    dout = torch.randn(1, 40, 2, 32, device=DEVICE).transpose(1, 2)
    check_against_reference(q, k, v, causal=True, dout=dout)
    check_against_reference(q, k, v, causal=True, dout=dout, deterministic=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_large_logits(dtype):
    # Scores in the hundreds: the online softmax must subtract its running max, not overflow.
    check_against_reference(*make_qkv(1, 2, 2, 60, 60, 64, dtype, scale=5.0), causal=True)


def test_custom_softmax_scale():
    check_against_reference(*make_qkv(1, 2, 2, 30, 30, 16, torch.float32), causal=True, scale=0.37)
    # Scale 1: the chapter's simplified attention.
    check_against_reference(*make_qkv(1, 1, 1, 6, 6, 3, torch.float32), causal=False, scale=1.0)
    # Negative and zero scales take the forward's other row-max path (max(qk * s) != max(qk) * s); with
    # scores in the hundreds a wrong running max overflows exp2.
    check_against_reference(*make_qkv(1, 2, 2, 70, 70, 16, torch.float32, scale=5.0), causal=True, scale=-0.4)
    check_against_reference(*make_qkv(1, 2, 2, 70, 70, 16, torch.float32, scale=5.0), causal=False, scale=-0.4)
    check_against_reference(*make_qkv(1, 1, 1, 40, 40, 16, torch.float32), causal=True, scale=0.0)
    check_against_reference(*make_qkv(1, 2, 2, 30, 30, 16, torch.float32), causal=True, scale=0.37, backend="sdpa")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("backward", ["one-pass", "two-kernel"])
def test_rows_without_keys_are_zero_with_zero_grad(backward, backend):
    # Nq > Nk, causal: query i sees keys j <= i - 20, so rows 0..19 see nothing.
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 1, 1, 50, 30, 16, torch.float32))
    with backward_path(backward):
        out = flash_attention(q, k, v, causal=True, backend=backend)
        out.sum().backward()
    assert torch.equal(out[:, :, :20], torch.zeros_like(out[:, :, :20]))
    assert torch.equal(q.grad[:, :, :20], torch.zeros_like(q.grad[:, :, :20]))
    assert out[:, :, 20:].abs().sum() > 0
    assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()


@pytest.mark.parametrize("backward", ["one-pass", "two-kernel"])
def test_every_element_is_written(monkeypatch, backward):
    """Outputs and gradients allocated as NaN: any element the kernels skip stays NaN."""
    real_empty_like, real_empty = torch.empty_like, torch.empty

    def poison(t):
        return t.fill_(math.nan) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty_like", lambda t, **kw: poison(real_empty_like(t, **kw)))
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(real_empty(*a, **kw)))
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 4, 2, 70, 53, 40, torch.float16))
    with backward_path(backward):
        out = flash_attention(q, k, v, causal=True, backend="triton")
        out.backward(torch.randn_like(out))
    for name, t in (("out", out), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        assert not torch.isnan(t).any(), f"{name} has unwritten elements"


def test_auto_picks_triton_here():
    # Under the interpreter (CPU) or on a GPU, "auto" must run the kernel, not a PyTorch path.
    from helpers import only_path

    q, k, v = make_qkv(1, 1, 1, 8, 8, 16, torch.float32)
    with only_path("triton"):
        flash_attention(q, k, v, causal=True)


def test_deterministic_gradients_are_bit_identical():
    q, k, v = make_qkv(1, 4, 1, 64, 64, 32, torch.float16)
    grads = []
    for _ in range(2):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out = flash_attention(qq, kk, vv, causal=True, deterministic=True)
        out.backward(torch.ones_like(out))
        grads.append((qq.grad, kk.grad, vv.grad))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_deterministic_algorithms_flag_picks_the_deterministic_backward(monkeypatch):
    # PyTorch's convention: under torch.use_deterministic_algorithms(True) the backward is reproducible.
    seen = []
    real = fa.backward
    monkeypatch.setattr(fa, "backward", lambda *args, **kw: seen.append(args[-1].deterministic) or real(*args, **kw))
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 2, 20, 20, 16, torch.float32))
    flash_attention(q, k, v, causal=True).sum().backward()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        flash_attention(q, k, v, causal=True).sum().backward()
    finally:
        torch.use_deterministic_algorithms(previous)
    flash_attention(q, k, v, causal=True, deterministic=True).sum().backward()
    assert seen == [False, True, True]


def test_deterministic_rules_out_the_one_pass_backward(monkeypatch):
    # Even where the config table would take the one pass (dropout on a short sequence), deterministic=True
    # keeps the atomics out: the one pass's first kernel never launches.
    def refuse(grid, *args, **kwargs):
        raise AssertionError("the one-pass backward ran under deterministic=True")

    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 2, 40, 40, 16, torch.float32))
    monkeypatch.setattr(fa, "_attn_bwd_preprocess_launcher", refuse)
    with backward_path("one-pass"):
        flash_attention(q, k, v, causal=True, dropout_p=0.2, deterministic=True).sum().backward()
        with pytest.raises(AssertionError, match="one-pass backward ran"):
            flash_attention(q, k, v, causal=True, dropout_p=0.2).sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Nq, Nk", [(0, 8), (8, 0), (0, 0)])
def test_empty_sequences_match_the_eager_path(Nq, Nk, backend):
    # Zero tokens (an empty batch of text) is not an error for the chapter's layers, so not here either.
    q, k, v = make_qkv(2, 2, 1, Nq, Nk, 16, torch.float32)
    out = flash_attention(q, k, v, causal=True, backend=backend)
    assert out.shape == (2, 2, Nq, 16)
    assert torch.equal(out, attention_eager(q, k, v, causal=True))


def test_double_backward_is_refused_not_silently_wrong():
    q, k, v = (torch.randn(1, 2, 20, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    out = flash_attention(q, k, v, causal=True, backend="triton")
    (dq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice|does not require grad"):
        dq.sum().backward()


def test_no_grad_and_inference_mode():
    q, k, v = make_qkv(1, 2, 2, 20, 20, 16, torch.float32)
    with torch.inference_mode():
        a = flash_attention(q, k, v, causal=True)
    with torch.no_grad():
        b = flash_attention(q, k, v, causal=True)
    assert torch.equal(a, b)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    B=st.integers(1, 2),
    Hkv=st.integers(1, 2),
    group=st.integers(1, 3),
    Nq=st.integers(1, 80),
    Nk=st.integers(1, 80),
    D=st.sampled_from([1, 3, 8, 16, 24, 33, 64, 72, 128]),
    causal=st.booleans(),
    left=st.sampled_from([-1, -1, 0, 5, 31]),
    right=st.sampled_from([-1, -1, 0, 9]),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    backward=st.sampled_from(["one-pass", "two-kernel"]),
)
def test_random_shapes(B, Hkv, group, Nq, Nk, D, causal, left, right, dtype, backward):
    q, k, v = make_qkv(B, Hkv * group, Hkv, Nq, Nk, D, dtype)
    check_against_reference(q, k, v, causal, window=(left, right), backward=backward)


# ---------------------------------------------------------------------------------------------
# The tolerance rule itself: it must catch a 1% error in any value
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("which", ["out", "dq", "dk", "dv"])
def test_tolerance_rule_catches_a_one_percent_error(which, dtype):
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 4, 2, 37, 77, 40, dtype))
    out = flash_attention(q, k, v, causal=True)
    dout = torch.randn_like(out)
    out.backward(dout)
    values = {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
    refs = {}
    for label, cdt in (("ref64", torch.float64), ("lowp", dtype)):
        qq, kk, vv = (t.detach().to(cdt).requires_grad_() for t in (q, k, v))
        o = attention_eager(qq, kk, vv, causal=True)
        o.backward(dout.to(cdt))
        refs[label] = {"out": o, "dq": qq.grad, "dk": kk.grad, "dv": vv.grad}
    assert_close_to_reference(which, values[which], refs["ref64"][which], refs["lowp"][which])  # ours passes
    with pytest.raises(AssertionError):
        assert_close_to_reference(which, values[which] * 1.01, refs["ref64"][which], refs["lowp"][which])


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error before any kernel runs
# ---------------------------------------------------------------------------------------------


def _t(*shape, dtype=torch.float32, device=DEVICE):
    return (
        torch.randn(*shape, dtype=dtype, device=device) if dtype.is_floating_point else torch.zeros(*shape, dtype=dtype)
    )


@pytest.mark.parametrize(
    "q, k, v, kwargs, error, words",
    [
        (_t(2, 8, 16), _t(1, 2, 8, 16), _t(1, 2, 8, 16), {}, ValueError, "rank 4"),
        (_t(1, 2, 8, 16), _t(1, 2, 8, 16), _t(1, 2, 9, 16), {}, ValueError, "same shape"),
        (_t(1, 2, 8, 16), _t(1, 2, 8, 8), _t(1, 2, 8, 8), {}, ValueError, "head_dim 16 of q does not match 8"),
        (_t(2, 2, 8, 16), _t(1, 2, 8, 16), _t(1, 2, 8, 16), {}, ValueError, "batch 2"),
        (_t(1, 3, 8, 16), _t(1, 2, 8, 16), _t(1, 2, 8, 16), {}, ValueError, "multiple of key/value heads 2"),
        (_t(1, 2, 8, 16), _t(1, 2, 8, 16), _t(1, 2, 8, 16), {"dropout_p": 1.5}, ValueError, "dropout_p"),
        (_t(1, 2, 8, 16), _t(1, 2, 8, 16), _t(1, 2, 8, 16), {"dropout_p": -0.1}, ValueError, "dropout_p"),
        (_t(1, 2, 8, 16), _t(1, 2, 8, 16), _t(1, 2, 8, 16), {"dropout_p": math.nan}, ValueError, "dropout_p"),
        (_t(1, 2, 8, 16), _t(1, 2, 8, 16), _t(1, 2, 8, 16), {"dropout_p": "0.1"}, TypeError, "dropout_p"),
        (_t(1, 2, 8, 16), _t(1, 2, 8, 16), _t(1, 2, 8, 16), {"backend": "cuda"}, ValueError, "backend"),
        (_t(1, 2, 8, 16), _t(1, 2, 8, 16), _t(1, 2, 8, 16), {"softmax_scale": math.inf}, ValueError, "finite"),
        (_t(1, 2, 8, 0), _t(1, 2, 8, 0), _t(1, 2, 8, 0), {}, ValueError, "head_dim must be at least 1"),
        (_t(1, 2, 8, 300), _t(1, 2, 8, 300), _t(1, 2, 8, 300), {"backend": "triton"}, ValueError, "head_dim 300"),
        (_t(1, 2, 8, 16, dtype=torch.float16), _t(1, 2, 8, 16), _t(1, 2, 8, 16), {}, TypeError, "one dtype"),
        (_t(1, 2, 8, 16, dtype=torch.int32), _t(1, 2, 8, 16), _t(1, 2, 8, 16), {}, TypeError, "torch.int32"),
        (_t(1, 2, 8, 16, dtype=torch.float64), _t(1, 2, 8, 16), _t(1, 2, 8, 16), {}, TypeError, "float64"),
        ([[1.0]], _t(1, 2, 8, 16), _t(1, 2, 8, 16), {}, TypeError, "q must be a torch.Tensor"),
        (_t(1, 2, 8, 16), _t(1, 2, 8, 16), _t(1, 2, 8, 16), {"window_size": (-2, 0)}, ValueError, "window_size left"),
        (_t(1, 2, 8, 16), _t(1, 2, 8, 16), _t(1, 2, 8, 16), {"window_size": (4, -3)}, ValueError, "window_size right"),
        (_t(1, 2, 8, 16), _t(1, 2, 8, 16), _t(1, 2, 8, 16), {"window_size": (1.5, 0)}, TypeError, "window_size left"),
        (_t(1, 2, 8, 16), _t(1, 2, 8, 16), _t(1, 2, 8, 16), {"window_size": (1, 2, 3)}, TypeError, "pair"),
        (_t(1, 2, 8, 16), _t(1, 2, 8, 16), _t(1, 2, 8, 16), {"window_size": 4}, TypeError, "pair"),
        (_t(1, 2, 8, 16), _t(1, 2, 8, 16), _t(1, 2, 8, 16), {"window_size": (True, 0)}, TypeError, "window_size"),
        (_t(1, 2, 8, 16), _t(1, 2, 8, 16), _t(1, 2, 8, 16), {"deterministic": "yes"}, TypeError, "deterministic"),
    ],
)
def test_bad_input(q, k, v, kwargs, error, words):
    kwargs.setdefault("causal", True)
    with pytest.raises(error, match=words):
        flash_attention(q, k, v, **kwargs)


def test_strides_too_large_for_int32_tile_offsets():
    q = torch.empty(2**23 * 4 + 16, device=DEVICE).as_strided((1, 1, 4, 16), (0, 0, 2**23, 1))
    k = torch.randn(1, 1, 4, 16, device=DEVICE)
    with pytest.raises(ValueError, match="q has strides"):
        flash_attention(q, k, k, causal=True, backend="triton")


def test_causal_must_be_given_as_bool():
    q = _t(1, 1, 4, 16)
    with pytest.raises(TypeError, match="causal"):
        flash_attention(q, q, q, causal=1)
    with pytest.raises(TypeError):
        flash_attention(q, q, q)  # causal is keyword-only and required


@pytest.mark.skipif(ON_GPU, reason="checks the CPU error when Triton cannot run")
def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setattr(fa, "INTERPRET", False)
    q = _t(1, 1, 4, 16, device="cpu")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        flash_attention(q, q, q, causal=True, backend="triton")


def test_mixed_devices():
    # A meta tensor stands in for a second device on a machine with one.
    q = _t(1, 1, 4, 16)
    other = torch.empty(1, 1, 4, 16, device="meta")
    with pytest.raises(ValueError, match="one device"):
        flash_attention(q, other, other, causal=True)


@triton.jit
def _round_tf32_kernel(X, Y, n, ROUND_TF32: tl.constexpr):
    offs = tl.arange(0, 1024)
    x = tl.load(X + offs, mask=offs < n)
    tl.store(Y + offs, fa._tf32(x, ROUND_TF32), mask=offs < n)


def test_tf32_rounding_is_round_to_nearest_ties_away():
    # _tf32 against the rounding cuBLAS applies (cvt.rna.tf32.f32), written on the bits: keep sign, exponent
    # and 10 mantissa bits, to nearest, halfway cases away from zero. Ties, both signs, carries into the
    # exponent, subnormals, infinities.
    mantissa = torch.tensor([0x0FFF, 0x1000, 0x1001, 0x1FFF, 0x2000, 0x3000, 0x7FFFFF, 0x7FF000], dtype=torch.int32)
    exponent = torch.tensor([0, 1, 100, 127, 254], dtype=torch.int32) << 23
    bits = (exponent[:, None] | mantissa[None, :]).flatten()
    bits = torch.cat([bits, bits | torch.tensor(-(2**31), dtype=torch.int32)])
    x = torch.cat([bits.view(torch.float32), torch.randn(500), torch.tensor([float("inf"), -float("inf"), 0.0])])
    y = torch.empty_like(x)
    with torch.device(DEVICE):
        x, y = x.to(DEVICE), y.to(DEVICE)
        _round_tf32_kernel[(1,)](x, y, x.numel(), ROUND_TF32=True)
        xb = x.cpu().view(torch.int32)
        magnitude = xb & 0x7FFFFFFF
        rounded = ((magnitude + 0x1000) & ~0x1FFF) | (xb & -(2**31))  # on the magnitude, then the sign back
        assert torch.equal(y.cpu().view(torch.int32), rounded)
        assert (y.cpu().view(torch.int32) & 0x1FFF).eq(0).all()  # exactly representable in TF32
        _round_tf32_kernel[(1,)](x, y, x.numel(), ROUND_TF32=False)
        assert torch.equal(y, x)  # off: the operand as it is
        # NaNs stay NaN whatever their payload (adding to the bits of 0x7FFFFFFF would carry into the sign).
        nan_bits = torch.tensor([0x7FC00000, 0x7FFFFFFF, 0x7FFFF000, -1, -(2**31) | 0x7F800001], dtype=torch.int32)
        nans = nan_bits.view(torch.float32).to(DEVICE)
        out = torch.empty_like(nans)
        _round_tf32_kernel[(1,)](nans, out, nans.numel(), ROUND_TF32=True)
        assert torch.equal(out.cpu().view(torch.int32), nan_bits)


def test_round_tf32_rounds_strided_inputs_as_the_kernels_do():
    # The launchers' TF32 inputs, rounded once before the kernels: every element by _tf32's rule, whatever the
    # strides (the layers' transposed views), head dims off powers of two, rows past one block.
    x = torch.randn(2, 70, 3, 40, device=DEVICE).transpose(1, 2)  # (B, H, N, D), not contiguous
    x[0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    y = fa.round_tf32(x)
    assert y.shape == x.shape and y.is_contiguous()
    xb = x.cpu().contiguous().view(torch.int32)
    expected = (((xb & 0x7FFFFFFF) + 0x1000) & ~0x1FFF) | (xb & -(2**31))
    finite = torch.isfinite(x.cpu().contiguous())
    assert torch.equal(y.cpu().view(torch.int32)[finite], expected[finite])
    assert y[0, 0, 0, 0].isnan() and y[0, 0, 0, 1] == float("inf") and y[0, 0, 0, 2] == -float("inf")
    assert fa.round_tf32(x[:, :, :0]).shape == (2, 3, 0, 40)


@pytest.mark.skipif(not (ON_GPU or INTERPRETED), reason="the Triton launchers run on a GPU or the interpreter")
def test_the_launchers_hand_the_kernels_tf32_rounded_operands(monkeypatch):
    # With PyTorch's TF32 setting on, float32 q, k, v reach the forward and backward kernels rounded to TF32, bit
    # for bit as cuBLAS rounds its operands (on the interpreter too, whose float32 dots then give TF32's products).
    q, k, v = make_qkv(1, 2, 2, 20, 20, 24, torch.float32)
    q[0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    q[0, 0, 1, 0] = 1.0 + 2**-11  # a tie: rounds away from zero
    q[0, 0, 1, 1] = -(1.0 + 3 * 2**-11)  # another tie, negative
    seen = {}
    real = fa._attn_fwd_launcher

    def spy(grid, *args, **kwargs):
        seen["q"], seen["k"], seen["v"] = args[:3]
        return real(grid, *args, **kwargs)

    monkeypatch.setattr(fa, "_attn_fwd_launcher", spy)
    with allow_tf32(True):
        flash_attention(q, k, v, causal=True, backend="triton")
    for name, t in (("q", q), ("k", k), ("v", v)):
        assert torch.equal(seen[name].cpu().view(torch.int32), tf32_round(t.cpu()).view(torch.int32)), name
    assert seen["q"][0, 0, 1, 0].item() == 1.0 + 2**-10 and seen["q"][0, 0, 1, 1].item() == -(1.0 + 2**-9)
    with allow_tf32(False):
        flash_attention(q, k, v, causal=True, backend="triton")
    assert seen["q"] is q  # TF32 off: the inputs as they are


def test_tf32_follows_torch_setting(monkeypatch):
    # float32 runs exact products unless PyTorch's own matmul setting allows TF32: the choice, and its tiles.
    q = torch.zeros(1, 1, 8, 64)
    with allow_tf32(False):
        assert fa._precision(q) == "ieee" and fa._flags(q, fa.Spec(True, 0.0, 1.0))["INPUT_PRECISION"] == "ieee"
    ieee = configs.select("fwd", 64, "ieee", dropout=False, interpret=False)
    with allow_tf32(True):
        assert fa._precision(q) == "tf32" and fa._flags(q, fa.Spec(True, 0.0, 1.0))["INPUT_PRECISION"] == "tf32"
    assert fa._precision(q.half()) == "half"
    assert configs.select("fwd", 64, "tf32", dropout=False, interpret=False) != ieee


# ---------------------------------------------------------------------------------------------
# torch.compile and autocast
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [(-1, -1), (8, -1)])
def test_compiles_without_graph_break(window):
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 2, 24, 24, 16, torch.float32))

    def f(q, k, v):
        return flash_attention(q, k, v, causal=True, window_size=window).sin().sum()

    backend = "inductor" if ON_GPU else "aot_eager"
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    loss = compiled(q, k, v)
    loss.backward()
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = f(q2, k2, v2)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for a, b in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad, b.grad)


def test_autocast_runs_in_lower_precision():
    device_type = "cuda" if ON_GPU else "cpu"
    dtype = torch.bfloat16
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 2, 20, 20, 16, torch.float32))
    with torch.autocast(device_type, dtype=dtype):
        out = flash_attention(q, k, v, causal=True)
    assert out.dtype == dtype
    dout = torch.randn_like(out)
    out.backward(dout)
    qq, kk, vv = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_eager(qq, kk, vv, causal=True)
    ref.backward(dout.double())
    assert (out.double() - ref).abs().max() < 5e-2
    for ours, theirs in ((q.grad, qq.grad), (k.grad, kk.grad), (v.grad, vv.grad)):
        assert ours.dtype == torch.float32  # gradients arrive in the leaves' dtype
        assert (ours.double() - theirs).abs().max() < 5e-2 * max(1.0, theirs.abs().max().item())


# ---------------------------------------------------------------------------------------------
# GPU only: compiled kernels at sizes the interpreter cannot reach
# ---------------------------------------------------------------------------------------------


@requires_gpu
@pytest.mark.parametrize("backward", ["one-pass", "two-kernel"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N, D", [(1024, 64), (2047, 128), (8192, 64), (4096, 256)])
def test_large_shapes_gpu(N, D, dtype, backward):
    # Grouped heads at long N; small B*H keeps the float64 reference (B, H, N, N) within a few GB.
    check_against_reference(*make_qkv(1, 2, 1, N, N, D, dtype), causal=True, backward=backward)


@requires_gpu
@pytest.mark.parametrize("window", [(256, -1), (511, 0), (100, 100)])
def test_large_windows_gpu(window):
    check_against_reference(*make_qkv(1, 2, 1, 3000, 3000, 64, torch.bfloat16), causal=window[1] == -1, window=window)


@requires_gpu
def test_tf32_error_is_bounded_by_cublas_tf32(monkeypatch):
    # Our TF32 error at most twice that of the chapter's own eager attention run with TF32 matmuls (cuBLAS).
    q, k, v = make_qkv(1, 4, 4, 512, 512, 64, torch.float32)
    ref = attention_eager(q.double(), k.double(), v.double(), causal=True)
    with allow_tf32(False):
        ieee = flash_attention(q, k, v, causal=True)
    with allow_tf32(True):
        tf32 = flash_attention(q, k, v, causal=True)
        cublas_tf32 = attention_eager(q, k, v, causal=True)
    err_ieee = (ieee.double() - ref).abs().max().item()
    err_tf32 = (tf32.double() - ref).abs().max().item()
    err_cublas = (cublas_tf32.double() - ref).abs().max().item()
    assert err_ieee < 1e-5 < err_tf32, (err_ieee, err_tf32)
    assert err_tf32 <= 2 * err_cublas + 1e-5, (err_tf32, err_cublas)


def _spread_rows(values: torch.Tensor, row_stride: int) -> torch.Tensor:
    """A view of values whose rows sit row_stride elements apart, in a storage left mostly untouched."""
    N, D = values.shape[-2:]
    storage = torch.empty((N - 1) * row_stride + D, dtype=values.dtype, device=values.device)
    view = storage.as_strided(values.shape, (0, 0, row_stride, 1))
    view.copy_(values)
    return view


@pytest.mark.parametrize("spread", ["q", "kv"])
def test_row_offsets_past_2_pow_31(spread):
    # Rows 2^20 elements apart (as in a (B, N, H, D) layout with H*D = 2^20): row 2048 starts at
    # element 2^31, where int32 offsets wrap. Long on one side, short on the other, to stay quick.
    long, short = 2049, 3
    Nq, Nk = (long, short) if spread == "q" else (short, long)
    q, k, v = make_qkv(1, 1, 1, Nq, Nk, 16, torch.float16)
    if spread == "q":
        q = _spread_rows(q, 2**20)
    else:
        k, v = _spread_rows(k, 2**20), _spread_rows(v, 2**20)
    check_against_reference(q, k, v, causal=False)
