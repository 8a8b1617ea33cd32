"""The ch03 bonus notebook's multi-head attention variants (ch03/02_bonus_efficient-multihead-attention) as a
reader writes them: the chapter's classes under the notebook's names, and the ways of computing the same
attention it compares (one combined qkv projection, einsum, PyTorch's SDPA with and without its flash path,
``nn.MultiheadAttention``). Every one is causal, scales by head_dim ** -0.5 and drops attention weights."""

from __future__ import annotations

import math

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


class MultiHeadAttentionCombinedQKV(nn.Module):
    """One qkv projection to 3 * d_out, split as (3, heads, head_dim); the chapter's mask buffer and dropout."""

    def __init__(self, d_in, d_out, num_heads, context_length, dropout=0.0, qkv_bias=False):
        super().__init__()
        assert d_out % num_heads == 0
        self.num_heads = num_heads
        self.context_length = context_length
        self.head_dim = d_out // num_heads
        self.qkv = nn.Linear(d_in, 3 * d_out, bias=qkv_bias)
        self.proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x):
        b, n, embed_dim = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        queries, keys, values = qkv.unbind(0)  # each (b, nh, T, hs)
        scores = (queries @ keys.transpose(-2, -1)).masked_fill(self.mask.bool()[:n, :n], -torch.inf)
        weights = self.dropout(torch.softmax(scores / keys.shape[-1] ** 0.5, dim=-1))
        return self.proj((weights @ values).transpose(1, 2).contiguous().view(b, n, embed_dim))


class MHAEinsum(nn.Module):
    """Raw (d_in, d_out) weight matrices (drawn with randn, then Kaiming-uniform as nn.Linear does), optional
    biases, every product an einsum."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        assert d_out % num_heads == 0
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.W_query = nn.Parameter(torch.randn(d_in, d_out))
        self.W_key = nn.Parameter(torch.randn(d_in, d_out))
        self.W_value = nn.Parameter(torch.randn(d_in, d_out))
        for name in ("bias_q", "bias_k", "bias_v"):
            self.register_parameter(name, nn.Parameter(torch.zeros(d_out)) if qkv_bias else None)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))
        self.reset_parameters()

    def reset_parameters(self):
        for w in (self.W_query, self.W_key, self.W_value):
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        if self.bias_q is not None:
            fan_in, _ = nn.init._calculate_fan_in_and_fan_out(self.W_query)
            for bias in (self.bias_q, self.bias_k, self.bias_v):
                nn.init.uniform_(bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (torch.einsum("bnd,do->bno", x, w) for w in (self.W_query, self.W_key, self.W_value))
        if self.bias_q is not None:
            q, k, v = q + self.bias_q, k + self.bias_k, v + self.bias_v
        q, k, v = (t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (b, nh, T, hs)
        scores = torch.einsum("bhnd,bhmd->bhnm", q, k) / self.head_dim**0.5
        scores = scores.masked_fill(self.mask[:n, :n].bool(), -torch.inf)
        weights = self.dropout(torch.softmax(scores, dim=-1))
        context = torch.einsum("bhnm,bhmd->bhnd", weights, v)
        return self.out_proj(context.transpose(1, 2).reshape(b, n, self.d_out))


class MHAPyTorchScaledDotProduct(nn.Module):
    """One qkv projection and PyTorch's scaled_dot_product_attention(is_causal=True); dropout a float."""

    def __init__(self, d_in, d_out, num_heads, context_length, dropout=0.0, qkv_bias=False):
        super().__init__()
        assert d_out % num_heads == 0
        self.num_heads = num_heads
        self.context_length = context_length
        self.head_dim = d_out // num_heads
        self.d_out = d_out
        self.qkv = nn.Linear(d_in, 3 * d_out, bias=qkv_bias)
        self.proj = nn.Linear(d_out, d_out)
        self.dropout = dropout

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        context = nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.proj(context.transpose(1, 2).contiguous().view(b, n, self.d_out))


class MHAPyTorchSDPAWithoutFlash(nn.Module):
    """scaled_dot_product_attention with an explicit boolean mask (so not its flash path). As the notebook writes
    it, the mask is its triu(ones, 1) buffer, which SDPA reads as True = attend: every token attends only to the
    tokens after it, and the last to none (a zero output). ``keep_below=True`` is the causal attention meant (the
    buffer's complement)."""

    def __init__(self, d_in, d_out, num_heads, context_length, dropout=0.0, qkv_bias=False, keep_below=False):
        super().__init__()
        assert d_out % num_heads == 0
        self.num_heads = num_heads
        self.context_length = context_length
        self.head_dim = d_out // num_heads
        self.d_out = d_out
        self.qkv = nn.Linear(d_in, 3 * d_out, bias=qkv_bias)
        self.proj = nn.Linear(d_out, d_out)
        self.dropout = dropout
        self.keep_below = keep_below
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1).bool())

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        mask = self.mask[: min(n, self.context_length), : min(n, self.context_length)]
        mask = ~mask if self.keep_below else mask
        context = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=False)
        return self.proj(context.transpose(1, 2).contiguous().view(b, n, self.d_out))


class MHAPyTorchClass(nn.Module):
    """PyTorch's nn.MultiheadAttention (batch first, embed_dim d_out, bias and add_bias_kv both qkv_bias) called
    causally with the boolean mask buffer (True = hidden there), then an output projection."""

    def __init__(self, d_in, d_out, num_heads, context_length, dropout=0.0, qkv_bias=False, need_weights=True):
        super().__init__()
        self.context_length = context_length
        self.multihead_attn = nn.MultiheadAttention(
            embed_dim=d_out, num_heads=num_heads, dropout=dropout, bias=qkv_bias, add_bias_kv=qkv_bias, batch_first=True
        )
        self.need_weights = need_weights
        self.proj = nn.Linear(d_out, d_out)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1).bool())

    def forward(self, x):
        n = x.shape[1]
        mask = self.mask[: min(n, self.context_length), : min(n, self.context_length)]
        out, _ = self.multihead_attn(x, x, x, attn_mask=mask, need_weights=self.need_weights)
        return self.proj(out)
