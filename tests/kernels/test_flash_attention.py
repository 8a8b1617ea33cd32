"""kernels.flash_attention against float64 attention: forward and all three gradients, shapes that break tiles."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE, ON_GPU, requires_gpu
from helpers import assert_close_to_reference, attention_eager
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kernels.flash_attn as fa
from kernels import flash_attention


@pytest.fixture(autouse=True)
def _no_silent_fallback(monkeypatch):
    """Any test here that reaches the eager path by accident fails: the Triton path must run."""

    def refuse(*args, **kwargs):
        raise AssertionError("the PyTorch path ran where the Triton kernel should have")

    monkeypatch.setattr(fa, "_attention_torch", refuse)


def check_against_reference(q, k, v, causal, scale=None, dout=None):
    """Run ours (Triton), float64 and PyTorch-at-our-precision; compare out, dq, dk, dv."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = flash_attention(q, k, v, causal=causal, softmax_scale=scale, backend="triton")
    dout = torch.randn_like(out) if dout is None else dout
    out.backward(dout)

    grads = {}
    for label, dtype in (("ref64", torch.float64), ("lowp", q.dtype)):
        # On the CPU, half-precision matmuls are slow and not what a user would run: PyTorch's own
        # error at that precision is measured on float32 math fed with the rounded inputs.
        compute = torch.float32 if (dtype != torch.float64 and q.device.type == "cpu") else dtype
        qq, kk, vv = (t.detach().to(compute).requires_grad_() for t in (q, k, v))
        o = attention_eager(qq, kk, vv, causal, scale)
        o.backward(dout.to(compute))
        grads[label] = [t.to(dtype) if label == "lowp" else t for t in (o, qq.grad, kk.grad, vv.grad)]
    for name, ours, ref, low in zip(("out", "dq", "dk", "dv"), (out, q.grad, k.grad, v.grad), *grads.values()):
        assert_close_to_reference(name, ours, ref, low)
    return out


def make_qkv(B, Hq, Hkv, Nq, Nk, D, dtype, device=DEVICE, scale=1.0):
    q = torch.randn(B, Hq, Nq, D, device=device, dtype=dtype) * scale
    k = torch.randn(B, Hkv, Nk, D, device=device, dtype=dtype) * scale
    v = torch.randn(B, Hkv, Nk, D, device=device, dtype=dtype)
    return q, k, v


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


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_fp32(shape, causal):
    check_against_reference(*make_qkv(*shape, torch.float32), causal)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_fp16(shape, causal):
    check_against_reference(*make_qkv(*shape, torch.float16), causal)


# bfloat16: the interpreter's bf16 tl.dot is broken, the kernel upcasts its tiles there (UPCAST flag).
@pytest.mark.parametrize("shape", SHAPES[1:4] + SHAPES[10:])
def test_matches_reference_bf16(shape):
    check_against_reference(*make_qkv(*shape, torch.bfloat16), causal=True)


def test_transposed_inputs_need_no_copy():
    # (B, N, H, D) tensors viewed as (B, H, N, D): strides (N*H*D, D, H*D, 1), not contiguous.
    B, N, H, D = 2, 45, 3, 32
    q, k, v = (torch.randn(B, N, H, D, device=DEVICE).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    out = check_against_reference(q, k, v, causal=True)
    assert out.stride() == q.stride(), "the output should share q's memory layout"


def test_strided_dout():
    # A gradient arriving as a non-contiguous view.
    q, k, v = make_qkv(1, 2, 2, 40, 40, 32, torch.float32)
    dout = torch.randn(1, 40, 2, 32, device=DEVICE).transpose(1, 2)
    check_against_reference(q, k, v, causal=True, dout=dout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
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


def test_rows_without_keys_are_zero_with_zero_grad():
    # Nq > Nk, causal: query i sees keys j <= i - 20, so rows 0..19 see nothing.
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 1, 1, 50, 30, 16, torch.float32))
    out = flash_attention(q, k, v, causal=True, backend="triton")
    out.sum().backward()
    assert torch.equal(out[:, :, :20], torch.zeros_like(out[:, :, :20]))
    assert torch.equal(q.grad[:, :, :20], torch.zeros_like(q.grad[:, :, :20]))
    assert out[:, :, 20:].abs().sum() > 0


def test_every_element_is_written(monkeypatch):
    """Outputs and gradients allocated as NaN: any element the kernels skip stays NaN."""
    real_empty_like, real_empty = torch.empty_like, torch.empty

    def poison(t):
        return t.fill_(math.nan) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty_like", lambda t, **kw: poison(real_empty_like(t, **kw)))
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(real_empty(*a, **kw)))
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 4, 2, 70, 53, 40, torch.float16))
    out = flash_attention(q, k, v, causal=True, backend="triton")
    out.backward(torch.randn_like(out))
    for name, t in (("out", out), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        assert not torch.isnan(t).any(), f"{name} has unwritten elements"


def test_auto_picks_triton_here():
    # Under the interpreter (CPU) or on a GPU, "auto" must run the kernel (the fixture forbids the eager path).
    q, k, v = make_qkv(1, 1, 1, 8, 8, 16, torch.float32)
    flash_attention(q, k, v, causal=True)


def test_deterministic_gradients():
    q, k, v = make_qkv(1, 4, 1, 64, 64, 32, torch.float16)
    grads = []
    for _ in range(2):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        flash_attention(qq, kk, vv, causal=True).backward(torch.ones(1, 4, 64, 32, dtype=torch.float16, device=DEVICE))
        grads.append((qq.grad, kk.grad, vv.grad))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("Nq, Nk", [(0, 8), (8, 0), (0, 0)])
def test_empty_sequences_match_the_eager_path(Nq, Nk):
    # Zero tokens (an empty batch of text) is not an error for the chapter's layers, so not here either.
    q, k, v = make_qkv(2, 2, 1, Nq, Nk, 16, torch.float32)
    out = flash_attention(q, k, v, causal=True, backend="triton")
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
    dtype=st.sampled_from([torch.float32, torch.float16]),
)
def test_random_shapes(B, Hkv, group, Nq, Nk, D, causal, dtype):
    check_against_reference(*make_qkv(B, Hkv * group, Hkv, Nq, Nk, D, dtype), causal)


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error before any kernel runs
# ---------------------------------------------------------------------------------------------

GOOD = dict(B=1, H=2, N=8, D=16)


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
    monkeypatch.setattr(fa, "_INTERPRET", False)
    q = _t(1, 1, 4, 16, device="cpu")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        flash_attention(q, q, q, causal=True, backend="triton")


@requires_gpu
def test_mixed_devices():
    q = _t(1, 1, 4, 16, device="cuda")
    with pytest.raises(ValueError, match="one device"):
        flash_attention(q, q.cpu(), q.cpu(), causal=True)


# ---------------------------------------------------------------------------------------------
# torch.compile and autocast
# ---------------------------------------------------------------------------------------------


def test_compiles_without_graph_break():
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 2, 24, 24, 16, torch.float32))

    def f(q, k, v):
        return flash_attention(q, k, v, causal=True).sin().sum()

    backend = "inductor" if ON_GPU else "aot_eager"
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    loss = compiled(q, k, v)
    loss.backward()
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = f(q2, k2, v2)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(q.grad, q2.grad)


def test_autocast_runs_in_lower_precision():
    device_type = "cuda" if ON_GPU else "cpu"
    dtype = torch.bfloat16
    q, k, v = make_qkv(1, 2, 2, 20, 20, 16, torch.float32)
    with torch.autocast(device_type, dtype=dtype):
        out = flash_attention(q, k, v, causal=True)
    assert out.dtype == dtype
    ref = attention_eager(q.double(), k.double(), v.double(), causal=True)
    assert (out.double() - ref).abs().max() < 5e-2


# ---------------------------------------------------------------------------------------------
# GPU only: compiled kernels at sizes the interpreter cannot reach
# ---------------------------------------------------------------------------------------------


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N, D", [(1024, 64), (2047, 128), (8192, 64), (4096, 256)])
def test_large_shapes_gpu(N, D, dtype):
    # Grouped heads at long N; small B*H keeps the float64 reference (B, H, N, N) within a few GB.
    check_against_reference(*make_qkv(1, 2, 1, N, N, D, dtype), causal=True)


@requires_gpu
def test_tf32_follows_torch_setting(monkeypatch):
    q, k, v = make_qkv(1, 4, 4, 512, 512, 64, torch.float32)
    ref = attention_eager(q.double(), k.double(), v.double(), causal=True)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    ieee = flash_attention(q, k, v, causal=True)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    tf32 = flash_attention(q, k, v, causal=True)
    err_ieee = (ieee.double() - ref).abs().max().item()
    err_tf32 = (tf32.double() - ref).abs().max().item()
    assert err_ieee < 1e-5 < err_tf32, (err_ieee, err_tf32)


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
