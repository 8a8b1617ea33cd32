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
matrix (the largest is one sequence's chunk, or its ``(Nq, Nk)`` on the ``"torch"`` reference). Its batch costs
what its sequences cost alone, less: one NaN screen for the batch instead of one per sequence, the sequences' views
made by one split per tensor (their gradients joined by one concatenation), and in the common case PyTorch's CPU
flash kernel called straight (``bench/varlen.py``: on par with SDPA run sequence by sequence forward, faster
forward and backward). The Triton path
(``"triton"``, what ``"auto"`` takes on CUDA) is one launch per kernel for the whole batch, over the batch's real
tiles: program i of the grid's first axis is tile i of the list of every sequence's own tiles, sequence after
sequence, which each program finds by scanning ``cu_seqlens`` (``kernels.flash_attn._varlen_tile``: nothing built
before the launch, no host sync). No program for padding or for a tile past its sequence's rows; the grid is sized
from the token count without reading the lengths, so up to B - 1 slots after the last tile exit at once. Batches
of more than ``flash_attn.TILE_LIST_MAX_SEQS`` sequences run over (tiles of the longest sequence, heads,
sequences) instead, as FlashAttention-2's varlen grid does: a program whose tile lies past its sequence exits.

Under ``torch.compile`` the Triton path runs as two custom ops (no graph break, as ``flash_attention``); the
PyTorch path's loop is a graph break, which reads the values of ``cu_seqlens`` and checks them; inside a compiled
region the Triton path does not check them (the trace cannot read data).
"""

from __future__ import annotations

import math

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
from .masks import window_flags


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
    starts = check_varlen(
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
    if q.device.type == "meta":  # shape inference, as flash_attention gives on meta (cu_seqlens never read)
        out = eager.shape_only(q, k, v)
        return (out, q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)) if return_lse else out
    path = interface.choose_path(q, backend)  # reads the device and the head dim: (total, H, D) as it is
    if path == "triton":
        interface._check_triton_limits(_view(q), _view(k), _view(v))
        n_seq = cu_seqlens_q.shape[0] - 1
        if n_seq > MAX_GRID_YZ:
            raise ValueError(f"{n_seq} sequences: the Triton kernels take at most {MAX_GRID_YZ}")
        return _varlen_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, spec, sinks, return_lse)
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, spec, sinks, return_lse, path, starts)
    # A loop over host-read offsets: under torch.compile a graph break (the Triton path compiles whole). The
    # wrapper that makes it one costs a call ~15 us, so it is taken only there.
    return _varlen_per_sequence_compiled(*args) if torch.compiler.is_compiling() else _varlen_per_sequence(*args)


def _varlen_per_sequence(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, spec: Spec, sinks, return_lse: bool, path: str,
    starts: tuple[list[int], list[int]] | None,
):  # fmt: skip
    """The PyTorch path: ``flash_attention``'s ``path`` on each sequence as a batch of one. Reads the offsets on
    the host (free on a CPU; one sync on a device) unless the checks read them (``starts``).

    NaN and Inf: PyTorch's CPU kernel returns zeros for a row whose scores are all NaN or -inf, where the chapter's
    softmax gives NaN; ``eager.may_hide_nonfinite`` screens a dense call for it by reading q and the first keys its
    rows see. Here one such screen covers the batch (q, and each sequence's first key or, under a sliding window,
    all of k): a finite batch skips each sequence's own, and its common case (no dropout, cap, sink or window)
    calls PyTorch's CPU flash kernel on each sequence straight.
    """
    total_q, H = q.shape[0], q.shape[1]
    if starts is not None:
        starts_q, starts_k = starts
    else:  # not checked yet (a device, or under torch.compile): read anyway, and checked for free
        starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        check_cu_seqlens_values("cu_seqlens_q", starts_q, total_q, max_seqlen_q)
        check_cu_seqlens_values("cu_seqlens_k", starts_k, k.shape[0], max_seqlen_k)
    # Each sequence's rows as (1, H, n, D) views, made by one split per tensor: no copies, a few ops for the batch
    # rather than a few per sequence, and one concatenation of the gradients in the backward.
    if path == "sdpa" and q.device.type == "cpu":  # one copy for the batch, not one per sequence (eager.cpu_flash)
        q, k, v = eager.unit_last_stride(q), eager.unit_last_stride(k), eager.unit_last_stride(v)
    n_q = [z - a for a, z in zip(starts_q, starts_q[1:])]
    n_k = [z - a for a, z in zip(starts_k, starts_k[1:])]
    seqs = _view(q).split(n_q, dim=2), _view(k).split(n_k, dim=2), _view(v).split(n_k, dim=2)
    mask_left, causal, _, right = window_flags(spec.causal, (spec.window_left, spec.window_right))
    firsts = k if mask_left else _first_keys(k, cu_seqlens_k, starts_k)
    finite = path == "sdpa" and q.device.type == "cpu" and _finite(q, firsts)
    # The common case, PyTorch's CPU flash kernel straight: no dropout, cap, sink or window (causal: no right side).
    direct = finite and not (spec.dropout_p or spec.softcap or sinks is not None or mask_left or right > 0)
    outs, lses = _each_sequence(seqs, n_q, n_k, spec, sinks, return_lse, path, finite, direct, causal)
    if not outs:  # no sequence has a query: total_q is 0
        out, lse = eager.zeros_attention(q, k, v, sinks), q.new_empty((H, 0), dtype=torch.float32)
    else:
        out = torch.cat(outs, dim=1)[0]  # (total_q, Hq, D), contiguous
        lse = torch.cat(lses, dim=1).float() if return_lse else None  # (Hq, total_q)
    return (out, lse) if return_lse else out


_varlen_per_sequence_compiled = torch.compiler.disable(_varlen_per_sequence)


def _each_sequence(
    seqs, n_q, n_k, spec, sinks, return_lse: bool, path: str, finite: bool, direct: bool, causal: bool
):  # fmt: skip
    """Each sequence with a query: ``(outs, lses)``, outs (1, n, Hq, D) views, lses (Hq, n) where asked. ``finite``:
    q and the first keys are screened. ``direct``: PyTorch's CPU flash kernel straight for each sequence whose rows
    all see a key (``causal``: the spec's right side is masked). Dropout: every sequence starts from the generator state a call on
    it alone would start from."""
    gen = _generator_of(seqs[0][0].device) if spec.dropout_p > 0.0 and seqs[0] else None
    state = gen.get_state() if gen is not None else None
    outs, lses = [], []
    for b, (qb, kb, vb) in enumerate(zip(*seqs)):
        if not n_q[b]:
            continue  # no query: nothing to compute, nothing to draw
        if state is not None:
            gen.set_state(state)
        if direct and n_k[b] and (not causal or n_q[b] == n_k[b]):  # is_causal is top-left: right when square
            out, lse = eager.cpu_flash(qb, kb, vb, causal, spec.softmax_scale)
        elif direct and n_k[b] and n_q[b] < n_k[b]:  # every row sees a key, bottom-right: a mask
            out, lse = eager._sdpa(qb, kb, vb, spec, causal=causal)
        else:  # flash_attention's work after its checks, which the whole batch passed
            out = interface.attention(qb, kb, vb, spec, sinks, return_lse, path, finite)
            out, lse = out if return_lse else (out, None)
        if return_lse:
            lses.append(lse[0])  # (Hq, n)
        outs.append(out.transpose(1, 2))  # (1, n, Hq, D)
    return outs, lses


def _first_keys(k: torch.Tensor, cu_seqlens_k: torch.Tensor, starts_k: list[int]) -> torch.Tensor:
    """Each sequence's first key row (an empty sequence's is the next one's, or the last row: more than needed)."""
    if not k.shape[0]:
        return k
    firsts = cu_seqlens_k[:-1]
    if starts_k[-2] == k.shape[0]:  # empty sequences at the end start past the last row
        firsts = firsts.clamp(max=k.shape[0] - 1)
    return k.index_select(0, firsts)


def _finite(*tensors: torch.Tensor) -> bool:
    """No NaN or Inf in any of the tensors: one number read once (a float32 sum is finite exactly when its terms
    are, barring an overflow, which only sends the call the exact way)."""
    total = tensors[0].sum(dtype=torch.float32)
    for t in tensors[1:]:
        total = total + t.sum(dtype=torch.float32)
    return math.isfinite(total.item())


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
    """One launch per kernel for the whole packed batch, over its list of real tiles (the module docstring)."""
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
