"""``flash_attention_varlen``: packed batches of sequences of different lengths, FlashAttention-2's layout.

A batch of ``B`` sequences is packed token after token, with no padding: q is ``(total_q, Hq, D)``, k and v
``(total_k, Hkv, D)``, and sequence ``b`` owns query rows ``cu_seqlens_q[b] <= t < cu_seqlens_q[b + 1]`` and key
rows ``cu_seqlens_k[b] <= t < cu_seqlens_k[b + 1]`` (``cu_seqlens_*`` int32 ``(B + 1,)``, the running sums of the
lengths, starting at 0). Every sequence is its own attention problem with ``flash_attention``'s semantics:
bottom-right causal alignment per sequence (a sequence with fewer queries than keys holds its newest queries),
grouped heads, windows, softcap, sinks; a sequence of 0 queries costs nothing, one of 0 keys returns zeros.

Dropout: the keep bit of weight (query i, key j) of head h of a sequence is the one ``kernels/dropout.py``
gives ``(b, h, i, j)`` with ``b = 0``, ``i`` and ``j`` the positions WITHIN the sequence, and the call's seed. So
a sequence's mask depends on the seed, its head and its own positions only, never on which sequences are
packed with it, in what order, or at what offset: it is the mask ``flash_attention`` draws for that sequence
alone (batch 1) with the same seed. The price: sequences of one call share the bits at the same (head, i, j),
where a dense batch varies them by batch index. (The PyTorch path gets the same property its own way: each
sequence starts from the same generator state, the one a call on that sequence alone would start from.)

What is checked: types, ranks, shapes, dtypes (``cu_seqlens`` of another dtype than int32 is a TypeError) and
devices always. The VALUES of ``cu_seqlens`` (starts at 0, never decreases, ends at the token count, no
sequence longer than ``max_seqlen``) are checked on the host when they live there (CPU tensors: free). On CUDA
they are trusted, as FlashAttention-2 trusts them (checking needs a device-to-host copy, a sync per call); set
``settings.current.check_cu_seqlens`` (``KERNELS_CHECK_CU_SEQLENS=1`` in the environment, or
``settings.override(check_cu_seqlens=True)``) checks them there too, at one sync per call. Wrong values on CUDA unchecked read and write outside a sequence's rows.

Paths: the PyTorch path (``backend="sdpa"`` / ``"torch"``, what ``"auto"`` takes off CUDA) loops over the
sequences and runs ``flash_attention``'s path of that name on each: exact, and never a ``(total, total)``
matrix (the largest is one sequence's chunk, or its ``(Nq, Nk)`` on the ``"torch"`` reference). The Triton path
(``"triton"``, what ``"auto"`` takes on CUDA) is one launch per kernel for the whole batch: programs over (query
tiles of the longest sequence, heads, sequences), each reading its sequence's bounds from ``cu_seqlens``; a program
whose tile lies past its own sequence returns at once (an early exit: such programs are launched and cost a few
loads, as FlashAttention-2's varlen grid does; a precomputed list of real tiles would launch none).

Under ``torch.compile`` the Triton path runs as two custom ops (no graph break, as ``flash_attention``); the
PyTorch path's loop is a graph break; the values of ``cu_seqlens`` are not checked inside a compiled region.
"""

from __future__ import annotations

import torch

from . import eager, interface, settings
from . import flash_attn as fa
from .checks import (
    MAX_GRID_YZ,
    autocast_dtype,
    check_cu_seqlens_values,
    check_deterministic,
    check_dropout,
    check_flag,
    check_options,
    check_sinks,
    check_softcap,
    check_varlen,
)
from .flash_attn import Spec, Varlen


def flash_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    deterministic: bool | None = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over a packed batch of sequences of different lengths (see the module docstring).

    Args:
        q: ``(total_q, Hq, D)``; k, v: ``(total_k, Hkv, D)``, ``Hq % Hkv == 0``; float16, bfloat16 or float32.
        cu_seqlens_q, cu_seqlens_k: int32 ``(B + 1,)`` on q's device: sequence ``b`` owns rows
            ``cu[b] <= t < cu[b + 1]`` of q (resp. k, v).
        max_seqlen_q, max_seqlen_k: ints at least the longest sequence's query (key) count.
        causal, dropout_p, softmax_scale, window_size, softcap, sinks, deterministic, backend: as in
            ``flash_attention``, per sequence.
        return_lse: also return the log-sum-exp.

    Returns:
        ``(total_q, Hq, D)`` in q's dtype; with ``return_lse`` ``(out, lse)``, lse ``(Hq, total_q)`` float32 with
        ``flash_attention``'s meaning (natural log, sink excluded, -inf for a row that sees no key).
    """
    check_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        # Under torch.compile the values are data the trace cannot read: not checked there (run once eagerly).
        check_values=(isinstance(q, torch.Tensor) and q.device.type == "cpu" or settings.current.check_cu_seqlens)
        and not torch.compiler.is_compiling(),
    )  # fmt: skip
    window = check_options(causal, softmax_scale, window_size, backend)
    dropout_p = check_dropout(dropout_p)
    softcap = check_softcap(softcap)
    check_sinks(sinks, q.shape[1], q.device)
    check_flag("return_lse", return_lse)
    deterministic = check_deterministic(deterministic)
    dtype = autocast_dtype(q)  # as flash_attention: checked as given, then attention in autocast's precision
    if dtype is not None:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    scale = float(q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale)
    spec = Spec(causal, dropout_p, scale, window[0], window[1], deterministic, softcap)
    path = interface.choose_path(_view(q), backend)
    if path == "triton":
        interface._check_triton_limits(_view(q), _view(k), _view(v))
        n_seq = cu_seqlens_q.shape[0] - 1
        if n_seq > MAX_GRID_YZ:
            raise ValueError(f"{n_seq} sequences: the Triton kernels take at most {MAX_GRID_YZ}")
        return _varlen_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, spec, sinks, return_lse)
    return _varlen_per_sequence(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, spec, sinks, return_lse, path
    )


# A loop over host-read offsets: under torch.compile a graph break here (the Triton path compiles whole).
@torch.compiler.disable
def _varlen_per_sequence(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, spec: Spec, sinks, return_lse: bool, path: str
):
    """The PyTorch path: ``flash_attention``'s ``path`` on each sequence as a batch of one. Reads the offsets on
    the host (free on a CPU; one sync on a device)."""
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    total_q, H = q.shape[0], q.shape[1]
    if (
        q.device.type != "cpu" and not settings.current.check_cu_seqlens
    ):  # read anyway: checked for free (on a CPU: done)
        check_cu_seqlens_values("cu_seqlens_q", starts_q, total_q, max_seqlen_q)
        check_cu_seqlens_values("cu_seqlens_k", starts_k, k.shape[0], max_seqlen_k)
    gen = _generator_of(q.device) if spec.dropout_p > 0.0 else None
    state = gen.get_state() if gen is not None else None
    outs, lses = [], []
    for b in range(len(starts_q) - 1):
        q0, q1, k0, k1 = starts_q[b], starts_q[b + 1], starts_k[b], starts_k[b + 1]
        if q1 == q0:
            continue  # no query: nothing to compute, nothing to draw
        if state is not None:
            gen.set_state(state)  # the state a call on this sequence alone would start from
        # (n, H, D) rows of the packed tensors as (1, H, n, D) views: no copies.
        qb, kb, vb = (t[a:z].transpose(0, 1)[None] for t, a, z in ((q, q0, q1), (k, k0, k1), (v, k0, k1)))
        out = interface.flash_attention(
            qb, kb, vb, causal=spec.causal, dropout_p=spec.dropout_p, softmax_scale=spec.softmax_scale,
            window_size=(spec.window_left, spec.window_right), deterministic=spec.deterministic, backend=path,
            softcap=spec.softcap, sinks=sinks, return_lse=return_lse,
        )  # fmt: skip
        if return_lse:
            out, lse = out
            lses.append(lse[0])  # (Hq, n)
        outs.append(out[0].transpose(0, 1))  # (n, Hq, D)
    if not outs:  # no sequence has a query: total_q is 0
        out = eager.zeros_attention(q, k, v, sinks)
        lse = q.new_empty((H, total_q), dtype=torch.float32)
    else:
        out = torch.cat(outs, dim=0)  # (total_q, Hq, D)
        lse = torch.cat(lses, dim=1) if return_lse else None  # (Hq, total_q)
    return (out, lse) if return_lse else out


def _view(t: torch.Tensor) -> torch.Tensor:
    """(total, H, D) as the kernels' (1, H, total, D): a view."""
    return t.transpose(0, 1)[None]


def _unview(t: torch.Tensor) -> torch.Tensor:
    """(1, H, total, D) back to (total, H, D): a view."""
    return t[0].transpose(0, 1)


class _VarlenAttention(torch.autograd.Function):
    """The Triton kernels on a packed batch; returns ``(out, lse)``, lse (H, total_q) in the kernels' units (base 2,
    +inf for a row that sees no key; no gradient)."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, varlen: Varlen, spec: Spec):
        o, lse, seed = fa.forward(_view(q), _view(k), _view(v), spec, sinks=sinks, varlen=varlen)
        out = _unview(o)
        ctx.save_for_backward(q, k, v, out, lse, seed, sinks)
        ctx.varlen, ctx.spec = varlen, spec
        ctx.mark_non_differentiable(lse)
        return out, lse[0]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, seed, sinks = ctx.saved_tensors
        grads = fa.backward(
            _view(dout), _view(q), _view(k), _view(v), _view(out), lse, seed, ctx.spec, sinks=sinks,
            varlen=ctx.varlen,
        )  # fmt: skip
        dq, dk, dv = (_unview(g) for g in grads[:3])
        return dq, dk, dv, grads[3] if sinks is not None else None, None, None


@torch.library.custom_op(f"{interface._OPS}::varlen_fwd", mutates_args=())
def _varlen_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    dropout_p: float,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    deterministic: bool,
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Under torch.compile: the forward as an op opaque to the compiler, as the dense path's. Returns the kernels'
    (1, H, total_q, D) output, (1, H, total_q) lse and the seed."""
    spec = Spec(causal, dropout_p, softmax_scale, window_left, window_right, deterministic, softcap)
    varlen = Varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return fa.forward(_view(q), _view(k), _view(v), spec, sinks=sinks, varlen=varlen)


@_varlen_fwd_op.register_fake
def _(q, k, v, sinks, *rest):
    H, T = q.shape[1], q.shape[0]
    o = torch.empty_like(_view(q))  # the kernels' output takes q's layout
    return o, q.new_empty((1, H, T), dtype=torch.float32), q.new_empty((1,), dtype=torch.int64)


@torch.library.custom_op(f"{interface._OPS}::varlen_bwd", mutates_args=())
def _varlen_bwd_op(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    seed: torch.Tensor,
    sinks: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    dropout_p: float,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    deterministic: bool,
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv as (1, H, total, D) and dsinks (an empty tensor without sinks). ``do`` and ``o`` (1, H, total_q,
    D); q, k, v as the user passed them."""
    spec = Spec(causal, dropout_p, softmax_scale, window_left, window_right, deterministic, softcap)
    varlen = Varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    grads = fa.backward(do, _view(q), _view(k), _view(v), o, lse, seed, spec, sinks=sinks, varlen=varlen)
    dq, dk, dv = (g.clone() if g._base is not None else g for g in grads[:3])  # no output may alias another
    return dq, dk, dv, (grads[3] if sinks is not None else q.new_empty(0))


@_varlen_bwd_op.register_fake
def _(do, q, k, v, o, lse, seed, sinks, *rest):
    dsinks = torch.empty_like(sinks) if sinks is not None else q.new_empty(0)
    return torch.empty_like(_view(q)), torch.empty_like(_view(k)), torch.empty_like(_view(v)), dsinks


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, sinks, cu_q, cu_k, *rest = inputs
    o, lse, seed = output
    ctx.save_for_backward(q, k, v, o, lse, seed, sinks, cu_q, cu_k)
    ctx.rest = rest  # max_seqlen_q, max_seqlen_k, then the spec's fields
    ctx.mark_non_differentiable(lse, seed)


def _varlen_backward(ctx, do, _dlse, _dseed):
    q, k, v, o, lse, seed, sinks, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv, dsinks = _varlen_bwd_op(do, q, k, v, o, lse, seed, sinks, cu_q, cu_k, *ctx.rest)
    grads = (_unview(dq), _unview(dk), _unview(dv), dsinks if sinks is not None else None)
    return grads + (None,) * (2 + len(ctx.rest))


_varlen_fwd_op.register_autograd(_varlen_backward, setup_context=_varlen_setup_context)


def _varlen_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, spec, sinks, return_lse):
    """One launch per kernel for the whole packed batch: programs over (query tiles of the longest sequence, heads,
    sequences); a program whose tile lies past its sequence's own rows returns at once (kernels/flash_attn.py)."""
    total_q, H = q.shape[0], q.shape[1]
    if total_q == 0 or k.shape[0] == 0 or max_seqlen_q == 0:
        out = eager.zeros_attention(q, k, v, sinks)  # no query, or no key anywhere: zeros (and zero gradients)
        lse = q.new_full((H, total_q), float("-inf"), dtype=torch.float32)
        return (out, lse) if return_lse else out
    varlen = Varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if torch.compiler.is_compiling():  # custom ops, opaque to the compiler: no graph break
        o, lse, _ = _varlen_fwd_op(q, k, v, sinks, *varlen, *spec)
        out, lse = _unview(o), lse[0]
        return (out, interface.natural_lse(lse)) if return_lse else out
    needs_grad = q.requires_grad or k.requires_grad or v.requires_grad or (sinks is not None and sinks.requires_grad)
    if torch.is_grad_enabled() and needs_grad:
        out, lse = _VarlenAttention.apply(q, k, v, sinks, varlen, spec)
    else:
        o, lse, _ = fa.forward(_view(q), _view(k), _view(v), spec, sinks=sinks, varlen=varlen)
        out, lse = _unview(o), lse[0]
    return (out, interface.natural_lse(lse)) if return_lse else out


def _generator_of(device: torch.device) -> torch.Generator:
    """The default generator the eager paths draw their dropout from on ``device``."""
    if device.type == "cpu":
        return torch.default_generator
    return torch.get_device_module(device.type).default_generators[device.index or 0]
