"""ch04/03_kv-cache's optimized variant as a reader writes it: the cache preallocated as
``(b, heads, window_size, head_dim)`` zeros with a write pointer ``ptr_cur``; a chunk that would overflow the
window shifts the oldest entries out, so a cached call sees the last ``window_size`` keys at most. The GPT
keeps the position (``ptr_current_pos``) and prefills a long prompt in chunks of ``kv_window_size``."""

from __future__ import annotations

import torch
from torch import nn

from bench.gpt import FeedForward, LayerNorm


class MultiHeadAttention(nn.Module):
    def __init__(
        self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False, max_seq_len=None, window_size=None
    ):
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
        self.max_seq_len = max_seq_len or context_length
        self.window_size = window_size or self.max_seq_len
        self.register_buffer("cache_k", None, persistent=False)
        self.register_buffer("cache_v", None, persistent=False)

    def forward(self, x, use_cache=False):
        b, n, _ = x.shape
        if use_cache:
            assert n <= self.window_size, f"chunk of {n} tokens exceeds the window {self.window_size}"
        split = lambda t: t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (b, nh, T, hs)
        keys_new, values_new, queries = split(self.W_key(x)), split(self.W_value(x)), split(self.W_query(x))
        if use_cache:
            if self.cache_k is None or self.cache_k.size(0) != b:
                self.cache_k = torch.zeros(b, self.num_heads, self.window_size, self.head_dim, device=x.device)
                self.cache_v = torch.zeros_like(self.cache_k)
                self.ptr_cur = 0
            overflow = self.ptr_cur + n - self.window_size
            if overflow > 0:  # drop the oldest entries
                self.cache_k[:, :, :-overflow] = self.cache_k[:, :, overflow:].clone()
                self.cache_v[:, :, :-overflow] = self.cache_v[:, :, overflow:].clone()
                self.ptr_cur -= overflow
            self.cache_k[:, :, self.ptr_cur : self.ptr_cur + n] = keys_new
            self.cache_v[:, :, self.ptr_cur : self.ptr_cur + n] = values_new
            self.ptr_cur += n
            keys, values = self.cache_k[:, :, : self.ptr_cur], self.cache_v[:, :, : self.ptr_cur]
        else:
            keys, values = keys_new, values_new
            self.ptr_cur = 0
        scores = queries @ keys.transpose(2, 3)
        k_len = scores.size(-1)
        rows = torch.arange(n, device=x.device)[:, None] + (k_len - n)  # bottom-right: the newest queries
        scores.masked_fill_(torch.arange(k_len, device=x.device)[None, :] > rows, -torch.inf)
        weights = self.dropout(torch.softmax(scores / keys.shape[-1] ** 0.5, dim=-1))
        context = (weights @ values).transpose(1, 2).contiguous().view(b, n, self.d_out)
        return self.out_proj(context)

    def reset_cache(self):
        self.cache_k, self.cache_v = None, None


class TransformerBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.att = MultiHeadAttention(
            d_in=cfg["emb_dim"],
            d_out=cfg["emb_dim"],
            context_length=cfg["context_length"],
            num_heads=cfg["n_heads"],
            dropout=cfg["drop_rate"],
            qkv_bias=cfg["qkv_bias"],
            window_size=cfg.get("kv_window_size", cfg["context_length"]),
        )
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg["emb_dim"])
        self.norm2 = LayerNorm(cfg["emb_dim"])
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x, use_cache=False):
        x = x + self.drop_shortcut(self.att(self.norm1(x), use_cache=use_cache))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class GPTModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.ptr_current_pos = 0
        self.final_norm = LayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)
        self.kv_window_size = cfg.get("kv_window_size", cfg["context_length"])

    def forward(self, in_idx, use_cache=False):
        _, n = in_idx.shape
        if use_cache:
            assert self.ptr_current_pos + n <= self.pos_emb.num_embeddings, "past the position embedding"
            pos = torch.arange(self.ptr_current_pos, self.ptr_current_pos + n, device=in_idx.device)
            self.ptr_current_pos += n
        else:
            pos = torch.arange(n, device=in_idx.device)
        x = self.drop_emb(self.tok_emb(in_idx) + self.pos_emb(pos).unsqueeze(0))
        for block in self.trf_blocks:
            x = block(x, use_cache=use_cache)
        return self.out_head(self.final_norm(x))

    def reset_kv_cache(self):
        for block in self.trf_blocks:
            block.att.reset_cache()
        self.ptr_current_pos = 0


def generate_text_simple_cached(model, idx, max_new_tokens, context_size=None, use_cache=True):
    """The optimized loop: the prompt in chunks of the cache window, then one token per step, never past the
    context (the position embedding's length)."""
    model.eval()
    ctx_len = context_size or model.pos_emb.num_embeddings
    with torch.no_grad():
        if not use_cache:
            for _ in range(max_new_tokens):
                logits = model(idx[:, -ctx_len:])
                idx = torch.cat([idx, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
            return idx
        model.reset_kv_cache()
        prompt = idx[:, -ctx_len:]
        for i in range(0, prompt.size(1), model.kv_window_size):
            logits = model(prompt[:, i : i + model.kv_window_size], use_cache=True)
        for _ in range(min(max_new_tokens, ctx_len - prompt.size(1))):
            next_idx = logits[:, -1].argmax(dim=-1, keepdim=True)
            idx = torch.cat([idx, next_idx], dim=1)
            logits = model(next_idx, use_cache=True)
    return idx


__all__ = ["GPTModel", "MultiHeadAttention", "TransformerBlock", "generate_text_simple_cached"]
