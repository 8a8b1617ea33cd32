"""Gemma 3's grouped-query attention (the book's ch05/12_gemma3), fused: same constructor, parameters,
``forward(x, mask, cos, sin)``; QK-norm and RoPE as the book applies them, the scale from
``query_pre_attn_scalar``; the model's global mask becomes the kernel's causal flag and its local mask the
kernel's sliding window (512 at 270M), whose tiles outside the window are never visited.

The book's class is Qwen3's with Gemma's RMSNorm (weights around 1, not 0) and its own scale, and so is this
one: ``attention.qwen3.GroupedQueryAttention`` with those two changed."""

from __future__ import annotations

import torch

from . import qwen3
from .rope import GemmaRMSNorm


class GroupedQueryAttention(qwen3.GroupedQueryAttention):
    _norm = GemmaRMSNorm
    _label = "gemma3.GroupedQueryAttention"

    def __init__(
        self,
        d_in: int,
        num_heads: int,
        num_kv_groups: int,
        head_dim: int | None = None,
        qk_norm: bool = False,
        query_pre_attn_scalar: float | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__(d_in, num_heads, num_kv_groups, head_dim, qk_norm, dtype)
        self.scaling = (query_pre_attn_scalar if query_pre_attn_scalar is not None else self.head_dim) ** -0.5

    def _softmax_scale(self) -> float:
        return self.scaling
