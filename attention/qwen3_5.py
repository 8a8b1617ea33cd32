"""Qwen3.5's gated attention (the book's ch05/16_qwen3.5, its ``full_attention`` layers), fused: same
constructor, parameters, ``forward(x, mask, cos, sin)``, and the KV-cache notebook's ``forward(x, mask, cos,
sin, start_pos, cache)``.

Its query projection is twice ``d_out`` wide: per head, the first ``head_dim`` features are the query and the
next ``head_dim`` an output gate. The attention output is multiplied by ``sigmoid(gate)`` before ``out_proj``.
Queries and keys take a per-head RMSNorm with (1 + weight) scaling, then a partial RoPE (the tables cover the
first quarter of head_dim at 0.8B; the rest passes through). The KV-cache notebook caches keys before RoPE.

Its other layers (three in four), the Gated DeltaNet, are linear attention, not softmax attention: there is
nothing of this kernel's to run there, and ``swap_attention`` leaves them as the book's and says so."""

from __future__ import annotations

import torch
from torch import nn

from .kv_cache_pkg import _check_call, grow_unrotated
from .reference import _check_projected, _check_rank, init_head_layout
from .rope import apply_rope, attend_cached, attend_with_mask


class RMSNorm(nn.Module):
    """Qwen3.5's RMSNorm: zero-initialised ``weight`` applied as (1 + weight), in float32."""

    def __init__(self, emb_dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps) * (1.0 + self.weight.float())
        return out.to(x.dtype)


class GroupedQueryAttention(nn.Module):
    _label = "qwen3_5.GroupedQueryAttention"

    def __init__(
        self,
        d_in: int,
        num_heads: int,
        num_kv_groups: int,
        head_dim: int | None = None,
        qk_norm: bool = False,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        head_dim = init_head_layout(self, d_in, num_heads, num_kv_groups, head_dim)
        self.W_query = nn.Linear(d_in, self.d_out * 2, bias=False, dtype=dtype)  # queries and their gates
        self.W_key = nn.Linear(d_in, num_kv_groups * head_dim, bias=False, dtype=dtype)
        self.W_value = nn.Linear(d_in, num_kv_groups * head_dim, bias=False, dtype=dtype)
        self.out_proj = nn.Linear(self.d_out, d_in, bias=False, dtype=dtype)
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, eps=1e-6)
            self.k_norm = RMSNorm(head_dim, eps=1e-6)
        else:
            self.q_norm = self.k_norm = None

    def _qkv_gate(self, x: torch.Tensor):
        """Queries (b, heads, n, head_dim), keys and values (b, kv_heads, n, head_dim), QK-normed and not rotated,
        and the gate (b, n, d_out)."""
        _check_rank(x, 3, "(batch, num_tokens, d_in)", type(self).__name__)
        b, n = x.shape[0], x.shape[1]
        layer, kv_width = type(self).__name__, self.num_kv_groups * self.head_dim
        both = self.W_query(x)  # (b, n, heads * 2 * head_dim)
        _check_projected(both, 2 * self.d_out, "W_query (queries and gates)", layer)
        queries, gate = both.view(b, n, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)  # each (b, n, h, hd)
        keys, values = self.W_key(x), self.W_value(x)
        _check_projected(keys, kv_width, "W_key", layer)
        _check_projected(values, kv_width, "W_value", layer)
        queries = queries.transpose(1, 2)  # (b, heads, n, head_dim)
        keys = keys.view(b, n, self.num_kv_groups, self.head_dim).transpose(1, 2)  # (b, kv_heads, n, head_dim)
        values = values.view(b, n, self.num_kv_groups, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            queries = self.q_norm(queries)
        if self.k_norm is not None:
            keys = self.k_norm(keys)
        return queries, keys, values, gate.reshape(b, n, self.d_out)

    def _gated_out(self, context: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        b, n = gate.shape[0], gate.shape[1]
        context = context.transpose(1, 2).reshape(b, n, self.d_out)  # (b, heads, n, hd) -> (b, n, d_out)
        return self.out_proj(context * torch.sigmoid(gate))

    def forward(self, x: torch.Tensor, mask, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        queries, keys, values, gate = self._qkv_gate(x)
        queries, keys = apply_rope(queries, cos, sin, partial=True), apply_rope(keys, cos, sin, partial=True)
        context = attend_with_mask(queries, keys, values, mask, self.head_dim**-0.5, self._label)
        return self._gated_out(context, gate)


class KVGroupedQueryAttention(GroupedQueryAttention):
    """The KV-cache notebook's layer: ``forward(x, mask, cos, sin, start_pos=0, cache=None)`` -> ``(context,
    next_cache)``, the cache's keys unrotated."""

    _label = "qwen3_5.KVGroupedQueryAttention"

    def forward(self, x: torch.Tensor, mask, cos: torch.Tensor, sin: torch.Tensor, start_pos: int = 0, cache=None):
        _check_call(self, start_pos, cache)
        queries, keys, values, gate = self._qkv_gate(x)
        queries, keys, values, next_cache = grow_unrotated(
            cache, queries, keys, values, cos, sin, start_pos, partial=True
        )
        context = attend_cached(queries, keys, values, mask, self.head_dim**-0.5, self._label)
        return self._gated_out(context, gate), next_cache
