"""``flash_attention``: the public function, its checks, autograd, and the choice of path.

Paths: ``"triton"`` (kernels/flash_attn.py; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``),
``"sdpa"`` (PyTorch's fused kernels with the same semantics, kernels/eager.py; any device), ``"torch"``
(the readable eager reference) and ``"auto"``: Triton where it runs, else the SDPA path.

Eager calls go through a plain ``torch.autograd.Function`` (the least host overhead); under
``torch.compile`` the same launchers run as two custom ops, opaque to the compiler (no graph break).
Everything a call computes besides its tensors travels as one ``Spec``.
"""

from __future__ import annotations

import math
import warnings

import torch

from . import eager
from . import flash_attn as fa
from .checks import (
    MAX_GRID_YZ,
    autocast_dtype,
    check_deterministic,
    check_dropout,
    check_flag,
    check_options,
    check_qkv,
    check_sinks,
    check_softcap,
)
from .flash_attn import Spec

_warned_head_dims: set[int] = set()
# The custom ops' namespace: the installed package's, or another for this folder imported under its own name
# (``import kernels`` from a checkout): two copies of the module must not register one op twice.
_OPS = "chapter3_flash" if __name__.startswith("chapter3_flash.") else "chapter3_flash_checkout"


class _FlashAttention(torch.autograd.Function):
    """Returns ``(out, lse)``, lse the kernel's own (base 2, +inf for rows that see no key; no gradient)."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, spec: Spec):
        o, lse, seed = fa.forward(q, k, v, spec, sinks=sinks)
        ctx.save_for_backward(q, k, v, o, lse, seed, sinks)
        ctx.spec = spec
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    @torch.autograd.function.once_differentiable  # the backward kernels have no backward: say so, loudly
    def backward(ctx, do, _dlse):
        *saved, sinks = ctx.saved_tensors
        grads = fa.backward(do, *saved, ctx.spec, sinks=sinks)
        return *grads, *((None,) if sinks is None else ()), None


@torch.library.custom_op(f"{_OPS}::attn_fwd", mutates_args=())
def _attn_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor | None,
    causal: bool,
    dropout_p: float,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    deterministic: bool,
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    spec = Spec(causal, dropout_p, softmax_scale, window_left, window_right, deterministic, softcap)
    return fa.forward(q, k, v, spec, sinks=sinks)


@_attn_fwd_op.register_fake
def _(q, k, v, sinks, *spec):
    B, H, N_Q, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, H, N_Q), dtype=torch.float32), q.new_empty((1,), dtype=torch.int64)


@torch.library.custom_op(f"{_OPS}::attn_bwd", mutates_args=())
def _attn_bwd_op(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    seed: torch.Tensor,
    sinks: torch.Tensor | None,
    causal: bool,
    dropout_p: float,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    deterministic: bool,
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv and dsinks (an empty tensor without sinks: a custom op returns tensors only)."""
    spec = Spec(causal, dropout_p, softmax_scale, window_left, window_right, deterministic, softcap)
    grads = fa.backward(do, q, k, v, o, lse, seed, spec, sinks=sinks)
    return grads if sinks is not None else (*grads, q.new_empty(0))


@_attn_bwd_op.register_fake
def _(do, q, k, v, o, lse, seed, sinks, *rest):
    dsinks = torch.empty_like(sinks) if sinks is not None else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dsinks


def _setup_context(ctx, inputs, output):
    q, k, v, sinks, *spec = inputs
    o, lse, seed = output
    ctx.save_for_backward(q, k, v, o, lse, seed, sinks)
    ctx.spec = Spec(*spec)
    ctx.mark_non_differentiable(lse, seed)


def _backward(ctx, do, _dlse, _dseed):
    q, k, v, o, lse, seed, sinks = ctx.saved_tensors
    dq, dk, dv, dsinks = _attn_bwd_op(do, q, k, v, o, lse, seed, sinks, *ctx.spec)
    return (dq, dk, dv, dsinks if sinks is not None else None) + (None,) * len(ctx.spec)


_attn_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _attention_triton(q, k, v, spec: Spec, sinks=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)``, lse in the kernel's units (base 2, +inf for rows that see no key)."""
    if torch.compiler.is_compiling():
        return _attn_fwd_op(q, k, v, sinks, *spec)[:2]
    needs_grad = q.requires_grad or k.requires_grad or v.requires_grad or (sinks is not None and sinks.requires_grad)
    if torch.is_grad_enabled() and needs_grad:
        return _FlashAttention.apply(q, k, v, sinks, spec)
    return fa.forward(q, k, v, spec, sinks=sinks)[:2]


_LN2 = math.log(2.0)


def natural_lse(lse2: torch.Tensor) -> torch.Tensor:
    """The kernels' log-sum-exp (base 2, +inf for a row that sees no key, so that the backward's
    ``exp2(s - lse)`` is 0 there) as the public one: natural log, -inf for such a row."""
    return torch.where(lse2 == float("inf"), float("-inf"), lse2 * _LN2)


# ----------------------------------------------------------------------------------------------
# Checks and the public function
# ----------------------------------------------------------------------------------------------


def triton_runs_on(t: torch.Tensor) -> bool:
    return t.is_cuda or (fa.INTERPRET and t.device.type == "cpu")


def choose_path(q: torch.Tensor, backend: str) -> str:
    """ "triton", "sdpa" or "torch" for this call."""
    if backend in ("torch", "sdpa"):
        return backend
    if backend == "triton":
        if not triton_runs_on(q):
            raise ValueError(
                f"backend='triton' needs a CUDA tensor, or TRITON_INTERPRET=1 set before importing kernels "
                f"for a CPU tensor; got a tensor on {q.device}"
            )
        if q.shape[-1] > fa.MAX_HEAD_DIM:
            raise ValueError(f"head_dim {q.shape[-1]} is not supported by the Triton kernel (1 to {fa.MAX_HEAD_DIM})")
        return "triton"
    if not triton_runs_on(q):
        return "sdpa"
    if q.shape[-1] > fa.MAX_HEAD_DIM:
        if q.shape[-1] not in _warned_head_dims:
            _warned_head_dims.add(q.shape[-1])
            warnings.warn(
                f"head_dim {q.shape[-1]} exceeds the Triton kernel's {fa.MAX_HEAD_DIM}; "
                "using PyTorch's scaled_dot_product_attention",
                stacklevel=4,
            )
        return "sdpa"
    return "triton"


def _check_triton_limits(q, k, v) -> None:
    if q.shape[0] > MAX_GRID_YZ or q.shape[1] > MAX_GRID_YZ:
        raise ValueError(f"batch {q.shape[0]} and heads {q.shape[1]} must each be at most {MAX_GRID_YZ}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not fa.tile_offsets_fit(t):
            raise ValueError(
                f"{name} has strides {t.stride()}: the Triton kernel needs sequence and head-dim strides below "
                f"{fa.MAX_TILE_SPAN} elements; pass {name}.contiguous()"
            )


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    deterministic: bool | None = None,
    backend: str = "auto",
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention ``dropout(softmax(q k^T * softmax_scale + mask)) v`` without the N x N matrix.

    Args:
        q: ``(B, Hq, Nq, D)``; k, v: ``(B, Hkv, Nk, D)`` with ``Hq % Hkv == 0``; any strides;
            float16, bfloat16 or float32 (one dtype for all three); D from 1 to 256 on the Triton path.
        causal: mask keys after the query, aligned bottom-right: query ``i`` sees keys
            ``j <= i + (Nk - Nq)``. Query rows that see no key return zeros.
        dropout_p: probability of dropping an attention weight (kept ones scale by ``1/(1-p)``), in
            [0, 1] like ``nn.Dropout``. Pass ``0.0`` for evaluation; the layers do this in ``eval()`` mode.
        softmax_scale: defaults to ``D ** -0.5``.
        window_size: ``(left, right)``, FlashAttention's sliding window: query ``i`` (at ``i' = i + Nk - Nq``)
            sees keys ``i' - left <= j <= i' + right``; ``-1`` is unbounded; with ``causal`` the right side
            is 0. Tiles outside the window are skipped: the cost grows as ``N * W``.
        deterministic: bit-reproducible gradients: the two-kernel backward, no atomics. Default:
            ``torch.are_deterministic_algorithms_enabled()``; otherwise the faster backward for the case (the
            two-kernel one too, except with dropout on short sequences: ``kernels.configs``).
        backend: ``"triton"``, ``"sdpa"`` (PyTorch's fused kernels, any device), ``"torch"`` (the readable
            eager reference) or ``"auto"`` (Triton where it can run, else ``"sdpa"``).
        softcap: Gemma 2's logit cap: the scaled scores become ``softcap * tanh(scores / softcap)`` before
            the mask; ``0.0`` (default) caps nothing. Gradients flow through the tanh.
        sinks: ``(Hq,)`` float tensor or None: GPT-OSS's attention sinks, one learned logit per query head
            that joins each row's softmax denominator only, ``weights = exp(s - m) / (exp(sink - m) +
            sum_j exp(s_j - m))``; the weights no longer sum to 1 and a row that sees no key returns zeros.
            ``sinks`` gets a gradient, ``-sum over rows of P_sink * rowsum(dO * O)``.
        return_lse: also return the log-sum-exp (below).

    Returns:
        ``(B, Hq, Nq, D)`` in q's dtype (and, on the Triton path, q's memory layout). With ``return_lse``
        ``(out, lse)``: lse ``(B, Hq, Nq)`` float32, the natural log of ``sum_j exp(s_j)`` over the keys the row
        sees, ``s`` the scaled (and capped) scores; ``-inf`` for a row that sees no key; no gradient (as
        FlashAttention's). The sink is NOT in it (FlashAttention's convention): the lse of a call with sinks is
        the lse of the same call without, so partial results merge as usual, and the sink is applied once
        after merging, ``out_with_sink = out * sigmoid(lse - sink)``.
    """
    # Checked as given (an int64 q is refused), then cast: like scaled_dot_product_attention, attention runs in
    # autocast's lower precision.
    check_qkv(q, k, v)
    window = check_options(causal, softmax_scale, window_size, backend)
    dropout_p = check_dropout(dropout_p)
    deterministic = check_deterministic(deterministic)
    softcap = check_softcap(softcap)
    check_sinks(sinks, q.shape[1], q.device)
    check_flag("return_lse", return_lse)
    dtype = autocast_dtype(q)
    if dtype is not None:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    scale = float(q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale)
    spec = Spec(causal, dropout_p, scale, window[0], window[1], deterministic, softcap)
    return attention(q, k, v, spec, sinks, return_lse, backend)


def attention(q, k, v, spec: Spec, sinks, return_lse: bool, backend: str, finite: bool = False):
    """``flash_attention`` after its checks (``flash_attention_varlen`` calls it per sequence). ``finite``: q and k
    are known to hold no NaN or Inf (``eager.attention_sdpa`` then skips its screen)."""
    if q.device.type == "meta":
        out = eager.shape_only(q, k, v)  # shape inference, as scaled_dot_product_attention gives on meta
        return (out, q.new_empty(q.shape[:3], dtype=torch.float32)) if return_lse else out
    path = choose_path(q, backend)
    if path == "triton":
        _check_triton_limits(q, k, v)
    if q.numel() == 0 or k.shape[2] == 0 or spec.dropout_p == 1.0:
        # No query, no key, or every weight dropped (nn.Dropout(1.0)): zeros, with zero gradients for q, k and v
        # (not None: an optimizer skips a parameter whose gradient is None), on every path; the sinks' too.
        out = eager.zeros_attention(q, k, v, sinks)
        if not return_lse:
            return out
        if q.numel() == 0 or k.shape[2] == 0:
            return out, q.new_full(q.shape[:3], float("-inf"), dtype=torch.float32)  # no key (or query): -inf
        with torch.no_grad():  # dropout 1: the lse does not depend on dropout (and carries no gradient)
            lse = attention(q, k, v, spec._replace(dropout_p=0.0), None, True, path, finite)[1]
        return out, lse
    if path == "torch":
        return eager.attention_reference(q, k, v, spec, sinks, return_lse)
    if path == "sdpa":
        return eager.attention_sdpa(q, k, v, spec, sinks, return_lse, finite)
    out, lse = _attention_triton(q, k, v, spec, sinks)
    return (out, natural_lse(lse)) if return_lse else out
