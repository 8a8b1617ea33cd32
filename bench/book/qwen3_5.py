"""Qwen3.5 as a reader writes it from the book (ch05/16_qwen3.5, both notebooks): on its ``full_attention``
layers a gated grouped-query attention (the query projection twice d_out wide, per head a query then an output
gate; sigmoid(gate) times the attention output before out_proj), a per-head (1 + weight) RMSNorm on q and k,
and a partial RoPE over the first quarter of head_dim; the KV-cache notebook caches keys before RoPE.

Its ``linear_attention`` layers run Hugging Face's Gated DeltaNet (``Qwen3_5GatedDeltaNet``), which the book
imports from a copied transformers file. Here a small causal stand-in of that name takes its place: it is not
the DeltaNet, but like it, it is not softmax attention, takes ``x`` alone, and must be left as it is by
``swap_attention`` (the book's own model was run against the fused layers outside the repository)."""

from __future__ import annotations

import torch
from torch import nn

# A tiny Qwen3.5: 0.8B's proportions (head_dim 4x emb/heads, partial rotary 1/4, three linear layers per full one).
TINY_CONFIG = {
    "vocab_size": 89,
    "context_length": 64,
    "emb_dim": 32,
    "n_heads": 4,
    "n_layers": 4,
    "hidden_dim": 48,
    "head_dim": 16,
    "qk_norm": True,
    "n_kv_groups": 2,
    "rope_base": 10_000_000.0,
    "partial_rotary_factor": 0.25,
    "rms_norm_eps": 1e-6,
    "dtype": torch.float32,
    "layer_types": ["linear_attention", "full_attention", "linear_attention", "full_attention"],
}


class RMSNorm(nn.Module):
    def __init__(self, emb_dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps) * (1.0 + self.weight.float())).to(
            x.dtype
        )


def compute_rope_params(head_dim, theta_base=10_000, context_length=4096, partial_rotary_factor=1.0):
    rot = int(head_dim * partial_rotary_factor)
    rot = max(2, rot - rot % 2)
    inv_freq = 1.0 / (theta_base ** (torch.arange(0, rot, 2).float() / rot))
    angles = torch.arange(context_length).float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=1)  # (context, rot): narrower than head_dim
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x, cos, sin, offset=0):
    n, rot = x.shape[2], cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x1, x2 = x_rot[..., : rot // 2], x_rot[..., rot // 2 :]
    cos = cos[offset : offset + n][None, None]
    sin = sin[offset : offset + n][None, None]
    turned = x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat([turned, x_pass], dim=-1).to(x.dtype)


class GroupedQueryAttention(nn.Module):
    def __init__(self, d_in, num_heads, num_kv_groups, head_dim=None, qk_norm=False, dtype=None):
        super().__init__()
        assert num_heads % num_kv_groups == 0
        self.num_heads = num_heads
        self.num_kv_groups = num_kv_groups
        self.group_size = num_heads // num_kv_groups
        if head_dim is None:
            head_dim = d_in // num_heads
        self.head_dim = head_dim
        self.d_out = num_heads * head_dim
        self.W_query = nn.Linear(d_in, self.d_out * 2, bias=False, dtype=dtype)
        self.W_key = nn.Linear(d_in, num_kv_groups * head_dim, bias=False, dtype=dtype)
        self.W_value = nn.Linear(d_in, num_kv_groups * head_dim, bias=False, dtype=dtype)
        self.out_proj = nn.Linear(self.d_out, d_in, bias=False, dtype=dtype)
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, eps=1e-6)
            self.k_norm = RMSNorm(head_dim, eps=1e-6)
        else:
            self.q_norm = self.k_norm = None

    def _heads(self, x):
        b, n, _ = x.shape
        q, gate = torch.chunk(self.W_query(x).view(b, n, self.num_heads, 2 * self.head_dim), 2, dim=-1)
        q = q.transpose(1, 2)
        k = self.W_key(x).view(b, n, self.num_kv_groups, self.head_dim).transpose(1, 2)
        v = self.W_value(x).view(b, n, self.num_kv_groups, self.head_dim).transpose(1, 2)
        if self.q_norm:
            q = self.q_norm(q)
        if self.k_norm:
            k = self.k_norm(k)
        return q, k, v, gate.reshape(b, n, self.d_out)

    def _attend(self, q, k, v, gate, mask):
        b, n = q.shape[0], q.shape[2]
        k = k.repeat_interleave(self.group_size, dim=1)
        v = v.repeat_interleave(self.group_size, dim=1)
        scores = (q @ k.transpose(2, 3)).masked_fill(mask, -torch.inf)
        weights = torch.softmax(scores * self.head_dim**-0.5, dim=-1, dtype=torch.float32).to(q.dtype)
        context = (weights @ v).transpose(1, 2).reshape(b, n, self.d_out)
        return self.out_proj(context * torch.sigmoid(gate))

    def forward(self, x, mask, cos, sin):
        q, k, v, gate = self._heads(x)
        return self._attend(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, gate, mask)


class KVGroupedQueryAttention(GroupedQueryAttention):
    """The KV-cache notebook's layer (named GroupedQueryAttention there too): the cache keeps unrotated keys."""

    def forward(self, x, mask, cos, sin, start_pos=0, cache=None):
        q, k, v, gate = self._heads(x)
        prev = 0
        if cache is not None and cache[0] is not None:
            prev = cache[0].shape[2]
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        out = self._attend(apply_rope(q, cos, sin, start_pos), apply_rope(k, cos, sin, start_pos - prev), v, gate, mask)
        return out, (k, v)


KVGroupedQueryAttention.__name__ = KVGroupedQueryAttention.__qualname__ = "GroupedQueryAttention"  # the book's name


class Qwen3_5GatedDeltaNet(nn.Module):
    """A stand-in for the DeltaNet layers (see the module docstring): a causal running mean, gated."""

    def __init__(self, cfg):
        super().__init__()
        self.in_proj = nn.Linear(cfg["emb_dim"], 2 * cfg["emb_dim"], bias=False, dtype=cfg["dtype"])
        self.out_proj = nn.Linear(cfg["emb_dim"], cfg["emb_dim"], bias=False, dtype=cfg["dtype"])

    def forward(self, x):
        h, g = self.in_proj(x).chunk(2, dim=-1)
        steps = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)[None, :, None]
        return self.out_proj(h.cumsum(dim=1) / steps * torch.sigmoid(g))


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

    def __init__(self, cfg, layer_type):
        super().__init__()
        self.layer_type = layer_type
        if layer_type == "full_attention":
            self.token_mixer = self.attention_class(
                d_in=cfg["emb_dim"],
                num_heads=cfg["n_heads"],
                head_dim=cfg["head_dim"],
                num_kv_groups=cfg["n_kv_groups"],
                qk_norm=cfg["qk_norm"],
                dtype=cfg["dtype"],
            )
        else:
            self.token_mixer = Qwen3_5GatedDeltaNet(cfg)
        self.ff = FeedForward(cfg)
        self.norm1 = RMSNorm(cfg["emb_dim"], eps=cfg["rms_norm_eps"])
        self.norm2 = RMSNorm(cfg["emb_dim"], eps=cfg["rms_norm_eps"])

    def forward(self, x, mask, cos, sin, **cached):
        next_cache = None
        if self.layer_type == "full_attention":
            mixed = self.token_mixer(self.norm1(x), mask, cos, sin, **cached)
            mixed, next_cache = mixed if cached else (mixed, None)
        else:
            mixed = self.token_mixer(self.norm1(x))  # the stand-in has no state: it reads the whole sequence
        x = x + mixed
        x = x + self.ff(self.norm2(x))
        return (x, next_cache) if cached else x


class KVTransformerBlock(TransformerBlock):
    attention_class = KVGroupedQueryAttention


class Qwen3_5(nn.Module):
    block_class = TransformerBlock

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"], dtype=cfg["dtype"])
        self.trf_blocks = nn.ModuleList([self.block_class(cfg, t) for t in cfg["layer_types"]])
        self.final_norm = RMSNorm(cfg["emb_dim"], eps=cfg["rms_norm_eps"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False, dtype=cfg["dtype"])
        cos, sin = compute_rope_params(
            cfg["head_dim"], cfg["rope_base"], cfg["context_length"], cfg["partial_rotary_factor"]
        )
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, input_ids):
        n = input_ids.shape[1]
        x = self.tok_emb(input_ids)
        mask = torch.triu(torch.ones(n, n, device=x.device, dtype=torch.bool), diagonal=1)
        for block in self.trf_blocks:
            x = block(x, mask, self.cos, self.sin)
        return self.out_head(self.final_norm(x))


class KVQwen3_5(Qwen3_5):
    """The KV-cache notebook's model, for configs of ``full_attention`` layers only (the stand-in mixer keeps no
    state between calls; the book's DeltaNet keeps a recurrent one)."""

    block_class = KVTransformerBlock

    def __init__(self, cfg):
        assert set(cfg["layer_types"]) == {"full_attention"}, "the cached stand-in model has attention layers only"
        super().__init__(cfg)
        self.current_pos = 0

    def reset_kv_cache(self):
        self.current_pos = 0

    def forward(self, input_ids, cache=None):
        n = input_ids.shape[1]
        x = self.tok_emb(input_ids)
        start = self.current_pos if cache is not None else 0
        if cache is not None:
            self.current_pos += n
        end = start + n
        mask = torch.triu(torch.ones(end, end, device=x.device, dtype=torch.bool), diagonal=1)[start:end][None, None]
        for i, block in enumerate(self.trf_blocks):
            x, next_cache = block(x, mask, self.cos, self.sin, start_pos=start, cache=cache[i] if cache else None)
            if cache is not None:
                cache[i] = next_cache
        return self.out_head(self.final_norm(x))
