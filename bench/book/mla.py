"""ch04/05_mla as a reader writes it (``gpt_with_kv_mla.py``): chapter 4's KV-cache GPT whose attention is
multi-head latent attention. Keys and values come from one small latent per token (``W_DKV`` down, ``W_UK`` and
``W_UV`` up, one head_dim for queries, keys and values); the cache holds the latents, grown by ``torch.cat``, and
a cached call up-projects all of them again. The causal mask puts the cached queries at ``ptr_current_pos`` and
the keys at ``0 .. T``; a call without the cache resets the position and keeps the latents, as the book's does."""

from __future__ import annotations

import torch
from torch import nn

from bench.book import kv_cache


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, d_in, d_out, dropout, num_heads, qkv_bias=False, latent_dim=None):
        super().__init__()
        assert d_out % num_heads == 0
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

    def reset_cache(self):
        self.cache_c_kv = None
        self.ptr_current_pos = 0

    def _heads(self, t):
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (b, heads, n, head_dim)

    def forward(self, x, use_cache=False):
        b, n, _ = x.shape
        latent = self.W_DKV(x)  # (b, n, latent_dim)
        if use_cache:
            latent = latent if self.cache_c_kv is None else torch.cat([self.cache_c_kv, latent], dim=1)
            self.cache_c_kv = latent
        q, k, v = self._heads(self.W_query(x)), self._heads(self.W_UK(latent)), self._heads(self.W_UV(latent))
        start = self.ptr_current_pos if use_cache else 0
        self.ptr_current_pos = start + n if use_cache else 0
        q_pos = torch.arange(start, start + n, device=x.device)
        hidden = q_pos[:, None] < torch.arange(k.shape[2], device=x.device)[None, :]
        scores = (q @ k.transpose(-2, -1)).masked_fill(hidden, -torch.inf)
        weights = self.dropout(torch.softmax(scores / k.shape[-1] ** 0.5, dim=-1))
        return self.out_proj((weights @ v).transpose(1, 2).reshape(b, n, self.d_out))


class TransformerBlock(kv_cache.TransformerBlock):
    def __init__(self, cfg):
        nn.Module.__init__(self)
        self.att = MultiHeadLatentAttention(
            d_in=cfg["emb_dim"],
            d_out=cfg["emb_dim"],
            num_heads=cfg["n_heads"],
            dropout=cfg["drop_rate"],
            qkv_bias=cfg["qkv_bias"],
            latent_dim=cfg["latent_dim"],
        )
        self.ff = kv_cache.FeedForward(cfg)
        self.norm1 = kv_cache.LayerNorm(cfg["emb_dim"])
        self.norm2 = kv_cache.LayerNorm(cfg["emb_dim"])
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])


class GPTModel(kv_cache.GPTModel):
    def __init__(self, cfg):
        super().__init__({**cfg, "n_layers": 0})
        self.trf_blocks = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
