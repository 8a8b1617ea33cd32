"""The book's sliding-window attention with a KV cache (ch04/06_swa), fused.

Same constructor (``d_in, d_out, dropout, num_heads, qkv_bias=False, sliding_window_size=None``), parameters,
buffers and ``forward(x, use_cache=False)``; ``sliding_window_size`` may be changed after construction (the
book's GPTModel sets it per layer). Query i sees keys i - W < j <= i: the kernels' window ``(W - 1, 0)``,
whose tiles outside the window are never visited. The cache is written in place; with a window it keeps
what the next queries can still see and drops the rest when full. ``cache_k``/``cache_v`` show what the
book's layer holds: the last W keys and values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import fused
from .gqa import growing_capacity
from .kv_cache import KVCacheMixin
from .reference import _check_rank, _check_width, in_features, init_heads


def window_of(sliding_window_size: int | None) -> tuple[int, int]:
    """The kernels' (left, right) for the book's window of W keys (None: plain causal)."""
    if sliding_window_size is None:
        return (-1, -1)
    if isinstance(sliding_window_size, bool) or int(sliding_window_size) != sliding_window_size:
        raise TypeError(f"sliding_window_size must be an int or None, got {sliding_window_size!r}")
    if sliding_window_size < 1:
        raise ValueError(f"sliding_window_size must be at least 1, got {sliding_window_size}")
    return (int(sliding_window_size) - 1, -1)


class MultiHeadAttentionWithSWA(KVCacheMixin, nn.Module):
    def __init__(
        self,
        d_in: int,
        d_out: int,
        dropout: float,
        num_heads: int,
        qkv_bias: bool = False,
        sliding_window_size: int | None = None,
    ):
        super().__init__()
        init_heads(self, d_in, d_out, num_heads, dropout, qkv_bias)
        self.sliding_window_size = sliding_window_size
        self.register_buffer("cache_k", None, persistent=False)
        self.register_buffer("cache_v", None, persistent=False)
        self.ptr_current_pos = 0

    def _cache_capacity(self, needed: int) -> int:
        w = self.sliding_window_size
        return growing_capacity(max(needed, 2 * w if w else 0))

    def _book_view(self, store: torch.Tensor) -> torch.Tensor:
        # The book keeps the last W keys (all of them without a window).
        w = self.sliding_window_size
        return store[:, max(0, self._cache_len - w) if w else 0 : self._cache_len]

    def _make_room(self, n: int) -> None:
        # With a window, the next n queries need the last W - 1 keys; a full cache drops the older ones
        # (one copy of W - 1 rows every ~W tokens, not a torch.cat per token).
        w = self.sliding_window_size
        store = self._k_store
        if w is None or store is None or self._cache_len + n <= store.shape[1]:
            return
        keep = min(self._cache_len, w - 1)
        drop = self._cache_len - keep
        if drop:
            for t in (self._k_store, self._v_store):
                t[:, :keep] = t[:, drop : self._cache_len].clone()
            self._cache_len = keep

    def forward(self, x: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        _check_rank(x, 3, "(batch, num_tokens, d_in)", type(self).__name__)
        _check_width(x, in_features(self.W_query), type(self).__name__)
        window = window_of(self.sliding_window_size)  # a bad window is refused before any work
        b, n, _ = x.shape
        keys, values, queries = (
            fused.project_heads(self, x, name, self.num_heads) for name in ("W_key", "W_value", "W_query")
        )  # (b, T, nh, hs)
        p = fused._dropout_p(self.dropout)
        if use_cache:
            context = self._cache_attend(queries.transpose(1, 2), keys, values, p, window)
        else:
            q, k, v = (t.transpose(1, 2) for t in (queries, keys, values))  # (b, nh, T, hs)
            context = fused._attend(q, k, v, causal=True, dropout_p=p, window_size=window)
            self.ptr_current_pos = 0
        return self.out_proj(context.transpose(1, 2).reshape(b, n, self.d_out))

    def reset_cache(self) -> None:
        self._reset_kv()
        self.ptr_current_pos = 0


class MultiHeadAttention(MultiHeadAttentionWithSWA):
    """The baseline both bonus folders compare against (ch04/04_gqa and ch04/06_swa, ``gpt_with_kv_mha.py``): the
    KV-cache MultiHeadAttention without a mask buffer or a context length, ``(d_in, d_out, dropout, num_heads,
    qkv_bias=False)``; the sliding-window layer without a window. The book places a cached call's queries at
    ``ptr_current_pos`` and the cache's keys at ``0 .. T``; after a call without the cache (which resets the
    position but not the cache) those stop being the newest-aligned causal rule, and such a call runs with the
    book's own mask, unfused."""

    sliding_window_size = None

    def __init__(self, d_in: int, d_out: int, dropout: float, num_heads: int, qkv_bias: bool = False):
        super().__init__(d_in, d_out, dropout, num_heads, qkv_bias)
        del self.sliding_window_size  # not an attribute of the book's class: the class's None stands

    def _newest_aligned(self) -> bool:
        return self.ptr_current_pos == self._cache_len

    def _attend_all(self, queries, keys, values, dropout_p: float, window) -> torch.Tensor:
        if self._newest_aligned():
            return super()._attend_all(queries, keys, values, dropout_p, window)
        n, total = queries.shape[2], keys.shape[2]
        q_pos = torch.arange(self.ptr_current_pos, self.ptr_current_pos + n, device=queries.device)
        visible = q_pos[:, None] >= torch.arange(total, device=queries.device)[None, :]
        return F.scaled_dot_product_attention(queries, keys, values, attn_mask=visible, dropout_p=dropout_p)
