"""Qwen3's grouped-query attention (the book's pkg qwen3.py), fused: same constructor, parameters,
``forward(x, mask, cos, sin)``; QK-norm before RoPE as the book applies them; the model's causal mask
becomes the kernel's causal flag, one call for all heads without repeat_interleave copies."""

from __future__ import annotations

import torch
from torch import nn

from .reference import init_head_layout
from .rope import RMSNorm, RopeAttentionMixin, attend_with_mask


class GroupedQueryAttention(RopeAttentionMixin, nn.Module):
    _norm = RMSNorm  # QK-norm's class (Gemma 3 has its own)
    _label = "qwen3.GroupedQueryAttention"  # how a warning names the layer

    def __init__(
        self,
        d_in: int,
        num_heads: int,
        num_kv_groups: int,
        head_dim: int | None = None,
        qk_norm: bool = False,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        head_dim = init_head_layout(self, d_in, num_heads, num_kv_groups, head_dim)
        self.W_query = nn.Linear(d_in, self.d_out, bias=False, dtype=dtype)
        self.W_key = nn.Linear(d_in, num_kv_groups * head_dim, bias=False, dtype=dtype)
        self.W_value = nn.Linear(d_in, num_kv_groups * head_dim, bias=False, dtype=dtype)
        self.out_proj = nn.Linear(self.d_out, d_in, bias=False, dtype=dtype)
        if qk_norm:
            self.q_norm = self._norm(head_dim, eps=1e-6)
            self.k_norm = self._norm(head_dim, eps=1e-6)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, n = x.shape[0], x.shape[1]
        queries, keys, values = self._qkv_rope(x, cos, sin)
        context = attend_with_mask(queries, keys, values, mask, self._softmax_scale(), self._label)
        return self.out_proj(context.transpose(1, 2).reshape(b, n, self.d_out))  # (b, n, d_in)

    def _softmax_scale(self) -> float:
        return self.head_dim**-0.5
