"""Generation with a KV cache, fused: the book's KV-cache ``MultiHeadAttention`` (ch04/03_kv-cache).

Same constructor, parameters, non-persistent ``mask`` buffer and ``state_dict`` as the book's class;
``forward(x, use_cache=False)``, ``reset_cache()``, ``ptr_current_pos``. What changes is how the cache
lives: the book grows ``cache_k``/``cache_v`` by ``torch.cat`` on every token (a copy of the whole cache
per step); here they are allocated once, at the first cached call, for that batch, dtype and device
(``(b, context_length, num_heads, head_dim)``, the book's layout), and each step's keys and values are
written in place. The prompt goes through ``flash_attention`` (bottom-right causal over the cache), each
new token through ``flash_attention_with_kvcache``'s split-KV decode kernel. Running past
``context_length`` is a ``ValueError``, as the book's mask slicing fails there.

``KVCacheMixin`` is the machinery, shared with the bonus models' cached layers (``attention.gqa``,
``attention.swa``), whose caches have no fixed length and grow by doubling instead.
"""

from __future__ import annotations

import torch
from torch import nn

from attention import fused
from attention.reference import _check_context, _check_rank, _check_width, in_features, init_heads
from kernels import flash_attention_with_kvcache

# New tokens per cached call up to which the decode kernel runs; a longer chunk (a prompt) is a prefill.
DECODE_MAX_TOKENS = 16


class KVCacheMixin:
    """A key/value cache allocated once and written in place, for layers with ``cache_k``/``cache_v`` buffers
    and a ``ptr_current_pos``. ``cache_k[:, :self._cache_len]`` holds the keys of positions
    ``[self._cache_start, self._cache_start + self._cache_len)``, in the book's ``(b, T, heads, head_dim)`` layout."""

    _cache_start = 0
    _cache_len = 0

    def _cache_capacity(self, needed: int) -> int:
        """Positions to allocate for ``needed`` cached positions; raise if the layer cannot hold them."""
        raise NotImplementedError

    def _reset_kv(self) -> None:
        self.cache_k, self.cache_v = None, None
        self._cache_start = self._cache_len = 0

    def _reserve(self, keys_new: torch.Tensor, needed: int) -> None:
        """Room for ``needed`` positions, in keys_new's batch, dtype and device; existing entries move along."""
        cache = self.cache_k
        fits = (
            cache is not None
            and cache.shape[0] == keys_new.shape[0]
            and cache.dtype == keys_new.dtype
            and cache.device == keys_new.device
            and cache.shape[2:] == keys_new.shape[2:]
        )
        if fits and cache.shape[1] >= needed and self._cache_len <= cache.shape[1]:
            return
        if cache is not None and not fits:
            # A new batch, dtype or device: the book would fail (or silently mix) here; start over.
            self._cache_start, self._cache_len = self.ptr_current_pos, 0
        capacity = self._cache_capacity(needed)
        b, _, heads, head_dim = keys_new.shape
        new_k = keys_new.new_empty((b, capacity, heads, head_dim))  # (b, T, heads, hs)
        new_v = keys_new.new_empty((b, capacity, heads, head_dim))
        if fits and self._cache_len:
            # One that outgrew its room, or the book's own (grown by torch.cat; adopted by swap_attention).
            new_k[:, : self._cache_len] = cache[:, : self._cache_len]
            new_v[:, : self._cache_len] = self.cache_v[:, : self._cache_len]
        self.cache_k, self.cache_v = new_k, new_v

    def _cache_attend(
        self, queries: torch.Tensor, keys_new: torch.Tensor, values_new: torch.Tensor, dropout_p: float, window
    ) -> torch.Tensor:
        """Append this call's keys and values and attend the queries (the newest positions) to the cache.

        queries (b, heads, n, hs); keys_new, values_new (b, n, kv_heads, hs). Returns (b, heads, n, hs)."""
        n = keys_new.shape[1]
        self._make_room(n)
        self._reserve(keys_new, self._cache_len + n)
        length = self._cache_len
        k_cache, v_cache = self.cache_k.transpose(1, 2), self.cache_v.transpose(1, 2)  # (b, kv_heads, T, hs)
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (queries, keys_new, values_new))
        if n <= DECODE_MAX_TOKENS and dropout_p == 0.0 and not needs_grad:
            context = flash_attention_with_kvcache(
                queries, k_cache, v_cache, keys_new.transpose(1, 2), values_new.transpose(1, 2),
                cache_seqlens=length, causal=True, window_size=window, backend=fused.current_backend_for_decode(),
            )  # fmt: skip
        else:
            if needs_grad:
                # Training through the cache: gradients reach this call's keys and values, as in the book.
                keys = torch.cat([k_cache[:, :, :length].detach(), keys_new.transpose(1, 2)], dim=2)
                values = torch.cat([v_cache[:, :, :length].detach(), values_new.transpose(1, 2)], dim=2)
            else:
                k_cache[:, :, length : length + n] = keys_new.transpose(1, 2)
                v_cache[:, :, length : length + n] = values_new.transpose(1, 2)
                keys, values = k_cache[:, :, : length + n], v_cache[:, :, : length + n]
            context = fused._attend(queries, keys, values, causal=True, dropout_p=dropout_p, window_size=window)
            if needs_grad:
                self.cache_k[:, length : length + n] = keys_new.detach()
                self.cache_v[:, length : length + n] = values_new.detach()
        self._cache_len = length + n
        self.ptr_current_pos += n
        return context

    def _make_room(self, n: int) -> None:
        """Before appending n positions: nothing by default (a sliding window drops what it no longer sees)."""


class MultiHeadAttention(KVCacheMixin, nn.Module):
    """The book's KV-cache MultiHeadAttention (ch04/03_kv-cache), fused."""

    def __init__(
        self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int, qkv_bias: bool = False
    ):
        super().__init__()
        init_heads(self, d_in, d_out, num_heads, dropout, qkv_bias)
        self.register_buffer(
            "mask", torch.triu(torch.ones(context_length, context_length), diagonal=1), persistent=False
        )
        self.register_buffer("cache_k", None, persistent=False)
        self.register_buffer("cache_v", None, persistent=False)
        self.ptr_current_pos = 0

    def _cache_capacity(self, needed: int) -> int:
        context_length = self.mask.shape[0]
        if needed > context_length:
            raise ValueError(
                f"{type(self).__name__}: position {needed} is past context_length {context_length} "
                "(the cache holds context_length tokens; call reset_cache() to start over)"
            )
        return context_length

    def forward(self, x: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        _check_rank(x, 3, "(batch, num_tokens, d_in)", type(self).__name__)
        _check_width(x, in_features(self.W_query), type(self).__name__)
        b, n, _ = x.shape
        split = lambda name: fused.project_heads(self, x, name, self.num_heads)  # (b, T, nh, hs)
        keys_new, values_new, queries = split("W_key"), split("W_value"), split("W_query")
        p = fused._dropout_p(self.dropout)
        if use_cache:
            context = self._cache_attend(queries.transpose(1, 2), keys_new, values_new, p, (-1, -1))
        else:
            _check_context(n, self.mask.shape[0], type(self).__name__)
            q, k, v = (t.transpose(1, 2) for t in (queries, keys_new, values_new))  # (b, nh, T, hs)
            context = fused._attend(q, k, v, causal=True, dropout_p=p)
        return self.out_proj(context.transpose(1, 2).reshape(b, n, self.d_out))  # (b, T, d_out)

    def reset_cache(self) -> None:
        self._reset_kv()
        self.ptr_current_pos = 0
