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
from chapter3_flash.kernels import configs
from torch import nn

from . import fused
from .kv_cache import KVCacheMixin
from .reference import _check_rank, _check_width, in_features, init_group_heads

MIN_CACHE = 256  # positions allocated at the first cached call (then doubled as needed)


def growing_capacity(needed: int) -> int:
    return max(MIN_CACHE, configs.next_power_of_2(needed))


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
        init_group_heads(self, d_in, d_out, num_heads, num_kv_groups, qkv_bias, dtype)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("cache_k", None, persistent=False)
        self.register_buffer("cache_v", None, persistent=False)
        self.ptr_current_pos = 0

    def _cache_capacity(self, needed: int) -> int:
        return growing_capacity(needed)

    def _book_view(self, store: torch.Tensor) -> torch.Tensor:
        return store[:, : self._cache_len].transpose(1, 2)  # the book's (b, kv_heads, T, hd)

    def _from_book(self, cache: torch.Tensor) -> torch.Tensor:
        return cache.transpose(1, 2)

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
