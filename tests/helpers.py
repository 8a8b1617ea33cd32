"""Tolerance rule and references shared by the tests (FlashAttention's rule, as FlagAttention states it)."""

from __future__ import annotations

import torch

# Floors, relative to the reference's largest magnitude: what rounding alone can reach at each precision.
FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def attention_eager(q, k, v, causal: bool, scale: float | None = None, keep: torch.Tensor | None = None, p=0.0):
    """Plain attention in the inputs' own dtype: bottom-right causal, grouped heads, optional fixed keep mask."""
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    k = k.repeat_interleave(H // Hkv, dim=1)  # (B, H, Nk, D)
    v = v.repeat_interleave(H // Hkv, dim=1)
    s = (q @ k.transpose(-2, -1)) * scale  # (B, H, Nq, Nk)
    if causal:
        hidden = torch.ones(Nq, Nk, dtype=torch.bool, device=q.device).triu(Nk - Nq + 1)
        s = s.masked_fill(hidden, float("-inf"))
    w = torch.softmax(s.float(), dim=-1).nan_to_num(0.0).to(q.dtype)
    if keep is not None:
        w = w * keep.to(w.dtype) / (1 - p)
    return w @ v


def assert_close_to_reference(name: str, ours: torch.Tensor, ref64: torch.Tensor, torch_lowp: torch.Tensor) -> None:
    """Our error against float64 at most twice PyTorch's own error at our precision, plus a small floor."""
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    ref = ref64.double()
    err = (ours.double() - ref).abs().max().item()
    err_torch = (torch_lowp.double() - ref).abs().max().item()
    floor = FLOOR[ours.dtype] * max(1.0, ref.abs().max().item())
    assert err <= 2 * err_torch + floor, f"{name}: error {err:.3e} > 2 * torch's {err_torch:.3e} + {floor:.1e}"
