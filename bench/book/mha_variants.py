"""The ch03 bonus notebook's multi-head attention variants (ch03/02_bonus_efficient-multihead-attention) as a
reader writes them: the chapter's classes under the notebook's names, and the ways of computing the same
attention it compares (one combined qkv projection, einsum, PyTorch's SDPA with and without its flash path,
``nn.MultiheadAttention``). Every one is causal, scales by head_dim ** -0.5 and drops attention weights."""

from __future__ import annotations

import torch
from chapter3_flash.attention.reference import CausalAttention
from torch import nn


class Ch03_MHA_Wrapper(nn.Module):
    """The chapter's wrapper of causal heads, plus an output projection over the concatenated heads."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        self.heads = nn.ModuleList(
            [CausalAttention(d_in, d_out, context_length, dropout, qkv_bias) for _ in range(num_heads)]
        )
        self.out_proj = nn.Linear(d_out * num_heads, d_out * num_heads)

    def forward(self, x):
        return self.out_proj(torch.cat([head(x) for head in self.heads], dim=-1))


class Ch03_MHA(nn.Module):
    """The chapter's MultiHeadAttention under the notebook's name."""

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
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x):
        b, n, _ = x.shape
        split = lambda t: t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (b, nh, T, hs)
        keys, queries, values = split(self.W_key(x)), split(self.W_query(x)), split(self.W_value(x))
        scores = (queries @ keys.transpose(2, 3)).masked_fill(self.mask.bool()[:n, :n], -torch.inf)
        weights = self.dropout(torch.softmax(scores / keys.shape[-1] ** 0.5, dim=-1))
        return self.out_proj((weights @ values).transpose(1, 2).reshape(b, n, self.d_out))
