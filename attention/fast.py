"""The book's "fast" layers, fused: the variants it writes around PyTorch's ``scaled_dot_product_attention``.

- ``PyTorchMultiHeadAttention`` (pkg ch03.py bonus; ``GPTModelFast`` in pkg ch04.py; the ch05/10 training-speed
  scripts): one ``qkv`` projection to ``3 * d_out``, an output ``proj`` with bias, ``dropout`` a float applied to
  the attention weights in training mode, causal. Same constructor, parameters (``qkv``, ``proj``) and
  ``forward(x)``.
- ``GroupedQueryAttentionFast`` (pkg llama3.py and kv_cache/llama3.py; ``Llama3ModelFast``): Llama 3.2's
  grouped-query attention with ``forward(x, cos, sin)``, causal without a mask, RoPE as the book applies it.
  The book repeats each key/value head for its query heads before SDPA; here the query heads of a group read
  their key/value head in the kernel.

q, k and v stay views of the projections (``(b, T, 3, heads, head_dim)`` permuted for the first), and the
kernel writes its output in q's memory layout, so the merge of the heads before the output projection is a
view too where the layout allows.
"""

from __future__ import annotations

import torch
from torch import nn

from . import fused
from .reference import _check_heads, _check_projected, _check_rank, _check_width, in_features, init_group_heads
from .rope import RopeAttentionMixin


class PyTorchMultiHeadAttention(nn.Module):
    def __init__(self, d_in: int, d_out: int, num_heads: int, dropout: float = 0.0, qkv_bias: bool = False):
        super().__init__()
        _check_heads(d_out, num_heads)
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.d_out = d_out
        self.qkv = nn.Linear(d_in, 3 * d_out, bias=qkv_bias)
        self.proj = nn.Linear(d_out, d_out)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        _check_rank(x, 3, "(batch, num_tokens, d_in)", name)
        _check_width(x, in_features(self.qkv), name)
        b, num_tokens, _ = x.shape
        qkv = self.qkv(x)  # (b, T, 3 * d_out)
        _check_projected(qkv, 3 * self.d_out, "qkv", name)
        qkv = qkv.view(b, num_tokens, 3, self.num_heads, self.head_dim)
        queries, keys, values = qkv.permute(2, 0, 3, 1, 4)  # 3 x (b, nh, T, hs): views, no copy
        dropout_p = self.dropout if self.training else 0.0
        context = fused._attend(queries, keys, values, causal=True, dropout_p=dropout_p)  # (b, nh, T, hs)
        context = context.transpose(1, 2).reshape(b, num_tokens, self.d_out)  # (b, T, d_out)
        return self.proj(context)


class GroupedQueryAttentionFast(RopeAttentionMixin, nn.Module):
    def __init__(self, d_in: int, d_out: int, num_heads: int, num_kv_groups: int, dtype: torch.dtype | None = None):
        super().__init__()
        init_group_heads(self, d_in, d_out, num_heads, num_kv_groups, False, dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, n = x.shape[0], x.shape[1]
        queries, keys, values = self._qkv_rope(x, cos, sin)  # (b, heads, n, hd); keys, values (b, kv_heads, n, hd)
        context = fused._attend(queries, keys, values, causal=True, dropout_p=0.0)
        return self.out_proj(context.transpose(1, 2).reshape(b, n, self.d_out))  # (b, n, d_out)
