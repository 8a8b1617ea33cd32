"""The ch03 bonus notebook's multi-head attention variants (ch03/02_bonus_efficient-multihead-attention) and ch03/03's
buffer variants, fused: drop-ins with the book's constructors, parameters, buffers and ``state_dict`` keys (a seed
gives the book's weights), whose attention is one kernel call (causal, scale head_dim ** -0.5, the kernel's own
dropout on the attention weights in training).

- ``MultiHeadAttentionCombinedQKV``: one ``qkv`` projection to ``3 * d_out`` read as (3, heads, head_dim); q, k
  and v stay views of it.
- ``MHAEinsum``: raw ``(d_in, d_out)`` weights ``W_query`` ... and optional ``bias_q`` ...; the projections are
  matmuls (the einsums' arithmetic).
- ``MHAPyTorchScaledDotProduct``: one ``qkv`` projection, ``dropout`` a float, causal without a mask buffer.
- ``MHAPyTorchSDPAWithoutFlash``: the same with the notebook's boolean ``mask`` buffer, computing causal attention.
  The notebook's class as written passes that buffer (True above the diagonal) to ``scaled_dot_product_attention``,
  which reads True as *attend*: each token attends only to the tokens after it, and the last to none. That is not
  causal attention, so ``swap_attention`` refuses the class as written (its probe disagrees) and says why; a
  reader's copy that passes the complement (``~mask``) is converted.
- ``MHAPyTorchClass``: PyTorch's ``nn.MultiheadAttention`` called causally with the boolean mask buffer; ours reads
  the same module's ``in_proj_weight``/``in_proj_bias``/``out_proj``. With ``qkv_bias=True`` the notebook also sets
  ``add_bias_kv``: a learned key and value appended that every query sees, which no kernel rule has; that layer runs
  PyTorch's module exactly as the book does (one warning), and ``swap_attention`` leaves such layers unconverted.
- ``MultiheadAttention``: ``nn.MultiheadAttention`` itself, where a model calls it as self-attention with a causal
  mask (``attn_mask`` a causal boolean mask or ``is_causal=True``), batch first, no ``key_padding_mask``, no
  weights asked for (``need_weights=False``) and no ``add_bias_kv``: then fused, returning ``(output, None)`` as
  PyTorch does; every other call runs PyTorch's own forward, exactly.
- ``CausalAttentionWithBuffer`` (the chapter's ``CausalAttention`` under ch03/03's name) and
  ``CausalAttentionWithoutBuffers`` (its mask a plain attribute, not a buffer: the kernel never reads it, so ours
  also runs where the book's fails, a model moved to the GPU with its mask left on the CPU).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import fused
from .reference import _check_context, _check_heads, _check_projected, _check_rank, _check_width, in_features
from .rope import mask_rule

_warned: set[str] = set()


def _causal_mask(context_length: int, dtype=None) -> torch.Tensor:
    """The notebook's mask buffer: True (or 1.0) above the diagonal."""
    mask = torch.triu(torch.ones(context_length, context_length), diagonal=1)
    return mask if dtype is None else mask.to(dtype)


def _attend_qkv(layer: nn.Module, qkv: torch.Tensor, dropout_p: float, width: int) -> torch.Tensor:
    """Causal attention of a combined projection qkv (b, T, 3 * width) read as (3, heads, head_dim): (b, T, width)."""
    b, n, _ = qkv.shape
    _check_projected(qkv, 3 * width, "qkv", type(layer).__name__)
    qkv = qkv.view(b, n, 3, layer.num_heads, layer.head_dim)
    queries, keys, values = qkv.permute(2, 0, 3, 1, 4)  # 3 x (b, nh, T, hs): views, no copy
    context = fused._attend(queries, keys, values, causal=True, dropout_p=dropout_p)  # (b, nh, T, hs)
    return context.transpose(1, 2).reshape(b, n, width)  # (b, T, width)


def _check_input(layer: nn.Module, x, d_in: int | None, context_length: int | None) -> None:
    name = type(layer).__name__
    _check_rank(x, 3, "(batch, num_tokens, d_in)", name)
    _check_width(x, d_in, name)
    if context_length is not None:
        _check_context(x.shape[1], context_length, name)


class MultiHeadAttentionCombinedQKV(nn.Module):
    def __init__(
        self, d_in: int, d_out: int, num_heads: int, context_length: int, dropout: float = 0.0, qkv_bias: bool = False
    ):
        super().__init__()
        _check_heads(d_out, num_heads)
        self.num_heads = num_heads
        self.context_length = context_length
        self.head_dim = d_out // num_heads
        self.qkv = nn.Linear(d_in, 3 * d_out, bias=qkv_bias)
        self.proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", _causal_mask(context_length))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(self, x, in_features(self.qkv), self.mask.shape[0])
        context = _attend_qkv(self, self.qkv(x), fused._dropout_p(self.dropout), self.num_heads * self.head_dim)
        return self.proj(context)


class MHAEinsum(nn.Module):
    def __init__(
        self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int, qkv_bias: bool = False
    ):
        super().__init__()
        _check_heads(d_out, num_heads)
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        # The book's draws, in its order: randn for each matrix (then re-drawn by reset_parameters), the Linear.
        self.W_query = nn.Parameter(torch.randn(d_in, d_out))
        self.W_key = nn.Parameter(torch.randn(d_in, d_out))
        self.W_value = nn.Parameter(torch.randn(d_in, d_out))
        for name in ("bias_q", "bias_k", "bias_v"):
            self.register_parameter(name, nn.Parameter(torch.zeros(d_out)) if qkv_bias else None)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", _causal_mask(context_length))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation for the raw matrices; biases uniform in 1/sqrt(fan_in) as PyTorch computes
        fan_in for a (d_in, d_out) matrix (its second dimension)."""
        for weight in (self.W_query, self.W_key, self.W_value):
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        if self.bias_q is not None:
            fan_in, _ = nn.init._calculate_fan_in_and_fan_out(self.W_query)
            bound = 1 / math.sqrt(fan_in)
            for bias in (self.bias_q, self.bias_k, self.bias_v):
                nn.init.uniform_(bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(self, x, self.W_query.shape[0], self.mask.shape[0])
        b, n, _ = x.shape

        def project(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            y = x @ weight if bias is None else x @ weight + bias  # (b, T, d_out)
            return y.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (b, nh, T, hs)

        queries = project(self.W_query, self.bias_q)
        keys = project(self.W_key, self.bias_k)
        values = project(self.W_value, self.bias_v)
        context = fused._attend(queries, keys, values, causal=True, dropout_p=fused._dropout_p(self.dropout))
        return self.out_proj(context.transpose(1, 2).reshape(b, n, self.d_out))  # (b, T, d_out)


class MHAPyTorchScaledDotProduct(nn.Module):
    def __init__(
        self, d_in: int, d_out: int, num_heads: int, context_length: int, dropout: float = 0.0, qkv_bias: bool = False
    ):
        super().__init__()
        _check_heads(d_out, num_heads)
        self.num_heads = num_heads
        self.context_length = context_length
        self.head_dim = d_out // num_heads
        self.d_out = d_out
        self.qkv = nn.Linear(d_in, 3 * d_out, bias=qkv_bias)
        self.proj = nn.Linear(d_out, d_out)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(self, x, in_features(self.qkv), None)  # is_causal without a mask: no context limit
        dropout_p = self.dropout if self.training else 0.0
        return self.proj(_attend_qkv(self, self.qkv(x), dropout_p, self.d_out))


class MHAPyTorchSDPAWithoutFlash(MHAPyTorchScaledDotProduct):
    def __init__(
        self, d_in: int, d_out: int, num_heads: int, context_length: int, dropout: float = 0.0, qkv_bias: bool = False
    ):
        super().__init__(d_in, d_out, num_heads, context_length, dropout, qkv_bias)
        self.register_buffer("mask", _causal_mask(context_length, torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The book slices its mask to min(T, context_length) and fails past it (a shape mismatch in SDPA).
        _check_input(self, x, in_features(self.qkv), self.mask.shape[0])
        dropout_p = self.dropout if self.training else 0.0
        return self.proj(_attend_qkv(self, self.qkv(x), dropout_p, self.d_out))


class MultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose causal self-attention calls run the fused kernel (see the module docstring)."""

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.fuses(query, key, value, key_padding_mask, need_weights, attn_mask, is_causal):
            return self.causal_self_attention(query), None
        return super().forward(
            query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
        )

    def fuses(self, query, key, value, key_padding_mask, need_weights, attn_mask, is_causal) -> bool:
        """Whether a call is causal self-attention the kernel computes exactly as PyTorch's module does."""
        if need_weights or key_padding_mask is not None or not self.batch_first or self.bias_k is not None:
            return False
        if not (query is key is value) or not isinstance(query, torch.Tensor) or query.dim() != 3:
            return False
        if not self._qkv_same_embed_dim or self.in_proj_weight is None:
            return False
        if attn_mask is None:
            return bool(is_causal)  # PyTorch's hint without a mask: causal
        n = query.shape[1]
        if attn_mask.dtype != torch.bool or tuple(attn_mask.shape) != (n, n):
            return False
        return mask_rule(attn_mask) == (True, (-1, -1))

    def causal_self_attention(self, x: torch.Tensor) -> torch.Tensor:
        return causal_self_attention(self, x)


def causal_self_attention(mha: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """What ``mha(x, x, x, attn_mask=causal, need_weights=False)`` computes (batch first, no add_bias_kv), fused:
    x (b, T, embed_dim) -> (b, T, embed_dim), through the module's in-projection, the kernel and its out_proj."""
    qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)  # (b, T, 3 * embed_dim): q, k, v in that order
    b, n, _ = qkv.shape
    qkv = qkv.view(b, n, 3, mha.num_heads, mha.head_dim)
    queries, keys, values = qkv.permute(2, 0, 3, 1, 4)  # 3 x (b, nh, T, hs): views
    dropout_p = mha.dropout if mha.training else 0.0
    context = fused._attend(queries, keys, values, causal=True, dropout_p=dropout_p)  # (b, nh, T, hs)
    return mha.out_proj(context.transpose(1, 2).reshape(b, n, mha.embed_dim))


class MHAPyTorchClass(nn.Module):
    def __init__(
        self,
        d_in: int,
        d_out: int,
        num_heads: int,
        context_length: int,
        dropout: float = 0.0,
        qkv_bias: bool = False,
        need_weights: bool = True,
    ):
        super().__init__()
        self.context_length = context_length
        self.multihead_attn = MultiheadAttention(
            embed_dim=d_out, num_heads=num_heads, dropout=dropout, bias=qkv_bias, add_bias_kv=qkv_bias, batch_first=True
        )
        self.need_weights = need_weights
        self.proj = nn.Linear(d_out, d_out)
        self.register_buffer("mask", _causal_mask(context_length, torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mha = self.multihead_attn
        _check_input(self, x, mha.embed_dim, self.mask.shape[0])
        if mha.bias_k is not None or not mha._qkv_same_embed_dim:
            name = type(self).__name__
            if name not in _warned:
                _warned.add(name)
                warnings.warn(
                    f"{name}: add_bias_kv (qkv_bias=True) appends a learned key and value every query sees, which "
                    "the fused kernel has no rule for; running PyTorch's nn.MultiheadAttention as the book does",
                    stacklevel=2,
                )
            n = x.shape[1]
            out, _ = nn.MultiheadAttention.forward(mha, x, x, x, attn_mask=self.mask[:n, :n], need_weights=False)
            return self.proj(out)
        # The book asks for the weights (need_weights) and drops them: they never change the output.
        return self.proj(causal_self_attention(mha, x))


class CausalAttentionWithBuffer(fused.CausalAttention):
    """ch03/03's name for the chapter's CausalAttention (its mask a registered buffer)."""


class CausalAttentionWithoutBuffers(fused.CausalAttention):
    """ch03/03's CausalAttention with its mask a plain attribute: not in the state_dict, not moved by ``.to()``."""

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, qkv_bias: bool = False):
        nn.Module.__init__(self)
        self.d_out = d_out
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.dropout = nn.Dropout(dropout)
        self.mask = _causal_mask(context_length)  # only its length is read: the context limit
