"""The book's KV-cache layers whose caller holds the cache (pkg ``llms_from_scratch.kv_cache``, and Gemma 3's
KV-cache notebook) as a reader writes them: the caller
holds each layer's cache, ``forward(..., start_pos, cache)`` returns ``(context, next_cache)`` with the cache
grown by ``torch.cat``; GPT-2's layer masks causally itself, Llama 3.2's and Qwen3's take the model's mask
(``triu(ones(end, end), 1)[start:end, :end][None, None]``) and rotate from ``start_pos``."""

from __future__ import annotations

import torch
from torch import nn

from bench.book import gemma3, llama3, qwen3
from bench.book.rope import apply_rope


class MultiHeadAttention(nn.Module):
    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        assert d_out % num_heads == 0
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, use_cache=False, start_pos=0, cache=None):
        b, n, _ = x.shape
        split = lambda t: t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        keys, values, queries = split(self.W_key(x)), split(self.W_value(x)), split(self.W_query(x))
        next_cache = None
        if use_cache:
            if cache is not None:
                keys, values = torch.cat([cache[0], keys], dim=2), torch.cat([cache[1], values], dim=2)
            next_cache = (keys, values)
        total = keys.size(2)
        mask = torch.triu(torch.ones(total, total, dtype=torch.bool, device=x.device), diagonal=1)[-n:]
        scores = (queries @ keys.transpose(2, 3)).masked_fill(mask, -torch.inf)
        weights = self.dropout(torch.softmax(scores / keys.shape[-1] ** 0.5, dim=-1))
        context = (weights @ values).transpose(1, 2).contiguous().view(b, n, self.d_out)
        return self.out_proj(context), next_cache


def _cached_attention(layer, x, mask, cos, sin, start_pos, cache):
    b, n, _ = x.shape
    queries = layer.W_query(x).view(b, n, layer.num_heads, layer.head_dim).transpose(1, 2)
    keys = layer.W_key(x).view(b, n, layer.num_kv_groups, layer.head_dim).transpose(1, 2)
    values = layer.W_value(x).view(b, n, layer.num_kv_groups, layer.head_dim).transpose(1, 2)
    if getattr(layer, "q_norm", None):
        queries = layer.q_norm(queries)
    if getattr(layer, "k_norm", None):
        keys = layer.k_norm(keys)
    queries = apply_rope(queries, cos, sin, offset=start_pos)
    keys = apply_rope(keys, cos, sin, offset=start_pos)
    if cache is not None:
        keys, values = torch.cat([cache[0], keys], dim=2), torch.cat([cache[1], values], dim=2)
    next_cache = (keys, values)
    keys = keys.repeat_interleave(layer.group_size, dim=1)
    values = values.repeat_interleave(layer.group_size, dim=1)
    scores = (queries @ keys.transpose(2, 3)).masked_fill(mask, -torch.inf)
    weights = torch.softmax(scores / layer.head_dim**0.5, dim=-1)
    context = (weights @ values).transpose(1, 2).reshape(b, n, layer.d_out)
    return layer.out_proj(context), next_cache


class Llama3GroupedQueryAttention(llama3.GroupedQueryAttention):
    def forward(self, x, mask, cos, sin, start_pos=0, cache=None):
        return _cached_attention(self, x, mask, cos, sin, start_pos, cache)


class Qwen3GroupedQueryAttention(qwen3.GroupedQueryAttention):
    def forward(self, x, mask, cos, sin, start_pos=0, cache=None):
        return _cached_attention(self, x, mask, cos, sin, start_pos, cache)


class Gemma3GroupedQueryAttention(gemma3.GroupedQueryAttention):
    """Gemma 3's KV-cache notebook: the cache keeps keys before RoPE; they are rotated after the concatenation."""

    def forward(self, x, mask, cos, sin, start_pos=0, cache=None):
        b, n, _ = x.shape
        queries = self.W_query(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        keys = self.W_key(x).view(b, n, self.num_kv_groups, self.head_dim).transpose(1, 2)
        values = self.W_value(x).view(b, n, self.num_kv_groups, self.head_dim).transpose(1, 2)
        if self.q_norm:
            queries = self.q_norm(queries)
        if self.k_norm:
            keys = self.k_norm(keys)
        prev = 0 if cache is None or cache[0] is None else cache[0].size(2)
        if prev:
            keys, values = torch.cat([cache[0], keys], dim=2), torch.cat([cache[1], values], dim=2)
        next_cache = (keys, values)
        queries = apply_rope(queries, cos, sin, offset=start_pos) * self.scaling
        rotated = apply_rope(keys, cos, sin, offset=start_pos - prev).repeat_interleave(self.group_size, dim=1)
        scores = (queries @ rotated.transpose(2, 3)).masked_fill(mask, -torch.inf)
        weights = torch.softmax(scores, dim=-1)
        context = (weights @ values.repeat_interleave(self.group_size, dim=1)).transpose(1, 2)
        return self.out_proj(context.reshape(b, n, self.d_out)), next_cache


# The book names these classes GroupedQueryAttention; swap_attention recognises classes by that name.
Llama3GroupedQueryAttention.__name__ = Qwen3GroupedQueryAttention.__name__ = "GroupedQueryAttention"
Gemma3GroupedQueryAttention.__name__ = "GroupedQueryAttention"


def model_mask(start: int, end: int, device=None, sliding_window: int | None = None) -> torch.Tensor:
    """The mask the cached models pass for the positions [start, end): causal (the pkg's Llama 3.2 / Qwen3, Gemma
    3's global layers), or also hiding keys ``sliding_window`` or more behind (Gemma 3's local layers)."""
    ones = torch.ones(end, end, dtype=torch.bool, device=device)
    mask = torch.triu(ones, diagonal=1)
    if sliding_window is not None:
        mask = mask | torch.triu(ones, diagonal=sliding_window).T
    return mask[start:end, :end][None, None]
