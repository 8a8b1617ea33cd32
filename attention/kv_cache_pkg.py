"""The book's KV-cache layers whose caller holds the cache, fused: the package's (pkg ``llms_from_scratch.kv_cache``:
gpt2.py, llama3.py, qwen3.py) and Gemma 3's (ch05/12_gemma3, standalone-gemma3-plus-kvcache).

There the caller holds the cache: ``forward(..., start_pos, cache)`` takes the layer's previous
``(keys, values)`` (``(b, kv_heads, T, head_dim)``, or None) and returns ``(context, next_cache)``, the cache
grown by ``torch.cat`` (the model's ``KVCache`` keeps it per layer). These classes keep that contract exactly:
same constructors, parameters, ``state_dict`` and forward signatures, the same ``next_cache`` tensors. What
changes is the attention: one kernel call, no ``repeat_interleave`` copies, no dense mask (GPT-2's builds its
causal mask itself; Llama 3.2's and Qwen3's models pass theirs in and it is read as in ``attention.rope``), and
a step of a few tokens runs the split-KV decode kernel over the cache.

The batched variant (``llms_from_scratch.kv_cache_batched``, Qwen3): ``start_pos`` a (b,) tensor, one position
per sequence, and ``cache`` a list of b per-sequence ``(keys, values)`` pairs, returned grown the same way:
``Qwen3BatchedGroupedQueryAttention`` keeps that contract (RoPE gathered per sequence), and attends the batch in one
kernel call where the model's per-sequence mask rows are one causal rule (the book's model builds them so: its
mask rows only fit together when every sequence is at the same length), PyTorch's attention with the mask otherwise.
The non-batched classes take an int ``start_pos`` and one cache tuple; the batched form there is a ``TypeError``.
"""

from __future__ import annotations

import torch
from torch import nn

from . import fused, gemma3, llama3, qwen3
from .reference import _check_rank, _check_width, in_features, init_heads
from .rope import apply_rope, attend_cached


def _check_call(layer: nn.Module, start_pos, cache) -> None:
    if isinstance(start_pos, torch.Tensor) or (cache is not None and not isinstance(cache, tuple)):
        raise TypeError(
            f"{type(layer).__name__}: start_pos must be an int and cache a (keys, values) tuple or None, got "
            f"{type(start_pos).__name__} and {type(cache).__name__} (per-sequence positions and caches, the pkg's "
            "kv_cache_batched form, are not supported)"
        )


def _grow(cache, keys_new: torch.Tensor, values_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The caller's cache with this call's keys and values appended (the book's torch.cat), checked first."""
    if cache is None:
        return keys_new, values_new
    if len(cache) != 2:
        raise ValueError(f"cache must be a (keys, values) pair, got a tuple of {len(cache)}")
    prev_k, prev_v = cache
    for name, prev, new in (("keys", prev_k, keys_new), ("values", prev_v, values_new)):
        if not isinstance(prev, torch.Tensor):
            raise TypeError(f"cached {name} must be a tensor, got {type(prev).__name__}")
        if prev.dim() != 4 or prev.shape[:2] != new.shape[:2] or prev.shape[3] != new.shape[3]:
            raise ValueError(
                f"cached {name} have shape {tuple(prev.shape)}; this call's are {tuple(new.shape)} "
                "(batch, kv_heads, tokens, head_dim): batch, heads and head_dim must match"
            )
        if prev.dtype != new.dtype or prev.device != new.device:
            raise ValueError(
                f"cached {name} are {prev.dtype} on {prev.device}, this call's {new.dtype} on {new.device}"
            )
    return torch.cat([prev_k, keys_new], dim=2), torch.cat([prev_v, values_new], dim=2)


def grow_unrotated(cache, queries, keys_new, values_new, cos, sin, start_pos: int, **rope):
    """The notebooks whose cache holds keys before RoPE (Gemma 3, OLMo 3, Qwen3.5): the caller's cache grown by this
    call's keys and values, then queries rotated from ``start_pos`` and all keys from ``start_pos - len(cache)``
    (a trimmed sliding-window cache starts there). ``rope``: apply_rope's options. Returns the rotated queries
    and keys, the values and ``next_cache`` (unrotated, as the book's)."""
    prev_len = 0
    if cache is not None and cache[0] is not None:
        prev_len = cache[0].shape[2]
    keys, values = next_cache = _grow(cache if prev_len else None, keys_new, values_new)
    queries = apply_rope(queries, cos, sin, start_pos, **rope)
    return queries, apply_rope(keys, cos, sin, start_pos - prev_len, **rope), values, next_cache


class MultiHeadAttention(nn.Module):
    """pkg kv_cache/gpt2.py's MultiHeadAttention: ``forward(x, use_cache=False, start_pos=0, cache=None)`` ->
    ``(context, next_cache)``; ``next_cache`` is None without ``use_cache``."""

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int, qkv_bias=False):
        super().__init__()
        init_heads(self, d_in, d_out, num_heads, dropout, qkv_bias)

    def forward(self, x: torch.Tensor, use_cache: bool = False, start_pos: int = 0, cache=None):
        _check_rank(x, 3, "(batch, num_tokens, d_in)", type(self).__name__)
        _check_width(x, in_features(self.W_query), type(self).__name__)
        _check_call(self, start_pos, cache)
        b, n, _ = x.shape
        split = lambda name: fused.project_heads(self, x, name, self.num_heads).transpose(1, 2)  # (b, nh, T, hs)
        keys, values, queries = split("W_key"), split("W_value"), split("W_query")
        next_cache = None
        if use_cache:
            keys, values = next_cache = _grow(cache, keys, values)
        p = fused._dropout_p(self.dropout)
        attend = fused.attend_newest if use_cache else fused._attend  # the book's mask: causal, bottom-right
        context = attend(queries, keys, values, causal=True, dropout_p=p)
        return self.out_proj(context.transpose(1, 2).reshape(b, n, self.d_out)), next_cache


class _CallerCache:
    """The pkg's grouped-query forward with the caller's cache, on top of a fused layer's projections."""

    def forward(self, x: torch.Tensor, mask, cos: torch.Tensor, sin: torch.Tensor, start_pos: int = 0, cache=None):
        _check_call(self, start_pos, cache)
        b, n = x.shape[0], x.shape[1]
        queries, keys, values = self._qkv_rope(x, cos, sin, start_pos)
        keys, values = next_cache = _grow(cache, keys, values)
        context = attend_cached(queries, keys, values, mask, self.head_dim**-0.5, type(self).__qualname__)
        return self.out_proj(context.transpose(1, 2).reshape(b, n, self.d_out)), next_cache


class Llama3GroupedQueryAttention(_CallerCache, llama3.GroupedQueryAttention):
    """pkg kv_cache/llama3.py's GroupedQueryAttention: ``forward(x, mask, cos, sin, start_pos=0, cache=None)``."""


class Qwen3GroupedQueryAttention(_CallerCache, qwen3.GroupedQueryAttention):
    """pkg kv_cache/qwen3.py's GroupedQueryAttention (QK-norm before RoPE): the same forward as Llama 3.2's."""


class Qwen3BatchedGroupedQueryAttention(qwen3.GroupedQueryAttention):
    """pkg kv_cache_batched/qwen3.py's GroupedQueryAttention: ``forward(x, mask, cos, sin, start_pos, cache)`` with
    ``start_pos`` a (b,) tensor and ``cache`` a list of b ``(keys, values)`` pairs (or None): see the module
    docstring. Returns ``(context, next_cache)``, ``next_cache`` that list grown by this call's keys and values."""

    def forward(self, x: torch.Tensor, mask, cos: torch.Tensor, sin: torch.Tensor, start_pos=0, cache=None):
        b, n = x.shape[0], x.shape[1]
        positions = _positions(self, start_pos, b, n, cos)  # (b, n)
        queries, keys, values = self._qkv_normed(x)  # (b, heads, n, hd); keys, values (b, kv_heads, n, hd)
        queries, keys = _rope_at(queries, cos, sin, positions), _rope_at(keys, cos, sin, positions)
        if cache is not None and (not isinstance(cache, (list, tuple)) or len(cache) != b):
            raise ValueError(
                f"{type(self).__name__}: cache must be a list of {b} per-sequence (keys, values) pairs or None, got "
                f"{type(cache).__name__}" + (f" of {len(cache)}" if isinstance(cache, (list, tuple)) else "")
            )
        next_cache = [
            _grow(None if not cache or cache[i] is None else tuple(cache[i]), keys[i : i + 1], values[i : i + 1])
            for i in range(b)
        ]  # b x ((1, kv_heads, T_i, hd), ...): the book's per-sequence torch.cat
        lengths = {k.shape[2] for k, _ in next_cache}
        if len(lengths) != 1:
            raise ValueError(
                f"{type(self).__name__}: the sequences' caches hold {sorted(lengths)} positions; the batch is "
                "attended as one tensor (as the book's layer concatenates it), so they must be equal"
            )
        keys = torch.cat([k for k, _ in next_cache])  # (b, kv_heads, T, hd)
        values = torch.cat([v for _, v in next_cache])
        if (
            isinstance(mask, torch.Tensor)
            and mask.dim() == 4
            and mask.shape[0] > 1
            and torch.equal(mask, mask[:1].expand_as(mask))
        ):
            mask = mask[:1]  # every sequence's rows are the same rule: read it once, one kernel call for the batch
        context = attend_cached(queries, keys, values, mask, self.head_dim**-0.5, type(self).__qualname__)
        return self.out_proj(context.transpose(1, 2).reshape(b, n, self.d_out)), next_cache


def _positions(layer: nn.Module, start_pos, b: int, n: int, cos: torch.Tensor) -> torch.Tensor:
    """Each sequence's positions (b, n): start_pos[i] + [0, n), checked against the RoPE tables."""
    if not isinstance(start_pos, torch.Tensor) or start_pos.shape != (b,) or start_pos.is_floating_point():
        shape = tuple(start_pos.shape) if isinstance(start_pos, torch.Tensor) else type(start_pos).__name__
        raise TypeError(
            f"{type(layer).__name__}: start_pos must be an integer tensor of one position per sequence, shape ({b},), "
            f"got {shape}"
        )
    positions = start_pos[:, None] + torch.arange(n, device=start_pos.device)[None, :]  # (b, n)
    low, high = int(positions.min()), int(positions.max())
    if low < 0 or high >= cos.shape[0]:
        raise ValueError(f"RoPE positions {low} to {high} are outside the tables' {cos.shape[0]} positions")
    return positions.to(cos.device)


def _rope_at(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The book's split-halves RoPE with a position per sequence: x (b, heads, n, hd), positions (b, n)."""
    head_dim = x.shape[-1]
    cos, sin = cos[positions][:, None], sin[positions][:, None]  # (b, 1, n, hd)
    x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2 :]
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class Gemma3GroupedQueryAttention(gemma3.GroupedQueryAttention):
    """ch05/12_gemma3's KV-cache notebook: its cache holds the keys before RoPE, rotated after the concatenation
    (from ``start_pos - len(cache)``); the scale from ``query_pre_attn_scalar``; the model's global and local
    (sliding-window) masks read as the kernel's causal flag and window."""

    def forward(self, x: torch.Tensor, mask, cos: torch.Tensor, sin: torch.Tensor, start_pos: int = 0, cache=None):
        _check_call(self, start_pos, cache)
        b, n = x.shape[0], x.shape[1]
        queries, rotated, values, next_cache = grow_unrotated(cache, *self._qkv_normed(x), cos, sin, start_pos)
        context = attend_cached(queries, rotated, values, mask, self.scaling, type(self).__qualname__)
        return self.out_proj(context.transpose(1, 2).reshape(b, n, self.d_out)), next_cache
