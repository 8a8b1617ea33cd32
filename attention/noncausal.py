"""The classification experiments' attention (ch06/02_bonus_additional-experiments), fused: the chapter's
``MultiHeadAttention`` with ``disable_causal_mask=``.

With ``disable_causal_mask=True`` every token attends to every token (the experiments classify from the whole
sequence); the book's constructor then registers no ``mask`` buffer, and its forward has no context limit. Here
the same constructor (parameters created in the book's order, so a seed gives the book's weights; the buffer only
where the book has it), and one kernel call with ``causal=False``. With ``False`` it is the chapter's layer.
"""

from __future__ import annotations

import torch
from torch import nn

from . import fused
from .fused import _attend, _dropout_p, project_heads
from .reference import _check_rank, _check_width, in_features, init_heads


class MultiHeadAttention(fused.MultiHeadAttention):
    def __init__(
        self,
        d_in: int,
        d_out: int,
        context_length: int,
        dropout: float,
        num_heads: int,
        qkv_bias: bool = False,
        disable_causal_mask: bool = False,
    ):
        nn.Module.__init__(self)
        init_heads(self, d_in, d_out, num_heads, dropout, qkv_bias)
        if not disable_causal_mask:
            self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))
        self.disable_causal_mask = disable_causal_mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.disable_causal_mask:
            return super().forward(x)
        _check_rank(x, 3, "(batch, num_tokens, d_in)", type(self).__name__)
        _check_width(x, in_features(self.W_query), type(self).__name__)
        b, num_tokens, _ = x.shape
        queries, keys, values = (
            project_heads(self, x, name, self.num_heads).transpose(1, 2) for name in ("W_query", "W_key", "W_value")
        )  # (b, nh, T, hs): views of the projections
        context = _attend(queries, keys, values, causal=False, dropout_p=_dropout_p(self.dropout))  # (b, nh, T, hs)
        context = context.transpose(1, 2).reshape(b, num_tokens, self.d_out)  # (b, T, d_out): a view
        return self.out_proj(context)
