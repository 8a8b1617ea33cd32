"""The pkg's batched KV-cache Qwen3 attention (``llms_from_scratch.kv_cache_batched``) as a reader writes it:
``start_pos`` a (b,) tensor of positions (RoPE gathered per sequence), ``cache`` a list of b per-sequence
``(keys, values)`` pairs, each (1, kv_heads, T, head_dim) or None, returned grown by ``torch.cat`` per sequence;
the model's mask (b, 1, n, T) built per sequence from its positions."""

from __future__ import annotations

import torch

from bench.book import qwen3


def apply_rope_at(x, cos, sin, offsets):
    """x (b, heads, n, head_dim) rotated for positions offsets[i] + [0, n) of each sequence i (clamped to the
    tables, as the book's gather does)."""
    b, _, n, head_dim = x.shape
    positions = (torch.arange(n, device=offsets.device)[None, :] + offsets[:, None]).clamp(max=cos.shape[0] - 1)
    cos, sin = cos[positions][:, None], sin[positions][:, None]  # (b, 1, n, head_dim)
    x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2 :]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class GroupedQueryAttention(qwen3.GroupedQueryAttention):
    def forward(self, x, mask, cos, sin, start_pos=0, cache=None):
        b, n, _ = x.shape
        queries = self.W_query(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        keys = self.W_key(x).view(b, n, self.num_kv_groups, self.head_dim).transpose(1, 2)
        values = self.W_value(x).view(b, n, self.num_kv_groups, self.head_dim).transpose(1, 2)
        if self.q_norm:
            queries = self.q_norm(queries)
        if self.k_norm:
            keys = self.k_norm(keys)
        queries, keys = apply_rope_at(queries, cos, sin, start_pos), apply_rope_at(keys, cos, sin, start_pos)
        next_cache = []
        for i in range(b):
            prev = cache[i] if cache else None
            k_i, v_i = keys[i : i + 1], values[i : i + 1]
            if prev is not None:
                k_i, v_i = torch.cat([prev[0], k_i], dim=2), torch.cat([prev[1], v_i], dim=2)
            next_cache.append((k_i, v_i))
        keys = torch.cat([k for k, _ in next_cache]).repeat_interleave(self.group_size, dim=1)
        values = torch.cat([v for _, v in next_cache]).repeat_interleave(self.group_size, dim=1)
        scores = (queries @ keys.transpose(2, 3)).masked_fill(mask, -torch.inf)
        weights = torch.softmax(scores / self.head_dim**0.5, dim=-1)
        return self.out_proj((weights @ values).transpose(1, 2).reshape(b, n, self.d_out)), next_cache


def model_mask(start_pos, n, device=None):
    """The batched model's mask: (1, 1, n, n) causal without a cache (start_pos None); with one, (b, 1, n, T) with
    row i the causal rows of positions start_pos[i] .. + n over keys 0 .. start_pos[i] + n."""
    if start_pos is None:
        return torch.triu(torch.ones(n, n, dtype=torch.bool, device=device), diagonal=1)[None, None]
    end = start_pos + n
    full = torch.triu(torch.ones(int(end.max()), int(end.max()), dtype=torch.bool, device=device), diagonal=1)
    mask = torch.zeros(len(start_pos), 1, n, int(end.max()), dtype=torch.bool, device=device)
    for i, (s, e) in enumerate(zip(start_pos.tolist(), end.tolist())):
        mask[i, 0] = full[s:e, :e]
    return mask
