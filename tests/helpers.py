"""What the tests share: the device, input builders, references and the tolerance rule.

Tests import this module, never each other or conftest. conftest.py sets TRITON_INTERPRET before
anything imports kernels; this module only reads the result.

The tolerance rule is FlashAttention's, as FlagAttention states it, with PyTorch's own error measured at
our precision (bf16 matmuls on the CPU are fine at test sizes), and two more checks that rounding alone
always passes and a wrong kernel does not:

1. max error: ``max|ours - ref| <= 2 * max|torch - ref| + floor``, the floor one unit in the last place
   of the output's scale (``FLOOR``, relative to ``max|ref|``);
2. relative RMS error: ``rms(ours - ref) / rms(ref) <= 2 * (same for torch) + FLOOR``;
3. systematic error: the error's component along the reference, ``sum((ours - ref) * ref) / sum(ref^2)``,
   at most twice PyTorch's own plus ``BIAS``. Rounding to nearest is unbiased, so this stays near 0 (bf16:
   below 1.3e-3 in every case measured); TF32 truncates its operands, so there both carry a little (H100,
   run 3). A result scaled by 1.01 sits at 1e-2. The max rule alone cannot see that in bf16: 1% is about
   one ulp.

TF32 (float32 on a GPU with ``allow_tf32``): the factor 2 of rules 1 and 2 becomes ``TF32_FACTOR``. PyTorch's
cuBLAS matmuls round every operand to TF32 (to nearest); the tensor cores truncate what they are given. Our
launchers round the kernels' inputs once (``round_tf32``) and the kernels round what they make in registers
(P, dS), so every operand is rounded as cuBLAS rounds it, but the order of the sums differs. History: H200
run 4 measured 3.3 to 5.3x cuBLAS's max error with truncated operands; H100 run 6 still failed this suite's
TF32 tile tests with only the register-held operands rounded (the streamed tiles truncated); the
all-rounded inputs are checked on the next GPU run (bench/NOTES.md).
"""

from __future__ import annotations

import contextlib
import os
import socket

import pytest
import torch
from chapter3_flash.attention import reference as ref
from chapter3_flash.kernels import eager, flash_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
requires_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (compiled Triton kernels, GPU-sized shapes)")

# One unit in the last place at the output's scale, relative to max|ref| (bf16 2^-8, fp16 2^-11 of a value
# in [1, 2)); float32's covers TF32 products on a GPU.
FLOOR = {torch.float32: 2e-5, torch.float16: 2**-10, torch.bfloat16: 2**-7}
RMS_FLOOR = {torch.float32: 1e-5, torch.float16: 2**-11, torch.bfloat16: 2**-8}
BIAS = {torch.float32: 1e-4, torch.float16: 5e-4, torch.bfloat16: 3e-3}
TF32_FACTOR = 4.0


def _factor(t: torch.Tensor) -> float:
    """How many times PyTorch's error ours may reach: 2, or TF32_FACTOR where our float32 dots run as TF32 (on a
    GPU, and under the interpreter, whose launchers round the operands to TF32 as the GPU's do)."""
    tf32 = t.dtype == torch.float32 and (t.is_cuda or INTERPRETED) and torch.backends.cuda.matmul.allow_tf32
    return TF32_FACTOR if tf32 else 2.0


@contextlib.contextmanager
def allow_tf32(enabled: bool):
    """PyTorch's float32 matmul setting inside the block, restored after it. (Not monkeypatch: the setting is a
    property of a module object, and pytest 9.2's monkeypatch cannot restore it, so it leaked into later tests.)"""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def visible(n_q: int, n_k: int, causal: bool, window=(-1, -1), device=None) -> torch.Tensor:
    """(n_q, n_k) bool: which keys each query sees, written apart from kernels/masks.py (a reference that calls the
    code under test checks nothing). Query i sits at position i + n_k - n_q (bottom-right alignment); it sees key
    j when j is at most ``right`` after it (0 when causal, unbounded at -1) and at most ``left`` before it."""
    left, right = window
    if causal:
        right = 0
    pos = torch.arange(n_q)[:, None] + (n_k - n_q)  # (n_q, 1)
    key = torch.arange(n_k)[None, :]  # (1, n_k)
    out = torch.ones(n_q, n_k, dtype=torch.bool)
    if right >= 0:
        out &= key - pos <= right
    if left >= 0:
        out &= pos - key <= left
    return out.to(device)


def free_port() -> int:
    """A TCP port on localhost nobody listens on now: the rendezvous of the tests' process groups."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_qkv(B, Hq, Hkv, Nq, Nk, D, dtype, device=DEVICE, scale=1.0):
    """Fresh normal q, k, v: (B, Hq, Nq, D), (B, Hkv, Nk, D) twice; scale stretches the logits."""
    q = torch.randn(B, Hq, Nq, D, device=device, dtype=dtype) * scale
    k = torch.randn(B, Hkv, Nk, D, device=device, dtype=dtype) * scale
    v = torch.randn(B, Hkv, Nk, D, device=device, dtype=dtype)
    return q, k, v


def tf32_round(x: torch.Tensor) -> torch.Tensor:
    """float32 values rounded to TF32's 10-bit mantissa, to nearest with ties away from zero (as cuBLAS rounds its
    operands), by integer arithmetic on the bits; NaN and Inf unchanged."""
    bits = x.contiguous().view(torch.int32)
    magnitude = (bits & 0x7FFFFFFF).to(torch.int64)
    rounded = ((magnitude + (1 << 12)) >> 13) << 13
    out = (rounded.to(torch.int32) | (bits & -(2**31))).view(torch.float32)
    return torch.where(torch.isfinite(x), out, x)


class _MatmulTF32(torch.autograd.Function):
    """a @ b as cuBLAS computes it with TF32 allowed: both operands rounded to TF32, exact products, float32 sums;
    the backward's two matmuls likewise."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return tf32_round(a) @ tf32_round(b)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        g = tf32_round(g)
        return g @ tf32_round(b).transpose(-2, -1), tf32_round(a).transpose(-2, -1) @ g


def emulates_tf32(t: torch.Tensor) -> bool:
    """Whether our kernels compute float32 ``t`` with TF32 matmuls where PyTorch on the same device would not: under
    the interpreter on a CPU (a CPU's matmuls are never TF32)."""
    return t.dtype == torch.float32 and INTERPRETED and not t.is_cuda and torch.backends.cuda.matmul.allow_tf32


def attention_eager(q, k, v, causal: bool, scale=None, keep=None, p=0.0, window=(-1, -1), tf32: bool = False):
    """Plain attention in the inputs' own dtype (softmax in float32, as PyTorch users write it), grouped
    heads, the tests' own visibility rule, an optional fixed dropout keep mask. ``tf32``: the matmuls as
    cuBLAS computes them with TF32 allowed (float32 inputs on a CPU, where PyTorch itself never does)."""
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    matmul = _MatmulTF32.apply if tf32 else torch.matmul
    k = k.repeat_interleave(H // Hkv, dim=1)  # (B, H, Nk, D)
    v = v.repeat_interleave(H // Hkv, dim=1)
    s = matmul(q, k.transpose(-2, -1)) * scale  # (B, H, Nq, Nk)
    s = s.masked_fill(~visible(Nq, Nk, causal, window, device=q.device), float("-inf"))
    w = torch.softmax(s.float(), dim=-1).nan_to_num(0.0).to(q.dtype)
    if keep is not None:
        w = w * keep.to(w.dtype) / (1 - p)
    return matmul(w, v)


def assert_close_to_reference(name: str, ours: torch.Tensor, ref64: torch.Tensor, torch_lowp: torch.Tensor) -> None:
    """The three checks of the module docstring."""
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    dtype = ours.dtype
    exact = ref64.double()
    mine, theirs = ours.double() - exact, torch_lowp.double() - exact
    err, err_torch = mine.abs().max().item(), theirs.abs().max().item()
    floor, factor = FLOOR[dtype] * max(1.0, exact.abs().max().item()), _factor(ours)
    assert err <= factor * err_torch + floor, (
        f"{name}: max error {err:.3e} > {factor:g} * torch's {err_torch:.3e} + {floor:.1e}"
    )
    norm = exact.pow(2).sum().item()
    if norm == 0.0:
        return
    rms, rms_torch = (mine.pow(2).sum().item() / norm) ** 0.5, (theirs.pow(2).sum().item() / norm) ** 0.5
    limit = factor * rms_torch + RMS_FLOOR[dtype]
    assert rms <= limit, (
        f"{name}: relative RMS error {rms:.3e} > {factor:g} * torch's {rms_torch:.3e} + {RMS_FLOOR[dtype]:.1e}"
    )
    bias, bias_torch = (mine * exact).sum().item() / norm, (theirs * exact).sum().item() / norm
    limit = 2 * abs(bias_torch) + BIAS[dtype]
    assert abs(bias) <= limit, f"{name}: systematic error {bias:+.2e} along the reference (limit {limit:.1e})"


@contextlib.contextmanager
def backward_path(name: str | None):
    """Run the Triton backward named ``name`` ("one-pass" or "two-kernel") inside the block, whatever the config
    table would choose for the case (``deterministic=True`` still rules the one pass out); None: the table's."""
    if name is None:
        yield
        return
    if name not in ("one-pass", "two-kernel"):
        raise ValueError(f"backward path must be 'one-pass' or 'two-kernel', got {name!r}")
    from chapter3_flash.kernels import configs

    real = configs.one_pass_backward
    configs.one_pass_backward = lambda dropout, n_keys, head_dim: name == "one-pass"
    try:
        yield
    finally:
        configs.one_pass_backward = real


@contextlib.contextmanager
def only_path(path: str):
    """Fail if any other attention path than ``path`` runs inside the block (no silent fallback)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a PyTorch path ran where the {path} path should have")

    saved = {name: getattr(eager, name) for name in ("attention_reference", "attention_sdpa")}
    keep = {"sdpa": "attention_sdpa", "torch": "attention_reference"}.get(path)
    try:
        for name in saved:
            if name != keep:
                setattr(eager, name, refuse)
        yield
    finally:
        for name, fn in saved.items():
            setattr(eager, name, fn)


def check_against_reference(
    q, k, v, causal, scale=None, dout=None, window=(-1, -1), backend="triton", deterministic=None, backward=None, **kw
):
    """Run ours, float64 and PyTorch at our precision; compare out, dq, dk, dv by the tolerance rule.
    ``backward`` forces the Triton backward's path ("one-pass" / "two-kernel"; see backward_path)."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    with only_path(backend), backward_path(backward):
        out = flash_attention(
            q, k, v, causal=causal, softmax_scale=scale, window_size=window, backend=backend,
            deterministic=deterministic, **kw,
        )  # fmt: skip
        dout = torch.randn_like(out) if dout is None else dout
        out.backward(dout)
    grads = {}
    for label, dtype in (("ref64", torch.float64), ("lowp", q.dtype)):
        qq, kk, vv = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
        tf32 = label == "lowp" and emulates_tf32(q)  # PyTorch's error as it would be on a GPU with TF32
        o = attention_eager(qq, kk, vv, causal, scale, window=window, tf32=tf32)
        o.backward(dout.to(dtype))
        grads[label] = [o, qq.grad, kk.grad, vv.grad]
    for name, ours, ref64, low in zip(("out", "dq", "dk", "dv"), (out, q.grad, k.grad, v.grad), *grads.values()):
        assert_close_to_reference(name, ours, ref64, low)
    return out


# ---------------------------------------------------------------------------------------------
# The chapter's layers
# ---------------------------------------------------------------------------------------------

# The chapter's six 3-d embeddings of "Your journey starts with one step" and the values it prints.
INPUTS = torch.tensor(
    [
        [0.43, 0.15, 0.89],
        [0.55, 0.87, 0.66],
        [0.57, 0.85, 0.64],
        [0.22, 0.58, 0.33],
        [0.77, 0.25, 0.10],
        [0.05, 0.80, 0.55],
    ]
)
V1_OUT = [[0.2996, 0.8053], [0.3061, 0.8210], [0.3058, 0.8203], [0.2948, 0.7939], [0.2927, 0.7891], [0.2990, 0.8040]]
CAUSAL_OUT = [
    [-0.4519, 0.2216],
    [-0.5874, 0.0058],
    [-0.6300, -0.0632],
    [-0.5675, -0.0843],
    [-0.5526, -0.0981],
    [-0.5299, -0.1081],
]

# (class name, constructor args, input shape or None for a constructor error, message regex): the chapter's
# layers and the fused ones must refuse the same input with the same words.
BAD_INPUTS = [
    ("MultiHeadAttention", (4, 6, 5, 0.0, 4), None, "d_out 6 must be divisible by num_heads 4"),
    ("MultiHeadAttention", (4, 4, 5, 0.0, 2), (1, 6, 4), "num_tokens 6 exceeds context_length 5"),
    ("CausalAttention", (4, 4, 5, 0.0), (1, 7, 4), "num_tokens 7 exceeds context_length 5"),
    ("MultiHeadAttentionWrapper", (4, 4, 5, 0.0, 2), (1, 7, 4), "num_tokens 7"),
    ("CausalAttention", (4, 4, 5, 0.0), (5, 4), r"\(batch, num_tokens, d_in\)"),
    ("MultiHeadAttention", (4, 4, 5, 0.0, 2), (2, 5, 3), "d_in=4"),
    ("SelfAttention_v1", (3, 2), (1, 1, 6, 3), r"\(num_tokens, d_in\)"),
    ("SelfAttention_v2", (3, 2), (6,), r"\(num_tokens, d_in\)"),
]


def assert_refuses(module, name, args, shape, words) -> None:
    """Building ``name`` from ``module`` with ``args`` and calling it on ``shape`` raises a ValueError
    naming ``words``."""
    with pytest.raises(ValueError, match=words):
        layer = getattr(module, name)(*args)
        layer(torch.randn(*shape))


def build(name: str, args, seed=123, module=None, **kw):
    """The fused layer (from ``module``, default ``attention``) and the chapter's, both built after the same
    seed, on the test device."""
    from chapter3_flash import attention

    torch.manual_seed(seed)
    ours = getattr(module or attention, name)(*args, **kw)
    torch.manual_seed(seed)
    theirs = getattr(ref, name)(*args, **kw)
    return ours.to(DEVICE), theirs.to(DEVICE)


def twin_layers(ours_cls, book_cls, *args, seed: int, **kw):
    """Our layer and a reader's copy of the book's, each built after ``torch.manual_seed(seed)`` on the test
    device; their state_dicts must match key for key and value for value (same parameters, same order)."""
    torch.manual_seed(seed)
    ours = ours_cls(*args, **kw).to(DEVICE)
    torch.manual_seed(seed)
    theirs = book_cls(*args, **kw).to(DEVICE)
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a), "parameters differ after the same seed"
    return ours, theirs


def assert_same_outputs_and_grads(ours, theirs, *inputs, tol: dict) -> None:
    """Both layers on the same inputs (the first gets a gradient): outputs, the input's gradient and every
    parameter's gradient for one random output gradient."""
    x = inputs[0]
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_a, out_b = ours(xa, *inputs[1:]), theirs(xb, *inputs[1:])
    torch.testing.assert_close(out_a, out_b, **tol)
    dout = torch.randn_like(out_a)
    out_a.backward(dout)
    out_b.backward(dout)
    torch.testing.assert_close(xa.grad, xb.grad, **tol)
    for (name, pa), (_, pb) in zip(ours.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, **tol, msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------------------------------------
# Softcap, sinks, the log-sum-exp and packed (varlen) batches: a reference of its own
# ---------------------------------------------------------------------------------------------


def attention_ref(q, k, v, *, causal, scale=None, window=(-1, -1), softcap=0.0, sinks=None, keep=None, p=0.0):
    """One problem (B, H, N, D), written out from the definitions, apart from kernels/: grouped heads by
    repetition, bottom-right alignment (query i at position i + Nk - Nq), the window, Gemma 2's cap, GPT-OSS's
    sink in the denominator; ``keep`` a fixed dropout mask (B, H, Nq, Nk) with probability ``p``. Computes in the
    inputs' dtype (softmax in float32 for half inputs, as PyTorch
    users write it; float64 in, float64 throughout). Returns (out, lse): lse the natural log-sum-exp of the
    visible capped scores (sink excluded), -inf for a row that sees no key."""
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    k = k.repeat_interleave(H // Hkv, dim=1)  # (B, H, Nk, D)
    v = v.repeat_interleave(H // Hkv, dim=1)
    s = (q @ k.transpose(-2, -1)) * scale  # (B, H, Nq, Nk)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    pos = torch.arange(Nq, device=q.device)[:, None] + (Nk - Nq)  # (Nq, 1)
    key = torch.arange(Nk, device=q.device)[None, :]  # (1, Nk)
    left, right = window
    right = 0 if causal else right
    seen = torch.ones(Nq, Nk, dtype=torch.bool, device=q.device)
    if right >= 0:
        seen &= key <= pos + right
    if left >= 0:
        seen &= key >= pos - left
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = s.to(work).masked_fill(~seen, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (B, H, Nq)
    m = torch.maximum(lse, sinks.to(work)[None, :, None]) if sinks is not None else lse
    m = torch.where(torch.isinf(m), 0.0, m).detach()  # a row with no key and no sink: weights 0 below
    num = torch.exp(s - m[..., None])  # (B, H, Nq, Nk)
    den = num.sum(-1, keepdim=True)
    if sinks is not None:
        den = den + torch.exp(sinks.to(work)[None, :, None, None] - m[..., None])
    w = num / torch.where(den == 0, 1.0, den)
    if keep is not None:
        w = w * keep.to(w.dtype) / (1 - p)  # dropout after the softmax, its normalizer untouched
    return (w.to(q.dtype) @ v), lse.detach().float()


def varlen_ref(q, k, v, cu_q, cu_k, **kw):
    """The packed call sequence by sequence through ``attention_ref``: q (total_q, Hq, D), k, v (total_k, Hkv,
    D); returns (out (total_q, Hq, D), lse (Hq, total_q))."""
    cq, ck = cu_q.tolist(), cu_k.tolist()
    outs, lses = [], []
    for b in range(len(cq) - 1):
        qb = q[cq[b] : cq[b + 1]].transpose(0, 1)[None]  # (1, Hq, n, D)
        kb = k[ck[b] : ck[b + 1]].transpose(0, 1)[None]
        vb = v[ck[b] : ck[b + 1]].transpose(0, 1)[None]
        o, lse = attention_ref(qb, kb, vb, **kw)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.cat(outs, 0), torch.cat(lses, 1)


def cu_seqlens(lengths, device=DEVICE) -> torch.Tensor:
    """int32 (B + 1,) running sums of ``lengths`` from 0."""
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device=device)


# ---------------------------------------------------------------------------------------------
# Whole book models against the same models with fused layers (the newer models' tests)
# ---------------------------------------------------------------------------------------------


def fused_copy(model: torch.nn.Module, targets: dict) -> torch.nn.Module:
    """A deep copy of ``model`` with each layer whose class is a key of ``targets`` turned into the value's class,
    as swap_attention does (same objects, same weights); at least one must be."""
    import copy

    ours = copy.deepcopy(model)
    turned = 0
    for m in ours.modules():
        if type(m) in targets:
            m.__class__ = targets[type(m)]
            turned += 1
    assert turned, f"no layer of {sorted(c.__name__ for c in targets)} in the model"
    return ours


def assert_same_training_step(ours, theirs, ids: torch.Tensor, targets: torch.Tensor, tol: dict) -> None:
    """Logits, the cross-entropy loss and every parameter's gradient of one training step (dropout 0)."""
    results = []
    for model in (ours, theirs):
        model.train()
        logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        results.append((logits, loss, {k: p.grad for k, p in model.named_parameters()}))
    (lo, loss_o, grads_o), (lt, loss_t, grads_t) = results
    torch.testing.assert_close(lo, lt, **tol)
    torch.testing.assert_close(loss_o, loss_t, **tol)
    for name in grads_t:
        torch.testing.assert_close(grads_o[name], grads_t[name], **tol, msg=lambda m, n=name: f"{n}: {m}")


def greedy(model, ids: torch.Tensor, steps: int, n_layers: int | None = None):
    """Greedy tokens after ``ids``: without a cache (the whole sequence each step) when ``n_layers`` is None,
    else as the book's KV-cache notebooks run it (``reset_kv_cache``, a list of per-layer caches, the prompt then
    one token per call). Returns the tokens and, cached, every call's logits concatenated on the token dim."""
    model.eval()
    with torch.no_grad():
        if n_layers is None:
            for _ in range(steps):
                ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
            return ids, None
        model.reset_kv_cache()
        cache = [None] * n_layers
        logits = model(ids, cache=cache)
        every = [logits]
        for _ in range(steps):
            token = logits[:, -1:].argmax(-1)
            ids = torch.cat([ids, token], dim=1)
            logits = model(token, cache=cache)
            every.append(logits)
        return ids, torch.cat(every, dim=1)
