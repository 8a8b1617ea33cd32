"""Tiny Aya's grouped-query attention (the book's ch05/15_tiny-aya), fused: same constructor, parameters,
``forward(x, mask, cos, sin)``, and the KV-cache notebook's ``forward(x, mask, cos, sin, start_pos, cache)``.

Two things set Tiny Aya apart from Qwen3, whose layout it shares: its RoPE is interleaved (feature 2i turns
with 2i + 1, Cohere's layout, not the two halves), and only its sliding-window layers (``attn_type ==
"sliding_attention"``) apply RoPE at all; its full-attention layers see no positions but the causal mask.
The model's global and local masks are read as the kernel's causal flag and window (``attention.rope``)."""

from __future__ import annotations

import torch
from torch import nn

from .kv_cache_pkg import _check_call, _grow
from .reference import init_head_layout
from .rope import RopeAttentionMixin, apply_rope, attend_cached, attend_with_mask


class CohereLayerNorm(nn.Module):
    """Tiny Aya's LayerNorm: mean-centred, a scale and no shift, in float32 (its optional QK-norm)."""

    def __init__(self, emb_dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        centred = xf - xf.mean(dim=-1, keepdim=True)
        out = centred * torch.rsqrt(centred.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (self.weight.float() * out).to(x.dtype)


class GroupedQueryAttention(RopeAttentionMixin, nn.Module):
    def __init__(
        self,
        d_in: int,
        num_heads: int,
        num_kv_groups: int,
        head_dim: int | None = None,
        qk_norm: bool = False,
        attention_bias: bool = False,
        dtype: torch.dtype | None = None,
        attn_type: str = "full_attention",
    ):
        super().__init__()
        head_dim = init_head_layout(self, d_in, num_heads, num_kv_groups, head_dim)
        self.attn_type = attn_type
        self.W_query = nn.Linear(d_in, self.d_out, bias=attention_bias, dtype=dtype)
        self.W_key = nn.Linear(d_in, num_kv_groups * head_dim, bias=attention_bias, dtype=dtype)
        self.W_value = nn.Linear(d_in, num_kv_groups * head_dim, bias=attention_bias, dtype=dtype)
        self.out_proj = nn.Linear(self.d_out, d_in, bias=attention_bias, dtype=dtype)
        if qk_norm:
            self.q_norm = CohereLayerNorm(head_dim, eps=1e-6)
            self.k_norm = CohereLayerNorm(head_dim, eps=1e-6)
        else:
            self.q_norm = self.k_norm = None

    def _rotates(self) -> bool:
        # The book's rule, word for word: any other attn_type (its "full_attention") gets no RoPE.
        return self.attn_type == "sliding_attention"

    def _rope(self, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, offset: int = 0) -> torch.Tensor:
        return apply_rope(t, cos, sin, offset, interleaved=True) if self._rotates() else t

    def forward(self, x: torch.Tensor, mask: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, n = x.shape[0], x.shape[1]
        queries, keys, values = self._qkv_normed(x)  # (b, heads, n, head_dim), keys and values kv_heads
        queries, keys = self._rope(queries, cos, sin), self._rope(keys, cos, sin)
        context = attend_with_mask(queries, keys, values, mask, self.head_dim**-0.5, "tiny_aya.GroupedQueryAttention")
        return self.out_proj(context.transpose(1, 2).reshape(b, n, self.d_out))  # (b, n, d_in)


class KVGroupedQueryAttention(GroupedQueryAttention):
    """The KV-cache notebook's layer: ``forward(x, mask, cos, sin, start_pos=0, cache=None)`` -> ``(context,
    next_cache)``; the cache holds the keys as attended (rotated on sliding layers), grown by ``torch.cat``."""

    def forward(self, x: torch.Tensor, mask, cos: torch.Tensor, sin: torch.Tensor, start_pos: int = 0, cache=None):
        _check_call(self, start_pos, cache)
        b, n = x.shape[0], x.shape[1]
        queries, keys, values = self._qkv_normed(x)
        queries, keys = self._rope(queries, cos, sin, start_pos), self._rope(keys, cos, sin, start_pos)
        keys, values = next_cache = _grow(cache, keys, values)  # (b, kv_heads, T, head_dim)
        context = attend_cached(queries, keys, values, mask, self.head_dim**-0.5, "tiny_aya.KVGroupedQueryAttention")
        return self.out_proj(context.transpose(1, 2).reshape(b, n, self.d_out)), next_cache
