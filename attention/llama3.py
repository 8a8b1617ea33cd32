"""Llama 3.2's grouped-query attention (the book's pkg llama3.py), fused: same constructor, parameters in the
book's order, ``forward(x, mask, cos, sin)`` with RoPE as the book applies it; the model's causal mask
becomes the kernel's causal flag and the query heads of a group read their key/value head in one call."""

from __future__ import annotations

import torch
from torch import nn

from .reference import init_group_heads
from .rope import RopeAttentionMixin, attend_with_mask


class GroupedQueryAttention(RopeAttentionMixin, nn.Module):
    def __init__(self, d_in: int, d_out: int, num_heads: int, num_kv_groups: int, dtype: torch.dtype | None = None):
        super().__init__()
        init_group_heads(self, d_in, d_out, num_heads, num_kv_groups, False, dtype)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, n = x.shape[0], x.shape[1]
        queries, keys, values = self._qkv_rope(x, cos, sin)
        context = attend_with_mask(
            queries, keys, values, mask[:n, :n], self.head_dim**-0.5, "llama3.GroupedQueryAttention"
        )
        return self.out_proj(context.transpose(1, 2).reshape(b, n, self.d_out))  # (b, n, d_out)
