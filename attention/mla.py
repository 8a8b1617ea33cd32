"""Multi-head latent attention (the book's ch04/05_mla, ``gpt_with_kv_mla.py``), fused: same constructor,
parameters, latent cache (``cache_c_kv``, grown by ``torch.cat``), ``ptr_current_pos`` and ``forward(x,
use_cache=False)`` as the book's ``MultiHeadLatentAttention``.

The latent projections stay as the book runs them: ``W_DKV`` down to the latent, ``W_UK`` and ``W_UV`` up to
keys and values for every cached latent on every call. The attention core runs through the kernel. The book's
MLA has one head_dim for queries, keys and values (no decoupled RoPE part), so nothing needs padding; a layer
edited to differ is refused by ``swap_attention``.

The book places a cached call's queries at ``ptr_current_pos`` and the keys at ``0 .. T``: query i sees keys
``j <= ptr + i``. That is the kernel's bottom-right causal rule over the first ``ptr + n`` keys, which are all
the keys unless a call without the cache reset the position and kept the latents (the book's own behaviour);
either way one kernel call, no mask."""

from __future__ import annotations

import torch
from torch import nn

from . import fused
from .reference import _check_heads, _check_projected, _check_rank, _check_width, in_features


class MultiHeadLatentAttention(nn.Module):
    def __init__(
        self,
        d_in: int,
        d_out: int,
        dropout: float,
        num_heads: int,
        qkv_bias: bool = False,
        latent_dim: int | None = None,
    ):
        super().__init__()
        _check_heads(d_out, num_heads)
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.latent_dim = latent_dim if latent_dim is not None else max(16, d_out // 8)
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_DKV = nn.Linear(d_in, self.latent_dim, bias=qkv_bias)
        self.W_UK = nn.Linear(self.latent_dim, d_out, bias=qkv_bias)
        self.W_UV = nn.Linear(self.latent_dim, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("cache_c_kv", None, persistent=False)
        self.ptr_current_pos = 0

    def reset_cache(self) -> None:
        self.cache_c_kv = None
        self.ptr_current_pos = 0

    def _heads(self, t: torch.Tensor, name: str) -> torch.Tensor:
        _check_projected(t, self.d_out, name, type(self).__name__)
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (b, heads, n, head_dim), a view

    def forward(self, x: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        _check_rank(x, 3, "(batch, num_tokens, d_in)", type(self).__name__)
        _check_width(x, in_features(self.W_query), type(self).__name__)
        b, n, _ = x.shape
        latent = self.W_DKV(x)  # (b, n, latent_dim)
        if use_cache and self.cache_c_kv is not None:
            latent = torch.cat([self.cache_c_kv, latent], dim=1)  # (b, T, latent_dim); the book's error on a new batch
        queries = self._heads(self.W_query(x), "W_query")
        keys, values = self._heads(self.W_UK(latent), "W_UK"), self._heads(self.W_UV(latent), "W_UV")
        p = fused._dropout_p(self.dropout)
        if use_cache:
            seen = self.ptr_current_pos + n  # keys past the newest query's position are hidden from every query
            if seen > keys.shape[2]:
                raise ValueError(
                    f"{type(self).__name__}: ptr_current_pos {self.ptr_current_pos} + {n} new tokens is past the "
                    f"{keys.shape[2]} cached positions"
                )
            context = fused.attend_newest(queries, keys[:, :, :seen], values[:, :, :seen], causal=True, dropout_p=p)
            self.cache_c_kv = latent
            self.ptr_current_pos = seen
        else:
            context = fused._attend(queries, keys, values, causal=True, dropout_p=p)
            self.ptr_current_pos = 0
        return self.out_proj(context.transpose(1, 2).reshape(b, n, self.d_out))  # (b, n, d_out)
