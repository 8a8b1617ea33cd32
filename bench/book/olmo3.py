"""OLMo 3 as a reader writes it from the book (ch05/13_olmo3, both notebooks): grouped-query attention whose
QK-norm is one RMSNorm over the whole projected width (not per head), queries scaled before the product,
sliding windows on three layers in four, norms after attention and feed-forward (not before). ``Olmo3`` is the
plain notebook's model; ``KVOlmo3`` the KV-cache notebook's: its cache holds keys before RoPE, and a
sliding layer's block trims its cache to the window and slices the local mask to the keys it keeps.

The RoPE tables here are the default rotation times an attention factor (as YaRN scales them); the book's
YaRN frequency blend only changes the tables' values, which the layers take as given."""

from __future__ import annotations

import torch
from torch import nn

from bench.book.rope import apply_rope

# A tiny OLMo 3: 7B's proportions (three sliding layers then a full one; MHA at 7B, GQA here to test groups).
TINY_CONFIG = {
    "vocab_size": 101,
    "context_length": 64,
    "emb_dim": 32,
    "n_heads": 4,
    "n_layers": 4,
    "hidden_dim": 48,
    "head_dim": 8,
    "n_kv_heads": 2,
    "attention_bias": False,
    "sliding_window": 4,
    "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
    "rope_base": 500_000.0,
    "rope_attention_factor": 1.2079441541679836,
    "rms_norm_eps": 1e-6,
    "dtype": torch.float32,
}


def compute_rope_params(head_dim, theta_base, context_length, attention_factor=1.0):
    inv_freq = 1.0 / (theta_base ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.arange(context_length).float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=1)  # (context, head_dim), split halves
    return torch.cos(angles) * attention_factor, torch.sin(angles) * attention_factor


class RMSNorm(nn.Module):
    def __init__(self, emb_dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(emb_dim))

    def forward(self, x):
        xf = x.float()
        return (self.weight * (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps))).to(x.dtype)


class GroupedQueryAttention(nn.Module):
    def __init__(
        self,
        d_in,
        num_heads,
        num_kv_groups,
        head_dim,
        attention_bias=False,
        dtype=None,
        sliding_window=None,
        attn_type="full_attention",
    ):
        super().__init__()
        assert num_heads % num_kv_groups == 0
        self.num_heads = num_heads
        self.num_kv_groups = num_kv_groups
        self.group_size = num_heads // num_kv_groups
        self.head_dim = head_dim
        self.d_out = num_heads * head_dim
        self.attn_type = attn_type
        self.sliding_window = sliding_window if attn_type == "sliding_attention" else None
        self.W_query = nn.Linear(d_in, self.d_out, bias=attention_bias, dtype=dtype)
        self.W_key = nn.Linear(d_in, num_kv_groups * head_dim, bias=attention_bias, dtype=dtype)
        self.W_value = nn.Linear(d_in, num_kv_groups * head_dim, bias=attention_bias, dtype=dtype)
        self.out_proj = nn.Linear(self.d_out, d_in, bias=attention_bias, dtype=dtype)
        self.q_norm = RMSNorm(self.d_out)  # over all heads at once
        self.k_norm = RMSNorm(num_kv_groups * head_dim)

    def _heads(self, x):
        b, n, _ = x.shape
        q = self.q_norm(self.W_query(x)).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_norm(self.W_key(x)).view(b, n, self.num_kv_groups, self.head_dim).transpose(1, 2)
        v = self.W_value(x).view(b, n, self.num_kv_groups, self.head_dim).transpose(1, 2)
        return q, k, v

    def _attend(self, q, k, v, mask):
        b, n = q.shape[0], q.shape[2]
        k = k.repeat_interleave(self.group_size, dim=1)
        v = v.repeat_interleave(self.group_size, dim=1)
        scores = (q * self.head_dim**-0.5) @ k.transpose(2, 3)
        if mask is not None:
            scores = scores.masked_fill(mask, -torch.inf)
        weights = torch.softmax(scores, dim=-1)
        return self.out_proj((weights @ v).transpose(1, 2).reshape(b, n, self.d_out))

    def forward(self, x, mask, cos, sin):
        q, k, v = self._heads(x)
        return self._attend(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, mask)


class KVGroupedQueryAttention(GroupedQueryAttention):
    """The KV-cache notebook's layer (named GroupedQueryAttention there too): the cache keeps unrotated keys."""

    def forward(self, x, mask, cos, sin, start_pos=0, cache=None):
        q, k_new, v_new = self._heads(x)
        prev = 0
        k, v = k_new, v_new
        if cache is not None and cache[0] is not None:
            prev = cache[0].shape[2]
            k, v = torch.cat([cache[0], k_new], dim=2), torch.cat([cache[1], v_new], dim=2)
        out = self._attend(apply_rope(q, cos, sin, start_pos), apply_rope(k, cos, sin, start_pos - prev), v, mask)
        return out, (k, v)


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
        self.sliding_window = cfg["sliding_window"]
        self.att = self.attention_class(
            d_in=cfg["emb_dim"],
            num_heads=cfg["n_heads"],
            num_kv_groups=cfg["n_kv_heads"],
            head_dim=cfg["head_dim"],
            attention_bias=cfg["attention_bias"],
            dtype=cfg["dtype"],
            sliding_window=cfg["sliding_window"],
            attn_type=attn_type,
        )
        self.ff = FeedForward(cfg)
        self.post_attention_layernorm = RMSNorm(cfg["emb_dim"], eps=cfg["rms_norm_eps"])
        self.post_feedforward_layernorm = RMSNorm(cfg["emb_dim"], eps=cfg["rms_norm_eps"])

    def _rest(self, x, attn):
        x = x + self.post_attention_layernorm(attn)
        return x + self.post_feedforward_layernorm(self.ff(x))

    def forward(self, x, mask_global, mask_local, cos, sin):
        mask = mask_local if self.attn_type == "sliding_attention" else mask_global
        return self._rest(x, self.att(x, mask, cos, sin))


class KVTransformerBlock(TransformerBlock):
    attention_class = KVGroupedQueryAttention

    def forward(self, x, mask_global, mask_local, cos, sin, start_pos=0, cache=None):
        mask = mask_global
        if self.attn_type == "sliding_attention":
            prev = cache[0].shape[2] if isinstance(cache, tuple) and cache[0] is not None else 0
            mask = mask_local[..., -(prev + x.shape[1]) :]  # the columns of the keys the trimmed cache holds
        attn, (k, v) = self.att(x, mask, cos, sin, start_pos=start_pos, cache=cache)
        if self.attn_type == "sliding_attention" and k.shape[2] > self.sliding_window:
            k, v = k[:, :, -self.sliding_window :], v[:, :, -self.sliding_window :]
        return self._rest(x, attn), (k, v)


class Olmo3(nn.Module):
    block_class = TransformerBlock

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"], dtype=cfg["dtype"])
        self.blocks = nn.ModuleList([self.block_class(cfg, t) for t in cfg["layer_types"]])
        self.final_norm = RMSNorm(cfg["emb_dim"], eps=cfg["rms_norm_eps"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False, dtype=cfg["dtype"])
        cos, sin = compute_rope_params(
            cfg["head_dim"], cfg["rope_base"], cfg["context_length"], cfg["rope_attention_factor"]
        )
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.current_pos = 0

    def create_masks(self, start, end, device):
        """(global, local) rows start..end over keys 0..end, (1, 1, end - start, end), True where hidden: the
        future, and also keys sliding_window or more back."""
        ones = torch.ones(end, end, dtype=torch.bool, device=device)
        future = torch.triu(ones, diagonal=1)
        far = torch.triu(ones, diagonal=self.cfg["sliding_window"]).T
        return future[start:end][None, None], (future | far)[start:end][None, None]

    def forward(self, input_ids):
        n = input_ids.shape[1]
        x = self.tok_emb(input_ids)
        mask_global, mask_local = self.create_masks(0, n, x.device)
        for block in self.blocks:
            x = block(x, mask_global, mask_local, self.cos[:n], self.sin[:n])
        return self.out_head(self.final_norm(x))


class KVOlmo3(Olmo3):
    block_class = KVTransformerBlock

    def reset_kv_cache(self):
        self.current_pos = 0

    def forward(self, input_ids, cache=None):
        n = input_ids.shape[1]
        x = self.tok_emb(input_ids)
        start = self.current_pos if cache is not None else 0
        if cache is not None:
            self.current_pos += n
        mask_global, mask_local = self.create_masks(start, start + n, x.device)
        for i, block in enumerate(self.blocks):
            x, next_cache = block(
                x, mask_global, mask_local, self.cos, self.sin, start_pos=start, cache=cache[i] if cache else None
            )
            if cache is not None:
                cache[i] = next_cache
        return self.out_head(self.final_norm(x))
