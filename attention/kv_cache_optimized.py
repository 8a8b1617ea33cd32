"""The book's optimized KV-cache ``MultiHeadAttention`` (ch04/03_kv-cache/gpt_with_kv_cache_optimized.py), fused.

Same constructor (``d_in, d_out, context_length, dropout, num_heads, qkv_bias=False, max_seq_len=None,
window_size=None``), parameters, ``state_dict``, buffers and ``forward(x, use_cache=False)``; the same cache:
``cache_k``/``cache_v`` preallocated as ``(b, num_heads, window_size, head_dim)`` zeros, ``ptr_cur`` the next
free slot, and when a chunk would overflow the window the oldest entries shift out, so a cached call attends
to the last ``window_size`` keys at most (bottom-right causal). Only the attention changes: each new token goes
through the split-KV decode kernel, which appends its key and value in place; a longer chunk, dropout or a
gradient through ``flash_attention``. The cache takes the keys' dtype where the book's takes the default dtype
(the book's then fails on half-precision models). A chunk longer than ``window_size`` is a ``ValueError``
(the book asserts).
"""

from __future__ import annotations

import torch
from chapter3_flash.kernels import flash_attention_with_kvcache
from torch import nn

from . import fused
from .reference import _check_rank, _check_width, in_features, init_heads


class MultiHeadAttention(nn.Module):
    def __init__(
        self,
        d_in: int,
        d_out: int,
        context_length: int,
        dropout: float,
        num_heads: int,
        qkv_bias: bool = False,
        max_seq_len: int | None = None,
        window_size: int | None = None,
    ):
        super().__init__()
        init_heads(self, d_in, d_out, num_heads, dropout, qkv_bias)
        self.max_seq_len = max_seq_len or context_length
        self.window_size = window_size or self.max_seq_len
        if isinstance(self.window_size, bool) or not isinstance(self.window_size, int) or self.window_size < 1:
            raise ValueError(
                f"window_size (or max_seq_len, context_length) must be a positive int, got {self.window_size!r}"
            )
        self.register_buffer("cache_k", None, persistent=False)
        self.register_buffer("cache_v", None, persistent=False)

    def forward(self, x: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        name = type(self).__name__
        _check_rank(x, 3, "(batch, num_tokens, d_in)", name)
        _check_width(x, in_features(self.W_query), name)
        b, n, _ = x.shape
        if use_cache and n > self.window_size:
            raise ValueError(f"{name}: a chunk of {n} tokens exceeds the KV cache's window_size {self.window_size}")
        split = lambda attr: fused.project_heads(self, x, attr, self.num_heads).transpose(1, 2)  # (b, nh, T, hs)
        keys_new, values_new, queries = split("W_key"), split("W_value"), split("W_query")
        p = fused._dropout_p(self.dropout)
        if not use_cache:
            self.ptr_cur = 0  # as the book: the next cached call starts the cache over
            context = fused._attend(queries, keys_new, values_new, causal=True, dropout_p=p)
        else:
            context = self._cache_attend(queries, keys_new, values_new, p)
        return self.out_proj(context.transpose(1, 2).reshape(b, n, self.d_out))

    def _cache_attend(self, queries, keys_new, values_new, dropout_p: float) -> torch.Tensor:
        b, _, n, _ = keys_new.shape
        cache = self.cache_k
        if cache is None or cache.size(0) != b or cache.dtype != keys_new.dtype or cache.device != keys_new.device:
            shape = (b, self.num_heads, self.window_size, self.head_dim)
            self.cache_k = torch.zeros(shape, dtype=keys_new.dtype, device=keys_new.device)
            self.cache_v = torch.zeros_like(self.cache_k)
            self.ptr_cur = 0
        overflow = self.ptr_cur + n - self.window_size
        if overflow > 0:  # the oldest entries shift out, as the book's
            for t in (self.cache_k, self.cache_v):
                t[:, :, :-overflow] = t[:, :, overflow:].clone()
            self.ptr_cur -= overflow
        start = self.ptr_cur
        self.ptr_cur += n
        if fused.decodes(n, dropout_p, fused.needs_grad(queries, keys_new, values_new)):
            return flash_attention_with_kvcache(
                queries, self.cache_k, self.cache_v, keys_new, values_new,
                cache_seqlens=start, causal=True, backend=fused.current_backend(),
            )  # fmt: skip
        # The book's in-place write: with a gradient, the cache joins the graph exactly as the book's does.
        self.cache_k[:, :, start : self.ptr_cur] = keys_new
        self.cache_v[:, :, start : self.ptr_cur] = values_new
        keys, values = self.cache_k[:, :, : self.ptr_cur], self.cache_v[:, :, : self.ptr_cur]
        return fused._attend(queries, keys, values, causal=True, dropout_p=dropout_p)

    def reset_cache(self) -> None:
        self.cache_k, self.cache_v = None, None
