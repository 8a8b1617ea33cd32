"""OLMo 3's grouped-query attention (the book's ch05/13_olmo3), fused: same constructor, parameters,
``forward(x, mask, cos, sin)``, and the KV-cache notebook's ``forward(x, mask, cos, sin, start_pos, cache)``.

What sets it apart from Qwen3's: its QK-norm is one RMSNorm over the whole projected width (all heads at
once, ``d_out`` queries and ``num_kv_groups * head_dim`` keys), applied before the split into heads; and its
cache holds the keys before RoPE, rotated after the concatenation (as Gemma 3's notebook). The sliding
windows of three layers in four come in as the model's local mask, read as the kernel's window; the book
trims a sliding layer's cache to the window in its block and slices the mask to match, which reads as the
same window over the shorter cache. ``mask=None`` is the book's "no mask": every query sees every key."""

from __future__ import annotations

import torch
from torch import nn

from . import fused
from .kv_cache_pkg import _check_call, grow_unrotated
from .reference import _check_groups, _check_projected, _check_rank
from .rope import apply_rope, attend_cached, attend_with_mask


class RMSNorm(nn.Module):
    """OLMo 3's RMSNorm: ``weight`` times the float32 norm, cast back."""

    def __init__(self, emb_dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (self.weight * (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps))).to(x.dtype)


class GroupedQueryAttention(nn.Module):
    _label = "olmo3.GroupedQueryAttention"

    def __init__(
        self,
        d_in: int,
        num_heads: int,
        num_kv_groups: int,
        head_dim: int,
        attention_bias: bool = False,
        dtype: torch.dtype | None = None,
        sliding_window: int | None = None,
        attn_type: str = "full_attention",
    ):
        super().__init__()
        _check_groups(num_heads, num_kv_groups)
        self.num_heads = num_heads
        self.num_kv_groups = num_kv_groups
        self.group_size = num_heads // num_kv_groups
        self.head_dim = head_dim
        self.d_out = num_heads * head_dim
        self.attn_type = attn_type
        self.sliding_window = sliding_window if attn_type == "sliding_attention" else None
        self.W_query = nn.Linear(d_in, self.d_out, bias=attention_bias, dtype=dtype)
        self.W_key = nn.Linear(d_in, num_kv_groups * head_dim, bias=attention_bias, dtype=dtype)
        self.W_value = nn.Linear(d_in, num_kv_groups * head_dim, bias=attention_bias, dtype=dtype)
        self.out_proj = nn.Linear(self.d_out, d_in, bias=attention_bias, dtype=dtype)
        self.q_norm = RMSNorm(self.d_out)
        self.k_norm = RMSNorm(num_kv_groups * head_dim)

    def _qkv_normed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (b, heads, n, head_dim), keys and values (b, kv_heads, n, head_dim): q and k normed over their
        whole width first, then split into heads; not rotated."""
        _check_rank(x, 3, "(batch, num_tokens, d_in)", type(self).__name__)
        b, n = x.shape[0], x.shape[1]
        layer = type(self).__name__
        widths = {"W_query": self.d_out, "W_key": self.num_kv_groups * self.head_dim}
        widths["W_value"] = widths["W_key"]
        projected = {}
        for name, width in widths.items():
            projected[name] = getattr(self, name)(x)  # (b, n, width)
            _check_projected(projected[name], width, name, layer)
        queries = self.q_norm(projected["W_query"]).view(b, n, self.num_heads, self.head_dim)
        keys = self.k_norm(projected["W_key"]).view(b, n, self.num_kv_groups, self.head_dim)
        values = projected["W_value"].view(b, n, self.num_kv_groups, self.head_dim)
        return queries.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)  # (b, heads, n, head_dim)

    def forward(self, x: torch.Tensor, mask, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, n = x.shape[0], x.shape[1]
        queries, keys, values = self._qkv_normed(x)
        queries, keys = apply_rope(queries, cos, sin), apply_rope(keys, cos, sin)
        scale = self.head_dim**-0.5
        if mask is None:
            context = fused._attend(queries, keys, values, causal=False, dropout_p=0.0, softmax_scale=scale)
        else:
            context = attend_with_mask(queries, keys, values, mask, scale, self._label)
        return self.out_proj(context.transpose(1, 2).reshape(b, n, self.d_out))  # (b, n, d_in)


class KVGroupedQueryAttention(GroupedQueryAttention):
    """The KV-cache notebook's layer: ``forward(x, mask, cos, sin, start_pos=0, cache=None)`` -> ``(context,
    next_cache)``, the cache's keys unrotated."""

    _label = "olmo3.KVGroupedQueryAttention"

    def forward(self, x: torch.Tensor, mask, cos: torch.Tensor, sin: torch.Tensor, start_pos: int = 0, cache=None):
        _check_call(self, start_pos, cache)
        b, n = x.shape[0], x.shape[1]
        queries, keys, values, next_cache = grow_unrotated(cache, *self._qkv_normed(x), cos, sin, start_pos)
        scale = self.head_dim**-0.5
        if mask is None:
            context = fused.attend_newest(queries, keys, values, causal=False, dropout_p=0.0, softmax_scale=scale)
        else:
            context = attend_cached(queries, keys, values, mask, scale, self._label)
        return self.out_proj(context.transpose(1, 2).reshape(b, n, self.d_out)), next_cache
