"""ch04/06_swa as a reader writes it: multi-head attention over a sliding window of the last
``sliding_window_size`` keys (None: plain causal), with a KV cache cut to the window."""

from __future__ import annotations

import torch
from torch import nn


class MultiHeadAttentionWithSWA(nn.Module):
    def __init__(self, d_in, d_out, dropout, num_heads, qkv_bias=False, sliding_window_size=None):
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
        self.sliding_window_size = sliding_window_size
        self.register_buffer("cache_k", None, persistent=False)
        self.register_buffer("cache_v", None, persistent=False)
        self.ptr_current_pos = 0

    def forward(self, x, use_cache=False):
        b, n, _ = x.shape
        split = lambda t: t.view(b, n, self.num_heads, self.head_dim)  # (b, T, nh, hs)
        keys_new, values_new, queries = split(self.W_key(x)), split(self.W_value(x)), split(self.W_query(x))
        if use_cache:
            old_len = 0 if self.cache_k is None else self.cache_k.size(1)
            if self.cache_k is None:
                all_k, all_v = keys_new, values_new
            else:
                all_k = torch.cat([self.cache_k, keys_new], dim=1)
                all_v = torch.cat([self.cache_v, values_new], dim=1)
            keys, values = all_k, all_v
            if self.sliding_window_size is not None:
                # The chunk's first query still needs W - 1 older keys; the cache keeps the last W.
                keep = min(keys.size(1), self.sliding_window_size + n - 1)
                keys, values = keys[:, -keep:], values[:, -keep:]
                kept = min(all_k.size(1), self.sliding_window_size)
                self.cache_k, self.cache_v = all_k[:, -kept:], all_v[:, -kept:]
            else:
                self.cache_k, self.cache_v = all_k, all_v
            dropped = all_k.size(1) - keys.size(1)
            k_start = self.ptr_current_pos - old_len + dropped
            q_start = self.ptr_current_pos
        else:
            keys, values = keys_new, values_new
            q_start = k_start = 0
        queries, keys, values = queries.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        scores = queries @ keys.transpose(2, 3)
        q_pos = torch.arange(q_start, q_start + n, device=x.device)
        k_pos = torch.arange(k_start, k_start + keys.shape[-2], device=x.device)
        w = keys.shape[-2] + 1 if self.sliding_window_size is None else int(self.sliding_window_size)
        diff = q_pos[:, None] - k_pos[None, :]
        self.ptr_current_pos = self.ptr_current_pos + n if use_cache else 0
        scores.masked_fill_((diff < 0) | (diff >= w), -torch.inf)
        weights = self.dropout(torch.softmax(scores / keys.shape[-1] ** 0.5, dim=-1))
        context = (weights @ values).transpose(1, 2).contiguous().view(b, n, self.d_out)
        return self.out_proj(context)

    def reset_cache(self):
        self.cache_k, self.cache_v = None, None
        self.ptr_current_pos = 0


class MultiHeadAttention(nn.Module):
    """The baseline of ch04/04_gqa and ch04/06_swa (gpt_with_kv_mha.py): a KV cache grown by torch.cat, no mask
    buffer; a cached call's queries sit at ptr_current_pos, the cache's keys at 0 .. T."""

    def __init__(self, d_in, d_out, dropout, num_heads, qkv_bias=False):
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
        self.register_buffer("cache_k", None, persistent=False)
        self.register_buffer("cache_v", None, persistent=False)
        self.ptr_current_pos = 0

    def forward(self, x, use_cache=False):
        b, n, _ = x.shape
        split = lambda t: t.view(b, n, self.num_heads, self.head_dim)  # (b, T, nh, hs)
        keys, values, queries = split(self.W_key(x)), split(self.W_value(x)), split(self.W_query(x))
        if use_cache:
            if self.cache_k is None:
                self.cache_k, self.cache_v = keys, values
            else:
                self.cache_k = torch.cat([self.cache_k, keys], dim=1)
                self.cache_v = torch.cat([self.cache_v, values], dim=1)
            keys, values = self.cache_k, self.cache_v
            q_pos = torch.arange(self.ptr_current_pos, self.ptr_current_pos + n, device=x.device)
            self.ptr_current_pos += n
        else:
            q_pos = torch.arange(n, device=x.device)
            self.ptr_current_pos = 0
        queries, keys, values = queries.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        scores = queries @ keys.transpose(2, 3)
        hidden = q_pos[:, None] < torch.arange(keys.shape[2], device=x.device)[None, :]
        scores.masked_fill_(hidden, -torch.inf)
        weights = self.dropout(torch.softmax(scores / keys.shape[-1] ** 0.5, dim=-1))
        context = (weights @ values).transpose(1, 2).contiguous().view(b, n, self.d_out)
        return self.out_proj(context)

    def reset_cache(self):
        self.cache_k, self.cache_v = None, None
        self.ptr_current_pos = 0
