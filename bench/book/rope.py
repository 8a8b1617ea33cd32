"""The bonus models' rotary position embedding and RMSNorm, as a reader writes them: split-halves RoPE
with cos/sin tables of (context, head_dim), the rotation applied in float32 and cast back."""

from __future__ import annotations

import torch
from torch import nn


def compute_rope_params(head_dim, theta_base=10_000, context_length=4096, freq_config=None, dtype=torch.float32):
    assert head_dim % 2 == 0
    inv_freq = 1.0 / (theta_base ** (torch.arange(0, head_dim, 2, dtype=dtype)[: head_dim // 2].float() / head_dim))
    if freq_config is not None:  # Llama 3's frequency smoothing
        low = freq_config["original_context_length"] / freq_config["low_freq_factor"]
        high = freq_config["original_context_length"] / freq_config["high_freq_factor"]
        wavelen = 2 * torch.pi / inv_freq
        scaled = torch.where(wavelen > low, inv_freq / freq_config["factor"], inv_freq)
        smooth = (freq_config["original_context_length"] / wavelen - freq_config["low_freq_factor"]) / (
            freq_config["high_freq_factor"] - freq_config["low_freq_factor"]
        )
        smoothed = (1 - smooth) * (inv_freq / freq_config["factor"]) + smooth * inv_freq
        inv_freq = torch.where((wavelen <= low) & (wavelen >= high), smoothed, scaled)
    angles = torch.arange(context_length, dtype=dtype)[:, None] * inv_freq[None, :]  # (context, head_dim / 2)
    angles = torch.cat([angles, angles], dim=1)  # (context, head_dim)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x, cos, sin, offset=0):
    # x: (b, heads, n, head_dim); rotate the two halves
    n, head_dim = x.shape[2], x.shape[3]
    x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2 :]
    cos = cos[offset : offset + n][None, None]
    sin = sin[offset : offset + n][None, None]
    rotated = torch.cat((-x2, x1), dim=-1)
    return ((x * cos) + (rotated * sin)).to(dtype=x.dtype)


class RMSNorm(nn.Module):
    """Qwen3's RMSNorm (computed in float32)."""

    def __init__(self, emb_dim, eps=1e-6, bias=False, qwen3_compatible=True):
        super().__init__()
        self.eps = eps
        self.qwen3_compatible = qwen3_compatible
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim)) if bias else None

    def forward(self, x):
        dtype = x.dtype
        if self.qwen3_compatible:
            x = x.to(torch.float32)
        norm = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.scale
        if self.shift is not None:
            norm = norm + self.shift
        return norm.to(dtype)


class GemmaRMSNorm(nn.Module):
    """Gemma 3's RMSNorm: zero-centred weights applied as (1 + w), in float32."""

    def __init__(self, emb_dim, eps=1e-6, bias=False):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.zeros(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim)) if bias else None

    def forward(self, x):
        dtype = x.dtype
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps) * (1.0 + self.scale.float())
        if self.shift is not None:
            out = out + self.shift.float()
        return out.to(dtype)
