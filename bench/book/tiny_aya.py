"""Tiny Aya as a reader writes it from the book (ch05/15_tiny-aya, both notebooks): grouped-query attention with
interleaved RoPE on its sliding-window layers and none on its full-attention layers, a bias-less LayerNorm,
a parallel residual block (attention and feed-forward read the same normed input), tied embeddings, and a
logit scale. ``TinyAya`` is the plain notebook's model; ``KVTinyAya`` the KV-cache notebook's, whose layer
takes ``(start_pos, cache)`` and returns ``(context, next_cache)`` with the cache held by the caller."""

from __future__ import annotations

import torch
from torch import nn

# A tiny Tiny Aya: the 3.35B model's proportions (16 heads of 128 over 4 KV heads, 3 sliding layers then a full
# one) at a size the CPU tests run.
TINY_CONFIG = {
    "vocab_size": 97,
    "context_length": 64,
    "emb_dim": 32,
    "n_heads": 4,
    "n_layers": 4,
    "hidden_dim": 48,
    "head_dim": 16,
    "n_kv_heads": 2,
    "attention_bias": False,
    "sliding_window": 5,
    "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
    "rope_base": 50_000.0,
    "layer_norm_eps": 1e-5,
    "logit_scale": 0.625,
    "tie_word_embeddings": True,
    "dtype": torch.float32,
}


class CohereLayerNorm(nn.Module):
    def __init__(self, emb_dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(emb_dim))

    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        centred = x - x.mean(dim=-1, keepdim=True)
        var = centred.pow(2).mean(dim=-1, keepdim=True)
        return (self.weight.to(torch.float32) * (centred * torch.rsqrt(var + self.eps))).to(dtype)


def compute_rope_params(head_dim, theta_base=10_000, context_length=4096, dtype=torch.float32):
    inv_freq = 1.0 / (theta_base ** (torch.arange(0, head_dim, 2, dtype=dtype)[: head_dim // 2].float() / head_dim))
    angles = torch.arange(context_length, dtype=dtype)[:, None] * inv_freq[None, :]  # (context, head_dim / 2)
    angles = torch.repeat_interleave(angles, 2, dim=1)  # (context, head_dim): a0 a0 a1 a1 ... (interleaved)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x, cos, sin, offset=0):
    # Interleaved: the pair (x[2i], x[2i+1]) turns by angle i.
    n = x.shape[2]
    cos = cos[offset : offset + n][None, None]
    sin = sin[offset : offset + n][None, None]
    turned = torch.stack((-x[..., 1::2].float(), x[..., ::2].float()), dim=-1).flatten(-2)
    return (x.float() * cos + turned * sin).to(x.dtype)


class GroupedQueryAttention(nn.Module):
    def __init__(
        self,
        d_in,
        num_heads,
        num_kv_groups,
        head_dim=None,
        qk_norm=False,
        attention_bias=False,
        dtype=None,
        attn_type="full_attention",
    ):
        super().__init__()
        assert num_heads % num_kv_groups == 0
        self.num_heads = num_heads
        self.num_kv_groups = num_kv_groups
        self.group_size = num_heads // num_kv_groups
        if head_dim is None:
            head_dim = d_in // num_heads
        self.head_dim = head_dim
        self.d_out = num_heads * head_dim
        self.attn_type = attn_type
        self.W_query = nn.Linear(d_in, self.d_out, bias=attention_bias, dtype=dtype)
        self.W_key = nn.Linear(d_in, num_kv_groups * head_dim, bias=attention_bias, dtype=dtype)
        self.W_value = nn.Linear(d_in, num_kv_groups * head_dim, bias=attention_bias, dtype=dtype)
        self.out_proj = nn.Linear(self.d_out, d_in, bias=attention_bias, dtype=dtype)
        if qk_norm:
            self.q_norm = CohereLayerNorm(head_dim, eps=1e-6)
            self.k_norm = CohereLayerNorm(head_dim, eps=1e-6)
        else:
            self.q_norm = self.k_norm = None

    def _heads(self, x):
        b, n, _ = x.shape
        q = self.W_query(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.W_key(x).view(b, n, self.num_kv_groups, self.head_dim).transpose(1, 2)
        v = self.W_value(x).view(b, n, self.num_kv_groups, self.head_dim).transpose(1, 2)
        if self.q_norm:
            q = self.q_norm(q)
        if self.k_norm:
            k = self.k_norm(k)
        return q, k, v

    def _attend(self, q, k, v, mask):
        b, n = q.shape[0], q.shape[2]
        k = k.repeat_interleave(self.group_size, dim=1)
        v = v.repeat_interleave(self.group_size, dim=1)
        scores = (q @ k.transpose(2, 3)).masked_fill(mask, -torch.inf)
        weights = torch.softmax(scores / self.head_dim**0.5, dim=-1, dtype=torch.float32).to(q.dtype)
        return self.out_proj((weights @ v).transpose(1, 2).reshape(b, n, self.d_out))

    def forward(self, x, mask, cos, sin):
        q, k, v = self._heads(x)
        if self.attn_type == "sliding_attention":  # full-attention layers: no RoPE at all
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self._attend(q, k, v, mask)


class KVGroupedQueryAttention(GroupedQueryAttention):
    """The KV-cache notebook's layer (the book's class is also named GroupedQueryAttention; see below)."""

    def forward(self, x, mask, cos, sin, start_pos=0, cache=None):
        q, k, v = self._heads(x)
        if self.attn_type == "sliding_attention":
            q, k = apply_rope(q, cos, sin, start_pos), apply_rope(k, cos, sin, start_pos)
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        return self._attend(q, k, v, mask), (k, v)


KVGroupedQueryAttention.__name__ = KVGroupedQueryAttention.__qualname__ = "GroupedQueryAttention"  # the book's name


class FeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg["emb_dim"], cfg["hidden_dim"], dtype=cfg["dtype"], bias=False)
        self.fc2 = nn.Linear(cfg["emb_dim"], cfg["hidden_dim"], dtype=cfg["dtype"], bias=False)
        self.fc3 = nn.Linear(cfg["hidden_dim"], cfg["emb_dim"], dtype=cfg["dtype"], bias=False)

    def forward(self, x):
        return self.fc3(nn.functional.silu(self.fc1(x)) * self.fc2(x))


class TransformerBlock(nn.Module):
    attention_class = GroupedQueryAttention

    def __init__(self, cfg, attn_type):
        super().__init__()
        self.attn_type = attn_type
        self.att = self.attention_class(
            d_in=cfg["emb_dim"],
            num_heads=cfg["n_heads"],
            num_kv_groups=cfg["n_kv_heads"],
            head_dim=cfg["head_dim"],
            qk_norm=False,
            attention_bias=cfg["attention_bias"],
            dtype=cfg["dtype"],
            attn_type=attn_type,
        )
        self.ff = FeedForward(cfg)
        self.input_layernorm = CohereLayerNorm(cfg["emb_dim"], eps=cfg["layer_norm_eps"])

    def forward(self, x, mask_global, mask_local, cos, sin, **cached):
        mask = mask_local if self.attn_type == "sliding_attention" else mask_global
        normed = self.input_layernorm(x)
        attn = self.att(normed, mask, cos, sin, **cached)
        attn, next_cache = attn if cached else (attn, None)
        out = x + attn + self.ff(normed)  # parallel residual: both branches read the same normed input
        return (out, next_cache) if cached else out


class KVTransformerBlock(TransformerBlock):
    attention_class = KVGroupedQueryAttention


class TinyAya(nn.Module):
    block_class = TransformerBlock

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"], dtype=cfg["dtype"])
        self.trf_blocks = nn.ModuleList([self.block_class(cfg, t) for t in cfg["layer_types"]])
        self.final_norm = CohereLayerNorm(cfg["emb_dim"], eps=cfg["layer_norm_eps"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False, dtype=cfg["dtype"])
        self.logit_scale = cfg["logit_scale"]
        cos, sin = compute_rope_params(cfg["head_dim"], cfg["rope_base"], cfg["context_length"])
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        if cfg["tie_word_embeddings"]:
            self.out_head.weight = self.tok_emb.weight
        self.current_pos = 0

    def create_masks(self, n, device, start=0):
        """(global, local), (1, 1, n, start + n), True where hidden: the future, and also keys W or more back."""
        q_pos = torch.arange(start, start + n, device=device)[:, None]
        k_pos = torch.arange(start + n, device=device)[None, :]
        future = k_pos > q_pos
        far = k_pos + self.cfg["sliding_window"] <= q_pos
        return future[None, None], (future | far)[None, None]

    def _head(self, x):
        return self.out_head(self.final_norm(x)) * self.logit_scale

    def forward(self, input_ids):
        x = self.tok_emb(input_ids)
        n = input_ids.shape[1]
        mask_global, mask_local = self.create_masks(n, x.device)
        cos, sin = self.cos[:n].to(x.dtype), self.sin[:n].to(x.dtype)
        for block in self.trf_blocks:
            x = block(x, mask_global, mask_local, cos, sin)
        return self._head(x)


class KVTinyAya(TinyAya):
    block_class = KVTransformerBlock

    def reset_kv_cache(self):
        self.current_pos = 0

    def forward(self, input_ids, cache=None):
        x = self.tok_emb(input_ids)
        n = input_ids.shape[1]
        start = self.current_pos if cache is not None else 0
        if cache is not None:
            self.current_pos += n
        mask_global, mask_local = self.create_masks(n, x.device, start)
        cos, sin = self.cos.to(x.dtype), self.sin.to(x.dtype)
        for i, block in enumerate(self.trf_blocks):
            x, next_cache = block(
                x, mask_global, mask_local, cos, sin, start_pos=start, cache=cache[i] if cache else None
            )
            if cache is not None:
                cache[i] = next_cache
        return self._head(x)
