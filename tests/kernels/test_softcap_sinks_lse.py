"""flash_attention's softcap, sinks and log-sum-exp against tests/helpers.attention_ref (its own float64 lines).

Every path: the Triton kernels (the interpreter on a CPU), the chunked PyTorch path ("sdpa") and the eager
reference ("torch"). Forward, the log-sum-exp, and the gradients of q, k, v and the sinks.
"""

from __future__ import annotations

import pytest
import torch
from chapter3_flash.kernels import eager, flash_attention
from helpers import DEVICE, assert_close_to_reference, attention_ref, make_qkv

BACKENDS = ["triton", "sdpa", "torch"]
# (B, Hq, Hkv, Nq, Nk, D): grouped heads with Nq < Nk; Nq > Nk (causal rows that see no key); one query.
SHAPES = [
    pytest.param((2, 4, 2, 37, 45, 16), id="gqa-nq-lt-nk"),
    pytest.param((1, 2, 2, 40, 24, 32), id="nq-gt-nk"),
    pytest.param((1, 2, 1, 1, 33, 16), id="one-query"),
]
FEATURES = [
    pytest.param(dict(softcap=2.5), id="softcap"),
    pytest.param(dict(sinks=True), id="sinks"),
    pytest.param(dict(softcap=1.5, sinks=True), id="softcap+sinks"),
    pytest.param(dict(), id="lse-only"),
]


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    # Several query chunks at test sizes, so that the chunked path's chunk edges are exercised.
    monkeypatch.setattr(eager, "CHUNK_ROWS", 16)


def _lse_close(name, ours, ref64, lowp):
    """-inf exactly where the reference has it; the rest by the tolerance rule."""
    assert ours.dtype == torch.float32, f"{name}: dtype {ours.dtype}"
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    empty = torch.isneginf(ref64)
    assert torch.equal(torch.isneginf(ours), empty), f"{name}: -inf where the reference is finite, or not where it is"
    if (~empty).any():
        assert_close_to_reference(name, ours[~empty], ref64[~empty].double(), lowp[~empty])


def check_features(q, k, v, *, causal, window=(-1, -1), softcap=0.0, sinks=None, backend="triton", scale=None):
    """Ours against attention_ref in float64 and at our precision: out, lse, dq, dk, dv and dsinks."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    s = sinks.detach().requires_grad_() if sinks is not None else None
    out, lse = flash_attention(
        q, k, v, causal=causal, window_size=window, softcap=softcap, sinks=s, backend=backend, return_lse=True,
        softmax_scale=scale,
    )  # fmt: skip
    dout = torch.randn_like(out)
    out.backward(dout)
    ours = {"out": out, "dq": q.grad, "dk": k.grad, "dv": v.grad}
    if s is not None:
        ours["dsinks"] = s.grad
    refs = {}
    for label, dtype in (("ref64", torch.float64), ("lowp", q.dtype)):
        qq, kk, vv = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
        ss = (
            s.detach().to(torch.float64 if dtype == torch.float64 else s.dtype).requires_grad_()
            if s is not None
            else None
        )
        o, lse_ref = attention_ref(qq, kk, vv, causal=causal, window=window, softcap=softcap, sinks=ss, scale=scale)
        o.backward(dout.to(dtype))
        refs[label] = {"out": o, "dq": qq.grad, "dk": kk.grad, "dv": vv.grad, "lse": lse_ref}
        if ss is not None:
            refs[label]["dsinks"] = ss.grad
    for name, value in ours.items():
        assert_close_to_reference(name, value, refs["ref64"][name], refs["lowp"][name])
    _lse_close("lse", lse, refs["ref64"]["lse"], refs["lowp"]["lse"])
    assert lse.shape == q.shape[:3] and not lse.requires_grad
    return out, lse


def _sinks(h):
    return torch.randn(h, device=DEVICE) * 2.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("features", FEATURES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_fp32(shape, causal, features, backend):
    kw = dict(features)
    if kw.pop("sinks", False):
        kw["sinks"] = _sinks(shape[1])
    check_features(*make_qkv(*shape, torch.float32, scale=2.0), causal=causal, backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [(8, 0), (5, 3), (-1, 4)], ids=["left8", "left5-right3", "right4"])
def test_windows(window, backend):
    q, k, v = make_qkv(2, 4, 2, 30, 40, 16, torch.float32, scale=2.0)
    check_features(q, k, v, causal=False, window=window, softcap=3.0, sinks=_sinks(4), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [(8, 0), (5, 3), (-1, 4)], ids=["left8", "left5-right3", "right4"])
def test_lse_alone_with_windows(window, backend):
    """The lse without softcap or sinks: on a CPU the "sdpa" path takes it from PyTorch's flash kernel, chunk by
    chunk along a window."""
    q, k, v = make_qkv(2, 4, 2, 30, 40, 16, torch.float32, scale=2.0)
    check_features(q, k, v, causal=window[1] == 0, window=window, backend=backend)


def test_bottom_right_causal_in_row_chunks_where_one_mask_would_be_large(monkeypatch):
    """Causal with Nq < Nk on a CPU's "sdpa" path: one (Nq, Nk) mask, or query chunks with a mask each above
    eager.MASK_BYTES; both give the chapter's answer, and the lse."""
    q, k, v = make_qkv(2, 4, 2, 37, 45, 16, torch.float32, scale=2.0)
    whole, lse_whole = check_features(q, k, v, causal=True, backend="sdpa")
    monkeypatch.setattr(eager, "MASK_BYTES", 0)
    chunked, lse_chunked = check_features(q, k, v, causal=True, backend="sdpa")
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse_chunked, lse_whole, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype, backend):
    q, k, v = make_qkv(1, 4, 2, 33, 41, 32, dtype, scale=2.0)
    check_features(q, k, v, causal=True, softcap=2.0, sinks=_sinks(4), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_scale_and_large_logits(backend):
    # A negative scale flips every score; softcap keeps logits of size 100 inside (-cap, cap).
    q, k, v = make_qkv(1, 2, 2, 20, 28, 16, torch.float32, scale=10.0)
    check_features(q, k, v, causal=True, softcap=5.0, sinks=_sinks(2), backend=backend, scale=-0.3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_that_see_no_key(backend):
    # Causal, Nq > Nk: the first 16 rows see no key: zeros, lse -inf, zero gradients, with or without sinks.
    q, k, v = make_qkv(1, 2, 2, 24, 8, 16, torch.float32)
    out, lse = check_features(q, k, v, causal=True, sinks=_sinks(2), backend=backend)
    assert torch.equal(out[:, :, :16], torch.zeros_like(out[:, :, :16]))
    assert torch.isneginf(lse[:, :, :16]).all() and torch.isfinite(lse[:, :, 16:]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_keys_at_all_gives_zero_sink_gradient(backend):
    q = torch.randn(1, 2, 4, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 2, 0, 16, device=DEVICE)
    s = torch.randn(2, device=DEVICE, requires_grad=True)
    out, lse = flash_attention(q, k, k, causal=False, sinks=s, backend=backend, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    out.sum().backward()
    assert s.grad is not None and torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_merges_partial_attentions_and_the_sink_applies_after(backend):
    """What the log-sum-exp is for: attention over keys [0, 20) and [20, 50) computed apart and merged by their
    lse is attention over all 50; the sink applied once after the merge is the call with sinks."""
    q, k, v = make_qkv(1, 4, 2, 9, 50, 16, torch.float32, scale=1.5)
    sinks = _sinks(4)
    full, lse = flash_attention(q, k, v, causal=False, backend=backend, return_lse=True)
    o1, l1 = flash_attention(q, k[:, :, :20], v[:, :, :20], causal=False, backend=backend, return_lse=True)
    o2, l2 = flash_attention(q, k[:, :, 20:], v[:, :, 20:], causal=False, backend=backend, return_lse=True)
    merged_lse = torch.logaddexp(l1, l2)
    merged = o1 * torch.exp(l1 - merged_lse)[..., None] + o2 * torch.exp(l2 - merged_lse)[..., None]
    torch.testing.assert_close(merged_lse, lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged, full, atol=1e-5, rtol=1e-5)
    with_sink, lse_sink = flash_attention(q, k, v, causal=False, sinks=sinks, backend=backend, return_lse=True)
    torch.testing.assert_close(lse_sink, lse, atol=1e-5, rtol=1e-5)  # the sink is not in the lse
    torch.testing.assert_close(
        with_sink, full * torch.sigmoid(lse - sinks[None, :, None])[..., None], atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_lse_does_not_change_the_output_or_the_dropout_draws(backend):
    q, k, v = make_qkv(1, 2, 2, 20, 20, 16, torch.float32)
    torch.manual_seed(3)
    plain = flash_attention(q, k, v, causal=True, dropout_p=0.3, backend=backend)
    torch.manual_seed(3)
    out, _ = flash_attention(q, k, v, causal=True, dropout_p=0.3, backend=backend, return_lse=True)
    assert torch.equal(out, plain)


def test_softcap_zero_is_no_cap_and_a_huge_cap_is_almost_none():
    q, k, v = make_qkv(1, 2, 2, 20, 20, 16, torch.float32)
    plain = flash_attention(q, k, v, causal=True)
    assert torch.equal(flash_attention(q, k, v, causal=True, softcap=0.0), plain)
    torch.testing.assert_close(flash_attention(q, k, v, causal=True, softcap=1e4), plain, atol=1e-5, rtol=1e-5)


def test_paths_agree_with_dropout_statistics():
    """softcap and sinks under dropout (chunked path): E[out] over many seeds is the undropped output."""
    q, k, v = make_qkv(1, 1, 1, 12, 12, 16, torch.float32)
    sinks = _sinks(1)
    plain = flash_attention(q, k, v, causal=True, softcap=2.0, sinks=sinks, backend="sdpa")
    mean = torch.stack(
        [
            flash_attention(q, k, v, causal=True, softcap=2.0, sinks=sinks, dropout_p=0.3, backend="sdpa")
            for _ in range(400)
        ]
    ).mean(0)
    assert (mean - plain).abs().max() < 0.15, (mean - plain).abs().max()


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"softcap": -1.0}, ValueError, "softcap must be a finite float >= 0"),
        ({"softcap": float("inf")}, ValueError, "softcap"),
        ({"softcap": True}, TypeError, "softcap must be a float"),
        ({"softcap": "1"}, TypeError, "softcap"),
        ({"sinks": [0.0, 0.0]}, TypeError, "sinks must be a torch.Tensor"),
        ({"sinks": torch.zeros(3)}, ValueError, r"sinks must have shape \(Hq,\) = \(2,\)"),
        ({"sinks": torch.zeros(1, 2)}, ValueError, "sinks must have shape"),
        ({"sinks": torch.zeros(2, dtype=torch.int64)}, TypeError, "sinks has dtype torch.int64"),
        ({"sinks": torch.zeros(2, device="meta")}, ValueError, "sinks is on meta"),
        ({"return_lse": 1}, TypeError, "return_lse must be a bool"),
    ],
)
def test_bad_input(kwargs, error, words):
    q = _t(1, 2, 8, 16)
    with pytest.raises(error, match=words):
        flash_attention(q, q, q, causal=True, **kwargs)


@pytest.mark.parametrize("sinks", [True, False], ids=["sinks", "no-sinks"])
def test_compiles_without_graph_break(sinks):
    """The custom ops carry softcap, the sinks (and their gradient) and the lse under torch.compile."""
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 2, 24, 24, 16, torch.float32))
    s = _sinks(2).requires_grad_() if sinks else None

    def f(q, k, v, s):
        out, lse = flash_attention(q, k, v, causal=True, softcap=2.0, sinks=s, return_lse=True)
        return out.sin().sum() + lse.sum().detach()

    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    loss = compiled(q, k, v, s)
    loss.backward()
    leaves = [q, k, v] + ([s] if sinks else [])
    twins = [t.detach().clone().requires_grad_() for t in leaves]
    ref = f(*twins[:3], twins[3] if sinks else None)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for a, b in zip(leaves, twins):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("backward", ["one-pass", "two-kernel"])
def test_triton_dropout_with_softcap_and_sinks(backward):
    """Dropout's mask depends on the seed and positions only: read it through a plain call (q = 0, v = I: the output
    row is the kept weights), then check a call with softcap, sinks and the same seed, forward and all gradients,
    against attention_ref with that mask."""
    B, Hq, Hkv, Nq, Nk, D, p = 1, 2, 1, 20, 24, 16, 0.3
    seed = 99
    zeros, eye = torch.zeros(B, Hq, Nq, Nk, device=DEVICE), torch.eye(Nk, device=DEVICE).expand(B, Hkv, Nk, Nk)
    torch.manual_seed(seed)  # then the call draws its seed first, as the call below does
    probe = flash_attention(zeros, eye, eye, causal=True, dropout_p=p, backend="triton")
    seen = torch.ones(Nq, Nk, dtype=torch.bool, device=DEVICE).tril(Nk - Nq)
    n_visible = seen.sum(-1, keepdim=True).float()
    keep = (probe * (1 - p) * n_visible).round().bool() & seen  # (B, Hq, Nq, Nk)
    q, k, v = (t.requires_grad_() for t in make_qkv(B, Hq, Hkv, Nq, Nk, D, torch.float32, scale=2.0))
    sinks = _sinks(Hq).requires_grad_()
    from helpers import backward_path

    torch.manual_seed(seed)
    with backward_path(backward):
        out = flash_attention(q, k, v, causal=True, dropout_p=p, softcap=2.0, sinks=sinks, backend="triton")
        dout = torch.randn_like(out)
        out.backward(dout)
    refs = {}
    for label, dtype in (("ref64", torch.float64), ("lowp", torch.float32)):
        qq, kk, vv, ss = (t.detach().to(dtype).requires_grad_() for t in (q, k, v, sinks))
        o, _ = attention_ref(qq, kk, vv, causal=True, softcap=2.0, sinks=ss, keep=keep, p=p)
        o.backward(dout.to(dtype))
        refs[label] = [o, qq.grad, kk.grad, vv.grad, ss.grad]
    ours = (out, q.grad, k.grad, v.grad, sinks.grad)
    for name, mine, ref64, low in zip(("out", "dq", "dk", "dv", "dsinks"), ours, *refs.values()):
        assert_close_to_reference(name, mine, ref64, low)
