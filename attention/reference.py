"""The chapter's attention layers, eager and plain: the ground truth the fused layers are tested against.

Chapter 3 of *Build a Large Language Model (From Scratch)* builds attention in four steps; each class
below matches the chapter's in name, constructor, parameter creation order (so ``torch.manual_seed``
before construction gives the chapter's weights), buffers, ``state_dict`` keys and arithmetic. The
only difference: bad input raises a ``ValueError`` that says what is wrong, where the chapter fails
with an assertion or an indexing error.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn


def _check_rank(x: torch.Tensor, rank: int, layout: str, layer: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{layer} expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"{layer} expects input of shape {layout}, got shape {tuple(x.shape)}")


def in_features(projection: nn.Module) -> int | None:
    """The input width of a projection: an nn.Linear's ``in_features``, or that of the module a wrapper
    holds as ``.linear`` (the book's LinearWithLoRA, appendix E); None when nothing says (any module that
    maps the widths will do, as in the chapter's code, which only calls it)."""
    for _ in range(8):  # wrappers of wrappers, not a cycle
        width = getattr(projection, "in_features", None)
        if isinstance(width, int):
            return width
        projection = getattr(projection, "linear", None)
        if not isinstance(projection, nn.Module):
            return None
    return None


def _check_width(x: torch.Tensor, d_in: int | None, layer: str) -> None:
    if d_in is not None and x.shape[-1] != d_in:
        raise ValueError(f"{layer} was built with d_in={d_in}, got input with last dimension {x.shape[-1]}")


def _check_projected(t: torch.Tensor, width: int, name: str, layer: str) -> None:
    """A projection that is not an nn.Linear is checked by what it returns."""
    if t.shape[-1] != width:
        raise ValueError(f"{layer}: {name} returned width {t.shape[-1]}, expected {width}")


def _check_context(num_tokens: int, context_length: int, layer: str) -> None:
    if num_tokens > context_length:
        raise ValueError(f"{layer}: num_tokens {num_tokens} exceeds context_length {context_length}")


def _check_heads(d_out: int, num_heads: int) -> None:
    if num_heads < 1 or d_out % num_heads != 0:
        raise ValueError(f"d_out {d_out} must be divisible by num_heads {num_heads}")


def init_head_layout(layer, d_in: int, num_heads: int, num_kv_groups: int, head_dim: int | None) -> int:
    """The head attributes the ch05 grouped-query layers set before their projections (Qwen3, Qwen3.5, Tiny Aya):
    ``num_heads``, ``num_kv_groups``, ``group_size``, ``head_dim`` (``d_in // num_heads`` when not given) and
    ``d_out``; returns the head dim. Creates no parameter, so the layers' creation order (and seeded weights) stay."""
    _check_groups(num_heads, num_kv_groups)
    layer.num_heads = num_heads
    layer.num_kv_groups = num_kv_groups
    layer.group_size = num_heads // num_kv_groups
    if head_dim is None:
        if d_in % num_heads:
            raise ValueError(f"d_in {d_in} must be divisible by num_heads {num_heads} when head_dim is not set")
        head_dim = d_in // num_heads
    layer.head_dim = head_dim
    layer.d_out = num_heads * head_dim
    return head_dim


def _check_groups(num_heads: int, num_kv_groups: int, d_out: int | None = None) -> None:
    """Grouped-query attention's head counts (the bonus models): ``d_out`` (when the layer takes one) splits
    into num_heads, and num_heads into num_kv_groups."""
    if d_out is not None:
        _check_heads(d_out, num_heads)
    if num_heads < 1 or num_kv_groups < 1 or num_heads % num_kv_groups:
        raise ValueError(f"num_heads {num_heads} must be divisible by num_kv_groups {num_kv_groups}")


def takes_block_size(init):
    """Let ``__init__`` take ``block_size=``, the name the book's 2024 text gives ``context_length``, as a keyword.

    Positional calls and everything the constructor does are unchanged (so are the weights a seed gives); passing
    both names is a TypeError, and passing neither is Python's own TypeError for the missing ``context_length``."""
    signature = inspect.signature(init)
    position = list(signature.parameters).index("context_length") - 1  # its index in the call's args (no self)

    @functools.wraps(init)
    def __init__(self, *args, block_size=None, **kwargs):
        if block_size is not None:
            if len(args) > position or "context_length" in kwargs:
                given = args[position] if len(args) > position else kwargs["context_length"]
                raise TypeError(
                    f"{type(self).__name__}() got both context_length={given!r} and block_size={block_size!r}; "
                    "block_size is the book's earlier name for context_length: pass one of them"
                )
            kwargs["context_length"] = block_size
        init(self, *args, **kwargs)

    keyword = inspect.Parameter("block_size", inspect.Parameter.KEYWORD_ONLY, default=None)
    params = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    __init__.__signature__ = signature.replace(parameters=[*params, keyword])
    return __init__


def init_heads(module: nn.Module, d_in: int, d_out: int, num_heads: int, dropout: float, qkv_bias: bool) -> None:
    """The chapter's multi-head projections and dropout, in its order (the state_dict's keys follow it): for
    MultiHeadAttention and the book's layers built like it (the KV-cache and sliding-window classes)."""
    _check_heads(d_out, num_heads)
    module.d_out = d_out
    module.num_heads = num_heads
    module.head_dim = d_out // num_heads
    module.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
    module.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
    module.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
    module.out_proj = nn.Linear(d_out, d_out)
    module.dropout = nn.Dropout(dropout)


def init_group_heads(
    module: nn.Module, d_in: int, d_out: int, num_heads: int, num_kv_groups: int, qkv_bias: bool, dtype
) -> None:
    """The bonus chapters' grouped-query projections in the book's order (key, value, query, output), for its
    GroupedQueryAttention (ch04/04_gqa) and Llama 3.2's."""
    _check_groups(num_heads, num_kv_groups, d_out)
    module.d_out = d_out
    module.num_heads = num_heads
    module.head_dim = d_out // num_heads
    module.W_key = nn.Linear(d_in, num_kv_groups * module.head_dim, bias=qkv_bias, dtype=dtype)
    module.W_value = nn.Linear(d_in, num_kv_groups * module.head_dim, bias=qkv_bias, dtype=dtype)
    module.num_kv_groups = num_kv_groups
    module.group_size = num_heads // num_kv_groups
    module.W_query = nn.Linear(d_in, d_out, bias=qkv_bias, dtype=dtype)
    module.out_proj = nn.Linear(d_out, d_out, bias=False, dtype=dtype)


def simplified_self_attention(x: torch.Tensor) -> torch.Tensor:
    """Step 1 (section 3.3): attention of the inputs with themselves, no weights and no scaling."""
    _check_rank(x, 2, "(num_tokens, d)", "simplified_self_attention")
    attn_scores = x @ x.T  # (T, T)
    attn_weights = torch.softmax(attn_scores, dim=-1)
    return attn_weights @ x  # (T, d)


class SelfAttention_v1(nn.Module):
    """Step 2 (section 3.4): scaled dot-product attention with raw weight matrices."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.W_query = nn.Parameter(torch.rand(d_in, d_out))
        self.W_key = nn.Parameter(torch.rand(d_in, d_out))
        self.W_value = nn.Parameter(torch.rand(d_in, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_rank(x, 2, "(num_tokens, d_in)", type(self).__name__)
        _check_width(x, self.W_query.shape[0], type(self).__name__)
        keys = x @ self.W_key  # (T, d_out)
        queries = x @ self.W_query  # (T, d_out)
        values = x @ self.W_value  # (T, d_out)
        attn_scores = queries @ keys.T  # (T, T)
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        return attn_weights @ values  # (T, d_out)


class SelfAttention_v2(nn.Module):
    """Step 2 with ``nn.Linear`` projections (their better initialization, optional bias)."""

    def __init__(self, d_in: int, d_out: int, qkv_bias: bool = False):
        super().__init__()
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_rank(x, 2, "(num_tokens, d_in)", type(self).__name__)
        _check_width(x, in_features(self.W_query), type(self).__name__)
        keys = self.W_key(x)  # (T, d_out)
        queries = self.W_query(x)  # (T, d_out)
        values = self.W_value(x)  # (T, d_out)
        attn_scores = queries @ keys.T  # (T, T)
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        return attn_weights @ values  # (T, d_out)


class CausalAttention(nn.Module):
    """Step 3 (section 3.5): a causal mask above the diagonal, dropout on the attention weights."""

    @takes_block_size
    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, qkv_bias: bool = False):
        super().__init__()
        self.d_out = d_out
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_rank(x, 3, "(batch, num_tokens, d_in)", type(self).__name__)
        _check_width(x, in_features(self.W_query), type(self).__name__)
        b, num_tokens, d_in = x.shape
        _check_context(num_tokens, self.mask.shape[0], type(self).__name__)
        keys = self.W_key(x)  # (b, T, d_out)
        queries = self.W_query(x)  # (b, T, d_out)
        values = self.W_value(x)  # (b, T, d_out)
        attn_scores = queries @ keys.transpose(1, 2)  # (b, T, T)
        attn_scores.masked_fill_(self.mask.bool()[:num_tokens, :num_tokens], -torch.inf)
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        attn_weights = self.dropout(attn_weights)
        return attn_weights @ values  # (b, T, d_out)


class MultiHeadAttentionWrapper(nn.Module):
    """Step 4a (section 3.6.1): several causal heads side by side, outputs concatenated."""

    @takes_block_size
    def __init__(
        self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int, qkv_bias: bool = False
    ):
        super().__init__()
        self.heads = nn.ModuleList(
            [CausalAttention(d_in, d_out, context_length, dropout, qkv_bias) for _ in range(num_heads)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([head(x) for head in self.heads], dim=-1)  # (b, T, num_heads * d_out)


class MultiHeadAttention(nn.Module):
    """Step 4b (section 3.6.2): one projection of width d_out split into num_heads heads."""

    @takes_block_size
    def __init__(
        self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int, qkv_bias: bool = False
    ):
        super().__init__()
        init_heads(self, d_in, d_out, num_heads, dropout, qkv_bias)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_rank(x, 3, "(batch, num_tokens, d_in)", type(self).__name__)
        _check_width(x, in_features(self.W_query), type(self).__name__)
        b, num_tokens, d_in = x.shape
        _check_context(num_tokens, self.mask.shape[0], type(self).__name__)
        keys = self.W_key(x)  # (b, T, d_out)
        queries = self.W_query(x)
        values = self.W_value(x)
        keys = keys.view(b, num_tokens, self.num_heads, self.head_dim)  # (b, T, nh, hs)
        values = values.view(b, num_tokens, self.num_heads, self.head_dim)
        queries = queries.view(b, num_tokens, self.num_heads, self.head_dim)
        keys = keys.transpose(1, 2)  # (b, nh, T, hs)
        queries = queries.transpose(1, 2)
        values = values.transpose(1, 2)
        attn_scores = queries @ keys.transpose(2, 3)  # (b, nh, T, T)
        mask_bool = self.mask.bool()[:num_tokens, :num_tokens]
        attn_scores.masked_fill_(mask_bool, -torch.inf)
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        attn_weights = self.dropout(attn_weights)
        context_vec = (attn_weights @ values).transpose(1, 2)  # (b, T, nh, hs)
        context_vec = context_vec.contiguous().view(b, num_tokens, self.d_out)  # (b, T, d_out)
        return self.out_proj(context_vec)
