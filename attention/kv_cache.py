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
from chapter3_flash.kernels import flash_attention_with_kvcache
from torch import nn

from . import fused
from .reference import _check_context, _check_rank, _check_width, in_features, init_heads


class KVCacheMixin:
    """A key/value cache allocated once and written in place, for layers with ``cache_k``/``cache_v`` buffers
    and a ``ptr_current_pos``.

    The storage, ``_k_store``/``_v_store`` ``(b, capacity, kv_heads, head_dim)``, holds in its first
    ``_cache_len`` rows the keys and values of the positions kept, the newest ending at ``ptr_current_pos``. The
    book's buffers ``cache_k``/``cache_v`` are republished after every cached call as views of the storage (no
    copy) showing exactly what the book's layer holds at that point: the same shape, layout and values
    (``_book_view``). A cache the layer did not publish (the book's own, adopted by ``swap_attention``; one moved
    by ``module.to()``; one a reader assigned) is taken over at the next cached call; ``None`` empties it."""

    _cache_len = 0
    _k_store = None
    _v_store = None
    _published = (None, None)  # the cache_k, cache_v objects this layer last set

    def _cache_capacity(self, needed: int) -> int:
        """Positions to allocate for ``needed`` cached positions; raise if the layer cannot hold them."""
        raise NotImplementedError

    def _book_view(self, store: torch.Tensor) -> torch.Tensor:
        """What the book's layer holds, from the storage: its first ``_cache_len`` rows in (b, T, heads, hd)."""
        return store[:, : self._cache_len]

    def _from_book(self, cache: torch.Tensor) -> torch.Tensor:
        """The inverse of ``_book_view``'s layout: the book's cache as (b, T, kv_heads, hd)."""
        return cache

    def cache_storage(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The preallocated ``(b, capacity, kv_heads, head_dim)`` key and value storage (None before the first
        cached call): for callers that drive ``flash_attention_with_kvcache`` themselves (a CUDA graph)."""
        self._sync_cache()
        return None if self._k_store is None else (self._k_store, self._v_store)

    def _reset_kv(self) -> None:
        self.cache_k, self.cache_v = None, None
        self._k_store = self._v_store = None
        self._published = (None, None)
        self._cache_len = 0

    def _publish(self) -> None:
        k, v = self._book_view(self._k_store), self._book_view(self._v_store)
        buffers = self._buffers  # the registered buffers themselves: Module.__setattr__'s checks cost more here
        buffers["cache_k"], buffers["cache_v"] = k, v
        self._published = (k, v)

    def _sync_cache(self) -> None:
        """Take over a cache this layer did not publish (see the class docstring)."""
        k, v = self._buffers.get("cache_k"), self._buffers.get("cache_v")
        if k is self._published[0] and v is self._published[1]:
            return
        if k is None or v is None:  # emptied by the reader (the book's reset assigns None)
            self._k_store = self._v_store = None
            self._cache_len = 0
        else:  # copied into storage of our own: a tensor someone else may hold is never written
            keys, values = self._from_book(k), self._from_book(v)
            length = keys.shape[1]
            capacity = self._cache_capacity(max(length, 1))
            self._k_store, self._v_store = self._allocate(keys, capacity), self._allocate(values, capacity)
            self._k_store[:, :length] = keys
            self._v_store[:, :length] = values
            self._cache_len = length
        self._published = (k, v)

    @staticmethod
    def _allocate(like: torch.Tensor, capacity: int) -> torch.Tensor:
        b, _, heads, head_dim = like.shape
        return like.new_empty((b, capacity, heads, head_dim))  # (b, T, heads, hs)

    def _reserve(self, keys_new: torch.Tensor, needed: int) -> None:
        """Room for ``needed`` positions, in keys_new's batch, dtype and device; existing entries move along."""
        store = self._k_store
        fits = (
            store is not None
            and store.shape[0] == keys_new.shape[0]
            and store.dtype == keys_new.dtype
            and store.device == keys_new.device
            and store.shape[2:] == keys_new.shape[2:]
        )
        if fits and store.shape[1] >= needed:
            return
        if store is not None and not fits:
            # An empty cache of another batch (a live one was refused above), or another dtype or device: the book
            # would fail (or silently mix) here; start over.
            self._cache_len = 0
            needed = keys_new.shape[1]
        capacity = self._cache_capacity(needed)
        new_k, new_v = self._allocate(keys_new, capacity), self._allocate(keys_new, capacity)
        if fits and self._cache_len:  # one that outgrew its room: the entries move along
            new_k[:, : self._cache_len] = store[:, : self._cache_len]
            new_v[:, : self._cache_len] = self._v_store[:, : self._cache_len]
        self._k_store, self._v_store = new_k, new_v

    def _cache_attend(
        self, queries: torch.Tensor, keys_new: torch.Tensor, values_new: torch.Tensor, dropout_p: float, window
    ) -> torch.Tensor:
        """Append this call's keys and values and attend the queries (the newest positions) to the cache.

        queries (b, heads, n, hs); keys_new, values_new (b, n, kv_heads, hs). Returns (b, heads, n, hs)."""
        n = keys_new.shape[1]
        self._sync_cache()
        if self._cache_len and self._k_store.shape[0] != keys_new.shape[0]:
            # The book's torch.cat fails here too; before anything moves, so cache and position stay as they were.
            raise ValueError(
                f"{type(self).__name__}: the cache holds {self._cache_len} position(s) of a batch of "
                f"{self._k_store.shape[0]}, this call has a batch of {keys_new.shape[0]}; call reset_cache() "
                "(or the model's) before generating for another batch"
            )
        self._make_room(n)
        self._reserve(keys_new, self._cache_len + n)
        length = self._cache_len
        k_cache, v_cache = self._k_store.transpose(1, 2), self._v_store.transpose(1, 2)  # (b, kv_heads, T, hs)
        grad = fused.needs_grad(queries, keys_new, values_new)
        if self._newest_aligned() and fused.decodes(n, dropout_p, grad):
            context = flash_attention_with_kvcache(
                queries, k_cache, v_cache, keys_new.transpose(1, 2), values_new.transpose(1, 2),
                cache_seqlens=length, causal=True, window_size=window, backend=fused.current_backend(),
            )  # fmt: skip
        else:
            if grad:
                # Training through the cache: gradients reach this call's keys and values, as in the book.
                keys = torch.cat([k_cache[:, :, :length].detach(), keys_new.transpose(1, 2)], dim=2)
                values = torch.cat([v_cache[:, :, :length].detach(), values_new.transpose(1, 2)], dim=2)
            else:
                k_cache[:, :, length : length + n] = keys_new.transpose(1, 2)
                v_cache[:, :, length : length + n] = values_new.transpose(1, 2)
                keys, values = k_cache[:, :, : length + n], v_cache[:, :, : length + n]
            context = self._attend_all(queries, keys, values, dropout_p, window)
            if grad:
                self._k_store[:, length : length + n] = keys_new.detach()
                self._v_store[:, length : length + n] = values_new.detach()
        self._cache_len = length + n
        self.ptr_current_pos += n
        self._publish()
        return context

    def _make_room(self, n: int) -> None:
        """Before appending n positions: nothing by default (a sliding window drops what it no longer sees)."""

    def _newest_aligned(self) -> bool:
        """Whether this call's queries are the cache's newest positions (bottom-right causal), as in every class
        but one (``attention.swa.MultiHeadAttention``)."""
        return True

    def _attend_all(self, queries, keys, values, dropout_p: float, window) -> torch.Tensor:
        """The queries against every cached key and this call's (keys, values (b, kv_heads, T, hs)), fused."""
        return fused._attend(queries, keys, values, causal=True, dropout_p=dropout_p, window_size=window)


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
