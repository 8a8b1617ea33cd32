"""The book's grouped-query attention with a KV cache (ch04/04_gqa), fused.

Same constructor (``d_in, d_out, dropout, num_heads, num_kv_groups, dtype=None, qkv_bias=False``),
parameters in the book's order (``W_key``, ``W_value``, ``W_query``, ``out_proj``), buffers and
``forward(x, use_cache=False)``. The kernel reads each key/value head for its whole group: no
``repeat_interleave`` copies. The cache has no fixed length here (the class takes no context length): it
is allocated in place and doubles when full, never ``torch.cat`` per token. A call without the cache
resets it, as the book's does.
"""

from __future__ import annotations

import torch
from torch import nn

from attention import fused
from attention.kv_cache import KVCacheMixin
from attention.reference import _check_groups, _check_rank, _check_width, in_features

MIN_CACHE = 256  # positions allocated at the first cached call (then doubled as needed)


def growing_capacity(needed: int) -> int:
    return max(MIN_CACHE, 1 << (needed - 1).bit_length())


class GroupedQueryAttention(KVCacheMixin, nn.Module):
    def __init__(
        self,
        d_in: int,
        d_out: int,
        dropout: float,
        num_heads: int,
        num_kv_groups: int,
        dtype: torch.dtype | None = None,
        qkv_bias: bool = False,
    ):
        super().__init__()
        _check_groups(num_heads, num_kv_groups, d_out)
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.W_key = nn.Linear(d_in, num_kv_groups * self.head_dim, bias=qkv_bias, dtype=dtype)
        self.W_value = nn.Linear(d_in, num_kv_groups * self.head_dim, bias=qkv_bias, dtype=dtype)
        self.num_kv_groups = num_kv_groups
        self.group_size = num_heads // num_kv_groups
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias, dtype=dtype)
        self.out_proj = nn.Linear(d_out, d_out, bias=False, dtype=dtype)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("cache_k", None, persistent=False)
        self.register_buffer("cache_v", None, persistent=False)
        self.ptr_current_pos = 0

    def _cache_capacity(self, needed: int) -> int:
        return growing_capacity(needed)

    def forward(self, x: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        _check_rank(x, 3, "(batch, num_tokens, d_in)", type(self).__name__)
        _check_width(x, in_features(self.W_query), type(self).__name__)
        b, n, _ = x.shape
        queries = fused.project_heads(self, x, "W_query", self.num_heads)  # (b, T, nh, hs)
        keys = fused.project_heads(self, x, "W_key", self.num_kv_groups)  # (b, T, n_kv, hs)
        values = fused.project_heads(self, x, "W_value", self.num_kv_groups)
        p = fused._dropout_p(self.dropout)
        if use_cache:
            context = self._cache_attend(queries.transpose(1, 2), keys, values, p, (-1, -1))
        else:
            if self.cache_k is not None:
                self.reset_cache()
            self.ptr_current_pos = 0
            q, k, v = (t.transpose(1, 2) for t in (queries, keys, values))  # (b, heads, T, hs)
            context = fused._attend(q, k, v, causal=True, dropout_p=p)
        return self.out_proj(context.transpose(1, 2).reshape(b, n, self.d_out))

    def reset_cache(self) -> None:
        self._reset_kv()
        self.ptr_current_pos = 0
