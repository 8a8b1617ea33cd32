"""Gemma 4 as a reader writes it from the book (ch05/17_gemma4, both notebooks): ``Gemma4Attention(cfg, layer_idx)``
with QK-norm, a weightless norm on the values, no softmax scale, a wider head on full-attention layers and KV
sharing in the last layers; the dense block's four norms and layer scalar; the model's 2-D global and local
masks, two RoPE tables (local, and global "proportional": the tail of each head not rotated), the final logit
soft-cap. The per-layer input embeddings of E2B/E4B are left out (the book's model skips them when
``hidden_size_per_layer_input`` is 0): they never reach attention. ``Gemma4`` is the plain notebook's model
(with ``reuse_shared_kv``), ``KVGemma4`` the KV-cache notebook's."""

from __future__ import annotations

import torch
from torch import nn

# A tiny Gemma 4: E2B's proportions (4 sliding layers then a full one, a full head twice as wide, one KV head,
# the last layers sharing KV) at a CPU test's size.
TINY_CONFIG = {
    "vocab_size": 103,
    "emb_dim": 32,
    "hidden_dim": 64,
    "n_layers": 7,
    "n_heads": 4,
    "head_dim": 16,
    "n_kv_heads": 1,
    "global_head_dim": 32,
    "context_length": 64,
    "sliding_window": 5,
    "layer_types": (["sliding_attention"] * 2 + ["full_attention"]) * 2 + ["sliding_attention"],
    "num_kv_shared_layers": 3,
    "rope_local_base": 10_000.0,
    "rope_global_base": 1_000_000.0,
    "rope_global_partial_rotary_factor": 0.25,
    "layer_norm_eps": 1e-6,
    "final_logit_softcap": 30.0,
    "dtype": torch.float32,
}


def compute_rope_params(head_dim, theta_base, context_length, partial_rotary_factor=None):
    """Default tables, or Gemma 4's "proportional" ones (``partial_rotary_factor`` set): frequencies of the first
    factor * head_dim / 2 pairs as for the full head, the rest zero (cos 1, sin 0: not rotated)."""
    inv_freq = 1.0 / (theta_base ** (torch.arange(0, head_dim, 2).float() / head_dim))
    if partial_rotary_factor is not None:
        rotated = int(partial_rotary_factor * head_dim // 2)
        inv_freq = torch.cat([inv_freq[:rotated], torch.zeros(head_dim // 2 - rotated)])
    angles = torch.arange(context_length).float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=1)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x, cos, sin, offset=0):
    n, hd = x.shape[2], x.shape[3]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    cos = cos[offset : offset + n][None, None]
    sin = sin[offset : offset + n][None, None]
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class Gemma4RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6, with_scale=True):
        super().__init__()
        self.eps = eps
        self.with_scale = with_scale
        if with_scale:
            self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        out = xf * torch.pow(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps, -0.5)
        if self.with_scale:
            out = out * self.weight.float()
        return out.to(x.dtype)


class Gemma4Attention(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.layer_type = cfg["layer_types"][layer_idx]
        self.is_sliding = self.layer_type == "sliding_attention"
        self.head_dim = cfg["head_dim"] if self.is_sliding else cfg["global_head_dim"]
        self.num_heads = cfg["n_heads"]
        self.num_kv_heads = cfg["n_kv_heads"]
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        d, hd = cfg["emb_dim"], self.head_dim
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=False, dtype=cfg["dtype"])
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=False, dtype=cfg["dtype"])
        self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=False, dtype=cfg["dtype"])
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=False, dtype=cfg["dtype"])
        self.q_norm = Gemma4RMSNorm(hd, eps=cfg["layer_norm_eps"])
        self.k_norm = Gemma4RMSNorm(hd, eps=cfg["layer_norm_eps"])
        self.v_norm = Gemma4RMSNorm(hd, eps=cfg["layer_norm_eps"], with_scale=False)
        first_shared = cfg["n_layers"] - cfg["num_kv_shared_layers"]
        self.is_kv_shared_layer = layer_idx >= first_shared > 0
        before = cfg["layer_types"][:first_shared]
        last_of_type = len(before) - 1 - before[::-1].index(self.layer_type) if self.layer_type in before else None
        self.kv_shared_layer_index = last_of_type if self.is_kv_shared_layer else None
        self.store_full_length_kv = (not self.is_kv_shared_layer) and first_shared > 0 and layer_idx == last_of_type

    def _q(self, x, cos, sin, offset=0):
        b, n, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2))
        return apply_rope(q, cos, sin, offset)

    def _kv(self, x, cos, sin, offset=0):
        b, n, _ = x.shape
        k = self.k_norm(self.k_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2))
        v = self.v_norm(self.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2))
        return apply_rope(k, cos, sin, offset), v

    def _attend(self, q, k, v, mask):
        b, n = q.shape[0], q.shape[2]
        k = k.repeat_interleave(self.num_key_value_groups, dim=1)
        v = v.repeat_interleave(self.num_key_value_groups, dim=1)
        scores = (q @ k.transpose(-1, -2)).masked_fill(mask[None, None], torch.finfo(q.dtype).min)
        weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)  # no scale: the QK-norms set the size
        return self.o_proj((weights @ v).transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))

    def forward(self, x, mask, cos, sin, shared_kv=None, return_kv=False):
        q = self._q(x, cos, sin)
        computed = None
        if shared_kv is None:
            k, v = computed = self._kv(x, cos, sin)
        else:
            k, v = shared_kv
        out = self._attend(q, k, v, mask)
        return out, (computed if return_kv else None)


class KVGemma4Attention(Gemma4Attention):
    """The KV-cache notebook's class (named Gemma4Attention there too): rotated keys cached, grown by torch.cat."""

    def __init__(self, cfg, layer_idx):
        super().__init__(cfg, layer_idx)
        del self.store_full_length_kv

    def forward(self, x, mask, cos, sin, start_pos=0, cache=None, shared_kv=None):
        q = self._q(x, cos, sin, start_pos)
        next_cache = None
        if shared_kv is None:
            k, v = self._kv(x, cos, sin, start_pos)
            if cache is not None and cache[0] is not None:
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            next_cache = (k, v)
        else:
            k, v = shared_kv
        return self._attend(q, k, v, mask), next_cache


KVGemma4Attention.__name__ = KVGemma4Attention.__qualname__ = "Gemma4Attention"  # the book's name


class FeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg["emb_dim"], cfg["hidden_dim"], bias=False, dtype=cfg["dtype"])
        self.up_proj = nn.Linear(cfg["emb_dim"], cfg["hidden_dim"], bias=False, dtype=cfg["dtype"])
        self.down_proj = nn.Linear(cfg["hidden_dim"], cfg["emb_dim"], bias=False, dtype=cfg["dtype"])

    def forward(self, x):
        return self.down_proj(nn.functional.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Block(nn.Module):
    attention_class = Gemma4Attention

    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.layer_type = cfg["layer_types"][layer_idx]
        self.sliding_window = cfg["sliding_window"]
        self.att = self.attention_class(cfg, layer_idx)
        self.mlp = FeedForward(cfg)
        eps = cfg["layer_norm_eps"]
        self.input_layernorm = Gemma4RMSNorm(cfg["emb_dim"], eps=eps)
        self.post_attention_layernorm = Gemma4RMSNorm(cfg["emb_dim"], eps=eps)
        self.pre_feedforward_layernorm = Gemma4RMSNorm(cfg["emb_dim"], eps=eps)
        self.post_feedforward_layernorm = Gemma4RMSNorm(cfg["emb_dim"], eps=eps)
        self.register_buffer("layer_scalar", torch.ones(1), persistent=True)

    def forward(self, x, masks, tables, **kw):
        local = self.layer_type == "sliding_attention"
        mask = masks[0] if local else masks[1]
        cos, sin = tables[0] if local else tables[1]
        if "start_pos" in kw:  # the KV-cache notebook: the mask's columns are the keys attended
            shared, cache = kw["shared_kv"], kw["cache"]
            if shared is not None:
                keys = shared[0].shape[2]
            elif cache is not None and cache[0] is not None:
                keys = cache[0].shape[2] + x.shape[1]
            else:
                keys = x.shape[1]
            mask = mask[..., -keys:]
        attn, kv = self.att(self.input_layernorm(x), mask, cos, sin, **kw)
        if "start_pos" in kw and kv is not None and local and kv[0].shape[2] > self.sliding_window:
            kv = (kv[0][:, :, -self.sliding_window :], kv[1][:, :, -self.sliding_window :])
        x = x + self.post_attention_layernorm(attn)
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x * self.layer_scalar.to(x.dtype), kv


class KVBlock(Block):
    attention_class = KVGemma4Attention


class Gemma4(nn.Module):
    block_class = Block

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"], dtype=cfg["dtype"])
        self.blocks = nn.ModuleList([self.block_class(cfg, i) for i in range(cfg["n_layers"])])
        self.final_norm = Gemma4RMSNorm(cfg["emb_dim"], eps=cfg["layer_norm_eps"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False, dtype=cfg["dtype"])
        local = compute_rope_params(cfg["head_dim"], cfg["rope_local_base"], cfg["context_length"])
        glob = compute_rope_params(
            cfg["global_head_dim"],
            cfg["rope_global_base"],
            cfg["context_length"],
            cfg["rope_global_partial_rotary_factor"],
        )
        for name, t in zip(("cos_local", "sin_local", "cos_global", "sin_global"), local + glob):
            self.register_buffer(name, t, persistent=False)
        self.current_pos = 0

    def masks(self, start, end, device):
        """(local, global) rows start..end over keys 0..end, 2-D, True where hidden."""
        ones = torch.ones(end, end, dtype=torch.bool, device=device)
        future = torch.triu(ones, diagonal=1)
        far = torch.triu(ones, diagonal=self.cfg["sliding_window"]).T
        return (future | far)[start:end], future[start:end]

    def _tables(self):
        return (self.cos_local, self.sin_local), (self.cos_global, self.sin_global)

    def _logits(self, x):
        cap = self.cfg["final_logit_softcap"]
        return torch.tanh(self.out_head(self.final_norm(x)) / cap) * cap

    def forward(self, input_ids, reuse_shared_kv=False):
        x = self.tok_emb(input_ids) * self.cfg["emb_dim"] ** 0.5
        masks = self.masks(0, input_ids.shape[1], x.device)
        stored = {}
        for i, block in enumerate(self.blocks):
            shared = stored.get(block.att.kv_shared_layer_index) if reuse_shared_kv else None
            store = reuse_shared_kv and block.att.store_full_length_kv and shared is None
            x, kv = block(x, masks, self._tables(), shared_kv=shared, return_kv=store)
            if store and kv is not None:
                stored[i] = kv
        return self._logits(x)


class KVGemma4(Gemma4):
    block_class = KVBlock

    def reset_kv_cache(self):
        self.current_pos = 0

    def forward(self, input_ids, cache=None):
        n = input_ids.shape[1]
        x = self.tok_emb(input_ids) * self.cfg["emb_dim"] ** 0.5
        start = self.current_pos if cache is not None else 0
        if cache is not None:
            self.current_pos += n
        masks = self.masks(start, start + n, x.device)
        for i, block in enumerate(self.blocks):
            shared = None
            if cache is not None and block.att.is_kv_shared_layer:
                shared = cache[block.att.kv_shared_layer_index]
            x, kv = block(
                x, masks, self._tables(), start_pos=start, cache=cache[i] if cache else None, shared_kv=shared
            )
            if cache is not None and kv is not None:
                cache[i] = kv
        return self._logits(x)
