"""The PyTorch paths, with the Triton kernels' semantics: for CPUs, Apple MPS and any other device.

- ``attention_reference``: readable eager attention, the ground truth (``backend="torch"``). It
  materializes ``(B, Hq, Nq, Nk)``.
- ``attention_sdpa``: the fastest exact path PyTorch offers off CUDA (``backend="sdpa"``, what ``"auto"``
  picks where Triton cannot run). Without dropout, PyTorch's fused attention with our rules: on a CPU its flash
  kernel called directly (the one ``scaled_dot_product_attention`` dispatches to there: no dispatch, no
  fallback to the O(N^2) math path, and the log-sum-exp comes with it), elsewhere
  ``scaled_dot_product_attention``; bottom-right causal through ``is_causal`` or a mask (``causal_lower_right``
  off a CPU), grouped heads natively (no ``repeat_interleave`` copies), query
  rows that see no key cut off before the call and returned as zeros (zero gradients), a sliding window
  as a small mask per query chunk. With dropout, where no fused CPU kernel exists (SDPA would fall back
  to its math path and hold several ``(B, H, N, N)`` tensors), ``_ChunkedAttention``: query chunks of
  ``CHUNK_ROWS`` rows against only the keys they see, the dropout mask drawn from PyTorch's generator
  per chunk and regenerated in the backward, which recomputes the weights from the saved log-sum-exp:
  never more than one chunk's ``(B, H, CHUNK_ROWS, Nk)`` and its mask at a time. Small problems (at most
  ``SMALL_DROPOUT_ELEMENTS`` attention weights) take SDPA's math path with its own dropout instead: holding a
  few such matrices costs little there, and it is faster than chunking.

On CUDA ``attention_sdpa`` also serves head dims above the Triton kernel's 256 (SDPA's own dropout
works there).

Softcap, sinks and the log-sum-exp (what SDPA cannot do): ``attention_sdpa`` takes ``_ChunkedAttention`` for
any call with ``spec.softcap`` or ``sinks``, with or without dropout: the same query chunks,
the capped scores ``softcap * tanh(s / softcap)`` (backward: ``dS *= 1 - tanh^2``), the sink's
``exp(sink - lse)`` added to each row's denominator (backward: ``dsink = -sum_rows P_sink * delta``), and the
log-sum-exp returned. ``return_lse`` alone changes nothing of the output (the same kernels, the same dropout
draws): on a CPU without dropout the flash kernel returns the log-sum-exp with the output, otherwise it comes from
one more chunked pass of ``q k^T`` (or from ``_ChunkedAttention``, where that ran). The semantics of all three:
``kernels.interface.flash_attention``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .dropout import keep_scale
from .masks import visible_mask, window_flags

# Query rows per chunk on the chunked paths: the fastest of 64, 128 and 256 on a 2-core CPU, at a peak between
# theirs (bench/NOTES.md, "CPU").
CHUNK_ROWS = 128
# Attention weights (B * Hq * Nq * Nk) up to which dropout off CUDA runs SDPA's math path (the weights, their mask
# and the saved tensors materialized, a few MB) instead of the chunked one. On the 2-core CPU, B 2 H 12 D 64
# causal: at N 128 (393k weights) math takes 3.3 ms forward and 6.9 forward+backward, chunked 4.0 and 10.7; at
# N 256 the chunked forward is 1.8x faster (it skips the hidden half), its forward+backward 1.2x slower. Below
# this bound math wins both; the choice never depends on grad mode, so one seed draws one mask
# (bench/NOTES.md, "Session 7").
SMALL_DROPOUT_ELEMENTS = 1 << 19

# The largest (Nq, Nk) additive mask the CPU path builds for bottom-right causal attention with Nq < Nk; above it,
# query chunks of CHUNK_ROWS rows with a mask each (the sliding window's path).
MASK_BYTES = 1 << 24

# PyTorch's flash attention for CPUs, the kernel scaled_dot_product_attention runs there, called directly: it also
# returns the log-sum-exp, takes grouped heads, and has its own backward.
_CPU_FLASH = torch._scaled_dot_product_flash_attention_for_cpu  # the C binding: no Python dispatch on the way


def attention_reference(q, k, v, spec, sinks=None, return_lse: bool = False):
    """Readable eager attention with the kernels' semantics. Materializes (B, Hq, Nq, Nk). Returns the output,
    or ``(out, lse)`` with ``return_lse`` (lse (B, Hq, Nq) float32, the sink excluded, no gradient)."""
    B, H, N_Q, D = q.shape
    H_KV, N_K = k.shape[1], k.shape[2]
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    if H_KV != H:
        k = k.repeat_interleave(H // H_KV, dim=1)  # (B, Hq, Nk, D)
        v = v.repeat_interleave(H // H_KV, dim=1)  # (B, Hq, Nk, D)
    scores = torch.matmul(q.to(compute), k.to(compute).transpose(-2, -1)) * spec.softmax_scale  # (B, Hq, Nq, Nk)
    if spec.softcap:
        scores = spec.softcap * torch.tanh(scores / spec.softcap)  # Gemma 2: capped before the mask
    seen = visible_mask(N_Q, N_K, causal=spec.causal, window=_window(spec), device=q.device)
    scores = scores.masked_fill(~seen, float("-inf"))
    if sinks is not None:
        # One more logit per query head that takes part in the normalizer only: softmax over [scores, sink],
        # the sink's own weight dropped. A row that sees no key puts all its weight there: output zeros.
        sink = sinks.to(compute)[None, :, None, None].expand(B, H, N_Q, 1)  # (B, Hq, Nq, 1)
        weights = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :N_K]  # (B, Hq, Nq, Nk)
    else:
        weights = torch.softmax(scores, dim=-1)
        # Rows that see no key: softmax gives NaN; the kernel's answer is zeros. Only those rows: a NaN or Inf in
        # the inputs propagates as it does through the chapter's layer.
        weights = weights.masked_fill(~seen.any(-1, keepdim=True), 0.0)
    if spec.dropout_p > 0.0:
        weights = F.dropout(weights, p=spec.dropout_p, training=True)
    out = torch.matmul(weights, v.to(compute)).to(q.dtype)  # (B, Hq, Nq, D)
    if not return_lse:
        return out
    # Over the visible keys only, -inf for a row that sees none (logsumexp of an empty row).
    return out, torch.logsumexp(scores.detach(), dim=-1).float()  # (B, Hq, Nq)


def _window(spec) -> tuple[int, int]:
    return spec.window_left, spec.window_right


def _first_seeing_row(n_q: int, n_k: int, spec) -> int:
    """Rows before this one see no key at all (query i sees j <= i + Nk - Nq + right, and j >= 0):
    a prefix, cut off before any kernel and returned as zeros."""
    _, mask_right, _, right = window_flags(spec.causal, _window(spec))
    return min(n_q, max(0, n_q - n_k - right)) if mask_right else 0


class _Zeros(torch.autograd.Function):
    """Zeros shaped like q, with zero (not None) gradients for q, k, v and the sinks (when given)."""

    @staticmethod
    def forward(ctx, q, k, v, sinks=None):
        ctx.shapes = [(t.shape, t.dtype, t.device) if t is not None else None for t in (k, v, sinks)]
        return torch.zeros_like(q)

    @staticmethod
    def backward(ctx, dout):
        return (
            torch.zeros_like(dout),
            *(None if s is None else torch.zeros(s[0], dtype=s[1], device=s[2]) for s in ctx.shapes),
        )


def zeros_attention(q, k, v, sinks=None) -> torch.Tensor:
    """The answer when no weight survives (no query, no key, dropout_p 1): zeros, and zero gradients for all three
    inputs and the sinks (an optimizer skips a parameter whose gradient is None, where the book's layer gives
    zeros)."""
    needs_grad = q.requires_grad or k.requires_grad or v.requires_grad or (sinks is not None and sinks.requires_grad)
    if torch.is_grad_enabled() and needs_grad:
        return _Zeros.apply(q, k, v, sinks)
    return torch.zeros_like(q)


def shape_only(q, k, v) -> torch.Tensor:
    """Meta tensors: the output's shape and dtype, as scaled_dot_product_attention infers them (gradients too)."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _Zeros.apply(q, k, v)
    return torch.empty_like(q)


def may_hide_nonfinite(q, k, spec) -> bool:
    """Whether PyTorch's fused CPU attention could turn a NaN or Inf of the inputs into zeros: it returns zeros for
    a row whose scores are all NaN or -inf, where the chapter's softmax gives NaN. That needs a non-finite query
    row or a non-finite first visible key (a row whose first key is finite has a finite or +inf score, which the
    fused kernel propagates as the chapter does). Checked with one read of q and of those keys (a float32 sum is
    finite exactly when no element is NaN or Inf, barring overflow, which only sends a call the exact way)."""
    n_q, n_k = q.shape[2], k.shape[2]
    mask_left, _, left, _ = window_flags(spec.causal, _window(spec))
    if not mask_left:
        firsts = k[:, :, :1]  # every row's first visible key is key 0
    else:
        rows = torch.arange(n_q) + (n_k - n_q) - left
        firsts = k[:, :, rows.clamp(0, n_k - 1).unique().to(k.device)]  # (B, Hkv, <= Nq, D)
    # One number (a NaN or Inf anywhere makes the sum non-finite; +inf + -inf is NaN), read once.
    return not math.isfinite((q.sum(dtype=torch.float32) + firsts.sum(dtype=torch.float32)).item())


def attention_sdpa(q, k, v, spec, sinks=None, return_lse: bool = False, finite: bool = False):
    """PyTorch's fused attention with our semantics (see the module docstring); ``(out, lse)`` with
    ``return_lse``. ``finite``: the caller has checked that q and k hold no NaN or Inf (``flash_attention_varlen``
    checks a packed batch once), so the per-call screen is skipped."""
    N_Q, N_K = q.shape[2], k.shape[2]
    first = _first_seeing_row(N_Q, N_K, spec) if N_K else N_Q
    if spec.softcap or sinks is not None:
        return _attention_chunked(q, k, v, spec, sinks, return_lse, first)
    if first == N_Q or q.numel() == 0 or spec.dropout_p == 1.0:
        # No row sees a key, nothing to compute, or every weight dropped (nn.Dropout(1.0); SDPA's own dropout
        # would scale by 1 / 0): zeros, and zero gradients.
        out = zeros_attention(q, k, v)
        return (out, _lse_only(q, k, spec, first)) if return_lse else out
    q_seen = q[:, :, first:] if first else q  # (B, Hq, Nq - first, D): a view
    mask_left, mask_right, _, right = window_flags(spec.causal, _window(spec))
    lse = None  # the log-sum-exp of q_seen's rows, where the branch's kernel gives it
    if q.device.type != "cuda" and not finite and may_hide_nonfinite(q_seen, k, spec):
        # A NaN or Inf where the fused kernel would return zeros: the exact chunked path, whose arithmetic is the
        # chapter's (a row that sees a NaN is NaN).
        seed = _draw_seed(q.device) if spec.dropout_p > 0 else 0
        out, lse = _ChunkedAttention.apply(q_seen, k, v, spec, seed, None)
    elif spec.dropout_p > 0.0 and q.device.type != "cuda":
        if q_seen.shape[0] * q_seen.shape[1] * q_seen.shape[2] * N_K <= SMALL_DROPOUT_ELEMENTS:
            out = _math_dropout(q_seen, k, v, spec, first, masked=mask_left or mask_right)
        else:
            out, lse = _ChunkedAttention.apply(q_seen, k, v, spec, _draw_seed(q.device), None)
    elif mask_left or (mask_right and right > 0):
        out, lse = _sdpa_window_chunks(q_seen, k, v, spec)
    else:
        out, lse = _sdpa(q_seen, k, v, spec, causal=mask_right)
    if first:
        out = F.pad(out, (0, 0, first, 0))  # (B, Hq, Nq, D)
    if not return_lse:
        return out
    if lse is None:  # the kernel gave none (SDPA's math path, or CUDA): one more chunked pass of q k^T
        return out, _lse_only(q, k, spec, first)
    lse = lse.float()
    return out, F.pad(lse, (first, 0), value=float("-inf")) if first else lse  # (B, Hq, Nq)


def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a contiguous copy where its last dimension is strided: PyTorch's CPU flash kernel reads a head
    vector as consecutive elements whatever the stride says (``x[..., ::2]`` gave wrong values without an error,
    also through ``scaled_dot_product_attention`` restricted to that kernel)."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def cpu_flash(q, k, v, causal: bool, scale: float, attn_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's CPU flash kernel, the one way this package calls it: ``(out, lse)``, top-left ``causal``,
    ``attn_mask`` additive in q's dtype or None; strided head vectors copied first (``unit_last_stride``)."""
    q, k, v = unit_last_stride(q), unit_last_stride(k), unit_last_stride(v)
    return _CPU_FLASH(q, k, v, 0.0, causal, attn_mask=attn_mask, scale=scale)


def _sdpa(q, k, v, spec, *, causal: bool, attn_mask=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One fused attention call; bottom-right causal when Nq != Nk; ``attn_mask`` bool (Nq, Nk), True where a
    query sees a key. Returns ``(out, lse)``: on a CPU, PyTorch's flash kernel called directly (the one
    ``scaled_dot_product_attention`` dispatches to there, without the dispatch: no case can fall to the O(N^2)
    math path) gives the log-sum-exp too, (B, Hq, Nq) natural log; elsewhere lse is None."""
    n_q, n_k = q.shape[2], k.shape[2]
    if q.device.type == "cpu":
        if causal and n_q != n_k:  # bottom-right: a mask, or chunks of rows where a whole one would be large
            if n_q * n_k * q.element_size() > MASK_BYTES:
                return _sdpa_window_chunks(q, k, v, spec)
            attn_mask, causal = visible_mask(n_q, n_k, causal=True, device=q.device), False
        if attn_mask is not None:  # the kernel takes an additive mask in q's dtype
            attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype).masked_fill_(~attn_mask, float("-inf"))
        return cpu_flash(q, k, v, causal, spec.softmax_scale, attn_mask)
    if causal and n_q != n_k:
        from torch.nn.attention.bias import causal_lower_right

        attn_mask, causal = causal_lower_right(n_q, n_k), False
    dropout_p = spec.dropout_p if q.device.type == "cuda" else 0.0
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=causal, scale=spec.softmax_scale,
        enable_gqa=k.shape[1] != q.shape[1],
    )  # fmt: skip
    return out, None


def _math_dropout(q, k, v, spec, first: int, masked: bool) -> torch.Tensor:
    """A small problem with dropout: SDPA's math path, its mask from PyTorch's generator (kept by autograd for
    the backward). q holds the rows from ``first`` on, each of which sees a key; ``masked``: some key is hidden
    from some query (causal or a window)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    seen = None
    if masked:
        n_q, n_k = first + q.shape[2], k.shape[2]
        seen = visible_mask(n_q, n_k, causal=spec.causal, window=_window(spec), device=q.device)[first:]
    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=seen, dropout_p=spec.dropout_p, scale=spec.softmax_scale,
            enable_gqa=k.shape[1] != q.shape[1],
        )  # fmt: skip


def _chunk_keys(r0: int, r1: int, n_q: int, n_k: int, spec) -> tuple[int, int]:
    """Keys [lo, hi) that query rows [r0, r1) may see (the rule of kernels/masks.py, host side)."""
    mask_left, mask_right, left, right = window_flags(spec.causal, _window(spec))
    diag = n_k - n_q
    lo = max(0, r0 + diag - left) if mask_left else 0
    hi = min(n_k, r1 - 1 + diag + right + 1) if mask_right else n_k
    return lo, max(hi, lo)


def _chunk_mask(r0: int, r1: int, lo: int, hi: int, n_q: int, n_k: int, spec, device) -> torch.Tensor:
    """(r1 - r0, hi - lo) bool: the visibility of the chunk's rows and keys."""
    mask_left, mask_right, left, right = window_flags(spec.causal, _window(spec))
    pos = torch.arange(r0, r1, device=device)[:, None] + (n_k - n_q)
    keys = torch.arange(lo, hi, device=device)[None, :]
    seen = torch.ones(r1 - r0, hi - lo, dtype=torch.bool, device=device)
    if mask_right:
        seen &= keys <= pos + right
    if mask_left:
        seen &= keys >= pos - left
    return seen


def _sdpa_window_chunks(q, k, v, spec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A sliding window through the fused kernel: per query chunk, only the keys it sees and a small mask
    (rows here all see at least one key). The cost grows as N * (W + CHUNK_ROWS), not N^2. ``(out, lse)`` as
    ``_sdpa``."""
    n_q, n_k = q.shape[2], k.shape[2]
    outs, lses = [], []
    for r0 in range(0, n_q, CHUNK_ROWS):
        r1 = min(n_q, r0 + CHUNK_ROWS)
        lo, hi = _chunk_keys(r0, r1, n_q, n_k, spec)
        mask = _chunk_mask(r0, r1, lo, hi, n_q, n_k, spec, q.device)
        out, lse = _sdpa(q[:, :, r0:r1], k[:, :, lo:hi], v[:, :, lo:hi], spec, causal=False, attn_mask=mask)
        outs.append(out)
        lses.append(lse)
    lse = None if lses[0] is None else torch.cat(lses, dim=2)  # (B, Hq, Nq)
    return torch.cat(outs, dim=2), lse  # (B, Hq, Nq, D)


def _attention_chunked(q, k, v, spec, sinks, return_lse: bool, first: int):
    """Softcap, sinks or the log-sum-exp: ``_ChunkedAttention`` on the rows from ``first`` on (each sees a key);
    the rows before it return zeros and a log-sum-exp of -inf."""
    B, H, N_Q, _ = q.shape
    if first == N_Q or q.numel() == 0:
        out = zeros_attention(q, k, v, sinks)  # zero gradients, the sinks' too
        lse = q.new_full((B, H, N_Q), float("-inf"), dtype=torch.float32)
    else:
        seed = _draw_seed(q.device) if spec.dropout_p > 0.0 else 0
        out, lse = _ChunkedAttention.apply(q[:, :, first:], k, v, spec, seed, sinks)
        if first:
            out = F.pad(out, (0, 0, first, 0))  # (B, Hq, Nq, D)
            lse = F.pad(lse, (first, 0), value=float("-inf"))  # (B, Hq, Nq)
    return (out, lse) if return_lse else out


@torch.no_grad()
def _lse_only(q, k, spec, first: int) -> torch.Tensor:
    """(B, Hq, Nq) float32 log-sum-exp of the visible scores, chunk by chunk (-inf for the rows before
    ``first``, which see no key): one more pass of q k^T, for a call that asks for it without softcap or sinks."""
    lse = q.new_full(q.shape[:3], float("-inf"), dtype=torch.float32)
    q_seen = q[:, :, first:]
    if q_seen.shape[2] and k.shape[2]:
        for r0, r1, lo, hi, mask in _chunks(q_seen, k, spec):
            lse[:, :, first + r0 : first + r1] = torch.logsumexp(_scores(q_seen, k, r0, r1, lo, hi, spec, mask), dim=-1)
    return lse


def _draw_seed(device) -> int:
    # From the default generator of the input's device: manual_seed reproduces a run.
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64))


def _generator(device, seed: int, chunk: int) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed((seed + chunk * 0x9E3779B97F4A7C15) % 2**63)
    return gen


def _keep(shape, p: float, gen: torch.Generator, device) -> torch.Tensor:
    return torch.rand(shape, generator=gen, device=device) >= p


class _ChunkedAttention(torch.autograd.Function):
    """Exact attention in query chunks (rows here all see at least one key), with dropout, softcap and sinks as
    the spec and ``sinks`` ask. Returns ``(out, lse)``, lse (B, Hq, C) float32 over the keys (the sink excluded;
    no gradient). Saves q, k, v, the output and the log-sum-exp with the sink; the backward regenerates each
    chunk's dropout mask from the same generator seed and recomputes its weights."""

    @staticmethod
    def forward(ctx, q, k, v, spec, seed, sinks):
        out, lse = torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)
        lse_all = lse  # with a sink: the normalizer's log, sink included (what the weights divide by)
        if sinks is not None:
            lse_all = q.new_empty(q.shape[:3], dtype=torch.float32)
            sink = sinks.float()[None, :, None]  # (1, Hq, 1)
        scale = keep_scale(spec.dropout_p)
        for c, (r0, r1, lo, hi, mask) in enumerate(_chunks(q, k, spec)):
            p = _scores(q, k, r0, r1, lo, hi, spec, mask)  # (B, Hq, C, W) float32, one buffer reused below
            lse[:, :, r0:r1] = torch.logsumexp(p, dim=-1)
            if sinks is not None:
                lse_all[:, :, r0:r1] = torch.logaddexp(lse[:, :, r0:r1], sink)
            p.sub_(lse_all[:, :, r0:r1, None]).exp_()
            if spec.dropout_p > 0.0:
                p.mul_(_keep(p.shape, spec.dropout_p, _generator(q.device, seed, c), q.device)).mul_(scale)
            out[:, :, r0:r1] = _grouped(p, v[:, :, lo:hi], lambda w, x: w @ x.float()).to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse_all, sinks)
        ctx.spec, ctx.seed = spec, seed
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        spec, scale = ctx.spec, ctx.spec.softmax_scale
        kept_scale = keep_scale(spec.dropout_p)
        dq = torch.zeros_like(q, dtype=torch.float32)
        dk = torch.zeros_like(k, dtype=torch.float32)
        dv = torch.zeros_like(v, dtype=torch.float32)
        delta = (dout.float() * out.float()).sum(-1)  # (B, Hq, Nq): rowsum(dO * O)
        for c, (r0, r1, lo, hi, mask) in enumerate(_chunks(q, k, spec)):
            s = _scores(q, k, r0, r1, lo, hi, spec, mask)  # (B, Hq, C, W): the capped scores
            cap_grad = None
            if spec.softcap:
                # d(capped)/d(scaled) = 1 - tanh^2; hidden keys (-inf) clamp to the cap and get 0.
                cap_grad = 1.0 - (s.clamp(-spec.softcap, spec.softcap) / spec.softcap).square()
            p = s.sub_(lse[:, :, r0:r1, None]).exp_()  # (B, Hq, C, W)
            do = dout[:, :, r0:r1].float()
            ds = _grouped(do, v[:, :, lo:hi], lambda x, y: x @ y.float().transpose(-2, -1))  # dP, then dS in place
            if spec.dropout_p > 0.0:
                keep = _keep(p.shape, spec.dropout_p, _generator(q.device, ctx.seed, c), q.device)
                dv[:, :, lo:hi] += _grouped_t(p * keep * kept_scale, do, k.shape[1])
                ds.mul_(keep).mul_(kept_scale)
                del keep
            else:
                dv[:, :, lo:hi] += _grouped_t(p, do, k.shape[1])
            ds.sub_(delta[:, :, r0:r1, None]).mul_(p)
            del p
            if cap_grad is not None:
                ds.mul_(cap_grad)
                del cap_grad
            dq[:, :, r0:r1] = _grouped(ds, k[:, :, lo:hi], lambda w, x: w @ x.float()) * scale
            dk[:, :, lo:hi] += _grouped_t(ds, q[:, :, r0:r1].float(), k.shape[1]) * scale
        dsinks = None
        if sinks is not None:
            # P_sink = exp(sink - lse) per row; dL/dsink = -sum over rows of P_sink * delta (module docstring).
            p_sink = torch.exp(sinks.float()[None, :, None] - lse)  # (B, Hq, Nq)
            dsinks = -(p_sink * delta).sum(dim=(0, 2)).to(sinks.dtype)  # (Hq,)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, dsinks


def _chunks(q, k, spec):
    n_q, n_k = q.shape[2], k.shape[2]
    for r0 in range(0, n_q, CHUNK_ROWS):
        r1 = min(n_q, r0 + CHUNK_ROWS)
        lo, hi = _chunk_keys(r0, r1, n_q, n_k, spec)
        yield r0, r1, lo, hi, _chunk_mask(r0, r1, lo, hi, n_q, n_k, spec, q.device)


def _scores(q, k, r0, r1, lo, hi, spec, mask) -> torch.Tensor:
    s = _grouped(q[:, :, r0:r1], k[:, :, lo:hi], lambda x, y: x.float() @ y.float().transpose(-2, -1))
    s = s * spec.softmax_scale
    if spec.softcap:
        s = s.div_(spec.softcap).tanh_().mul_(spec.softcap)
    return s.masked_fill_(~mask, float("-inf"))  # (B, Hq, C, W)


def _grouped(a, kv, op) -> torch.Tensor:
    """op(a, kv) for every query head against its key/value head, without repeating kv: the query heads
    of a group are folded into the rows. a (B, Hq, C, X), kv (B, Hkv, W, Y) -> (B, Hq, C, Z)."""
    B, Hq, C = a.shape[:3]
    Hkv = kv.shape[1]
    folded = a.reshape(B, Hkv, (Hq // Hkv) * C, a.shape[-1])  # (B, Hkv, G * C, X)
    return op(folded, kv).reshape(B, Hq, C, -1)


def _grouped_t(w, x, h_kv: int) -> torch.Tensor:
    """w^T x summed over the query heads of each group and the chunk's rows: w (B, Hq, C, W),
    x (B, Hq, C, Y) -> (B, Hkv, W, Y)."""
    B, Hq, C = w.shape[:3]
    rows = (Hq // h_kv) * C
    return w.reshape(B, h_kv, rows, w.shape[-1]).transpose(-2, -1) @ x.reshape(B, h_kv, rows, x.shape[-1])
