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
from .flash_attn import Spec

BACKENDS = ("auto", "triton", "sdpa", "torch")
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_warned_head_dims: set[int] = set()
# The custom ops' namespace: the installed package's, or another for this folder imported under its own name
# (``import kernels`` from a checkout): two copies of the module must not register one op twice.
_OPS = "chapter3_flash" if __name__.startswith("chapter3_flash.") else "chapter3_flash_checkout"


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, spec: Spec):
        o, lse, seed = fa.forward(q, k, v, spec)
        ctx.save_for_backward(q, k, v, o, lse, seed)
        ctx.spec = spec
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable  # the backward kernels have no backward: say so, loudly
    def backward(ctx, do):
        dq, dk, dv = fa.backward(do, *ctx.saved_tensors, ctx.spec)
        return dq, dk, dv, None


@torch.library.custom_op(f"{_OPS}::attn_fwd", mutates_args=())
def _attn_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    dropout_p: float,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return fa.forward(q, k, v, Spec(causal, dropout_p, softmax_scale, window_left, window_right, deterministic))


@_attn_fwd_op.register_fake
def _(q, k, v, *spec):
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
    causal: bool,
    dropout_p: float,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return fa.backward(
        do, q, k, v, o, lse, seed, Spec(causal, dropout_p, softmax_scale, window_left, window_right, deterministic)
    )


@_attn_bwd_op.register_fake
def _(do, q, k, v, *rest):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, *spec = inputs
    o, lse, seed = output
    ctx.save_for_backward(q, k, v, o, lse, seed)
    ctx.spec = Spec(*spec)
    ctx.mark_non_differentiable(lse, seed)


def _backward(ctx, do, _dlse, _dseed):
    dq, dk, dv = _attn_bwd_op(do, *ctx.saved_tensors, *ctx.spec)
    return (dq, dk, dv) + (None,) * len(ctx.spec)


_attn_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _attention_triton(q, k, v, spec: Spec) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return _attn_fwd_op(q, k, v, *spec)[0]
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _FlashAttention.apply(q, k, v, spec)
    return fa.forward(q, k, v, spec)[0]


# ----------------------------------------------------------------------------------------------
# Checks and the public function
# ----------------------------------------------------------------------------------------------


def check_qkv(q, k, v) -> None:
    """Types, ranks, dtypes, devices and shapes of q, k, v: a TypeError / ValueError naming the values."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must have rank 4 (B, H, N, D), got shape {tuple(t.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    B, Hq, _, D = q.shape
    Bk, Hkv, _, Dk = k.shape
    if B != Bk:
        raise ValueError(f"batch {B} of q does not match batch {Bk} of k and v")
    if D != Dk:
        raise ValueError(f"head_dim {D} of q does not match {Dk} of k")
    if D == 0:
        raise ValueError(f"head_dim must be at least 1, got shapes q {tuple(q.shape)}, k {tuple(k.shape)}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads {Hq} must be a multiple of key/value heads {Hkv}")


def check_options(causal, softmax_scale, window_size, backend) -> tuple[int, int]:
    """The options every attention function shares; returns the window as two ints."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if softmax_scale is not None:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
            raise TypeError(f"softmax_scale must be a float or None, got {softmax_scale!r}")
        if not math.isfinite(softmax_scale):
            raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"window_size must be a pair (left, right) of ints, got {window_size!r}")
    for side, w in zip(("left", "right"), window_size):
        if isinstance(w, bool) or not isinstance(w, int):
            raise TypeError(f"window_size {side} must be an int (-1: unbounded), got {w!r}")
        if w < -1:
            raise ValueError(f"window_size {side} must be -1 (unbounded) or >= 0, got {w}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return int(window_size[0]), int(window_size[1])


def _check_dropout(dropout_p) -> None:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float, got {dropout_p!r}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")


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
    if q.shape[0] > fa.MAX_GRID_YZ or q.shape[1] > fa.MAX_GRID_YZ:
        raise ValueError(f"batch {q.shape[0]} and heads {q.shape[1]} must each be at most {fa.MAX_GRID_YZ}")
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
) -> torch.Tensor:
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

    Returns:
        ``(B, Hq, Nq, D)`` in q's dtype (and, on the Triton path, q's memory layout).
    """
    if isinstance(q, torch.Tensor) and torch.is_autocast_enabled(q.device.type):
        # Like scaled_dot_product_attention, attention runs in autocast's lower precision.
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = (t.to(dtype) if isinstance(t, torch.Tensor) else t for t in (q, k, v))
    check_qkv(q, k, v)
    window = check_options(causal, softmax_scale, window_size, backend)
    _check_dropout(dropout_p)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    elif not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool or None, got {deterministic!r}")
    scale = float(q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale)
    spec = Spec(causal, float(dropout_p), scale, window[0], window[1], deterministic)
    path = choose_path(q, backend)
    if path == "torch":
        return eager.attention_reference(q, k, v, spec)
    if path == "sdpa":
        return eager.attention_sdpa(q, k, v, spec)
    _check_triton_limits(q, k, v)
    if q.numel() == 0 or k.shape[2] == 0:
        # No query or no key: an empty output, or rows that see no key (zeros), as the eager path gives.
        return q.mul(0.0)
    return _attention_triton(q, k, v, spec)
