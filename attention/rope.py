"""What the bonus models' fused layers share: RoPE, their RMSNorms, and reading the mask a model passes in.

Llama 3.2, Qwen3 and Gemma 3 (the book's bonus chapters) build their attention mask in the model and
pass it to every layer: ``True`` where a key is hidden, ``(num_tokens, num_tokens)``. The fused layers
recognise the masks those models build (causal, and Gemma 3's causal sliding window) and hand the
kernel its causal flag and window instead of a dense mask. The verdict is computed once per mask tensor
(one comparison against the rule's own mask, ``O(N^2)`` but once, not per layer) and kept on the tensor
itself, checked against its in-place version counter, so a later mask can never inherit it. Any other
mask runs PyTorch's attention with that mask and one warning: never a silently wrong result.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from chapter3_flash.kernels.masks import visible_mask
from torch import nn

from . import fused
from .reference import _check_rank

_warned_masks: set[str] = set()


def apply_rope(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    offset: int = 0,
    *,
    interleaved: bool = False,
    partial: bool = False,
) -> torch.Tensor:
    """RoPE of x (b, heads, n, head_dim) for positions offset + [0, n), as the book's models apply it.

    Default: the book's split-halves rotation (feature i pairs with i + head_dim/2), tables (context, head_dim).
    ``interleaved``: Tiny Aya's (Cohere's) even/odd pairs (feature 2i pairs with 2i + 1), its tables holding each
    angle twice in a row, computed in float32 and cast back as Tiny Aya does. ``partial``: Qwen3.5's partial
    rotary, tables narrower than head_dim: the first ``cos.shape[1]`` features rotate (split halves), the rest
    pass through unchanged."""
    n, head_dim = x.shape[2], x.shape[3]
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    rot = cos.shape[1] if cos.dim() == 2 else -1
    fits = rot == head_dim or (partial and 2 <= rot < head_dim and rot % 2 == 0)
    if cos.dim() != 2 or cos.shape != sin.shape or not fits:
        want = f"at most head_dim {head_dim}, even" if partial else f"head_dim {head_dim}"
        raise ValueError(
            f"RoPE tables cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must both be (context_length, {want})"
        )
    if offset < 0 or offset + n > cos.shape[0]:
        raise ValueError(f"RoPE positions {offset} to {offset + n} are outside the tables' {cos.shape[0]} positions")
    cos = cos[offset : offset + n][None, None]  # (1, 1, n, rot)
    sin = sin[offset : offset + n][None, None]
    if interleaved:
        xf = x.float()
        # (-x1, x0, -x3, x2, ...): each even/odd pair turned a quarter, stacked to (..., head_dim / 2, 2) and flattened
        rotated = torch.stack((-xf[..., 1::2], xf[..., ::2]), dim=-1).flatten(-2)
        return (xf * cos + rotated * sin).to(dtype=x.dtype)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x1, x2 = x_rot[..., : rot // 2], x_rot[..., rot // 2 :]
    rotated = torch.cat((-x2, x1), dim=-1)
    out = (x_rot * cos) + (rotated * sin)
    if rot < head_dim:
        out = torch.cat([out, x_pass], dim=-1)  # (b, heads, n, head_dim): the unrotated tail kept
    return out.to(dtype=x.dtype)


class RMSNorm(nn.Module):
    """Qwen3's RMSNorm (its QK-norm over each head), computed in float32."""

    def __init__(self, emb_dim: int, eps: float = 1e-6, bias: bool = False, qwen3_compatible: bool = True):
        super().__init__()
        self.eps = eps
        self.qwen3_compatible = qwen3_compatible
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if self.qwen3_compatible:
            x = x.to(torch.float32)
        norm = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.scale
        if self.shift is not None:
            norm = norm + self.shift
        return norm.to(dtype)


class GemmaRMSNorm(nn.Module):
    """Gemma 3's RMSNorm: zero-centred weights applied as (1 + w), in float32."""

    def __init__(self, emb_dim: int, eps: float = 1e-6, bias: bool = False):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.zeros(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps) * (1.0 + self.scale.float())
        if self.shift is not None:
            out = out + self.shift.float()
        return out.to(dtype)


def mask_rule(mask: torch.Tensor) -> tuple[bool, tuple[int, int]] | None:
    """(causal, window) when ``mask`` (True: hidden) is exactly a rule the kernel has, else None.

    Recognised: all visible; causal (bottom-right when it is not square); causal with a window of the last
    W keys (Gemma 3's local mask, ch04/06's); each also with leading singleton dimensions (the pkg's cached
    models pass ``mask[None, None]``). Remembered on the tensor for its current version; a tensor made under
    ``torch.inference_mode()`` has no version counter to check against, so its rule is read on every call."""
    if mask.is_inference():
        return _read_rule(mask)
    verdict = getattr(mask, "_attention_rule", None)
    if verdict is not None and verdict[0] == mask._version:
        return verdict[1]
    rule = _read_rule(mask)
    mask._attention_rule = (mask._version, rule)
    return rule


def _read_rule(mask: torch.Tensor) -> tuple[bool, tuple[int, int]] | None:
    if mask.dtype != torch.bool or mask.dim() < 2 or 0 in mask.shape or any(s != 1 for s in mask.shape[:-2]):
        return None
    mask = mask.reshape(mask.shape[-2:])  # (1, 1, n, N): the cached models' broadcast form
    n_q, n_k = mask.shape
    seen = ~mask
    if bool(seen.all()):
        return False, (-1, -1)
    candidates = [(True, (-1, -1))]
    width = int(seen[-1].sum())  # the last query sees the most keys of a causal window
    if 0 < width < n_k:
        candidates.append((True, (width - 1, -1)))
    for causal, window in candidates:
        if torch.equal(seen, visible_mask(n_q, n_k, causal=causal, window=window, device=mask.device)):
            return causal, window
    return None


def attend_with_mask(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scale: float, layer: str) -> torch.Tensor:
    """q (b, heads, n, hd), k and v (b, kv_heads, N_k, hd): one kernel call when the mask is a rule the kernel
    has; PyTorch's attention with the mask itself (and one warning per layer class) otherwise."""
    return _attend_by_rule(q, k, v, mask, _rule_of(mask), scale, layer)


def attend_cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scale: float, layer: str) -> torch.Tensor:
    """``attend_with_mask`` for a step against a whole cache (k, v hold every position so far, the queries
    the newest): a few new tokens without gradients go through the split-KV decode kernel."""
    rule = _rule_of(mask)
    if rule is None:
        return _attend_by_rule(q, k, v, mask, rule, scale, layer)
    causal, window = rule
    return fused.attend_newest(q, k, v, causal=causal, dropout_p=0.0, softmax_scale=scale, window_size=window)


def _rule_of(mask) -> tuple[bool, tuple[int, int]] | None:
    return mask_rule(mask) if isinstance(mask, torch.Tensor) else None


def _attend_by_rule(q, k, v, mask, rule, scale: float, layer: str) -> torch.Tensor:
    if rule is not None:
        causal, window = rule
        return fused._attend(q, k, v, causal=causal, dropout_p=0.0, softmax_scale=scale, window_size=window)
    if layer not in _warned_masks:
        _warned_masks.add(layer)
        warnings.warn(
            f"{layer}: the attention mask passed in is neither causal nor a causal sliding window; running "
            "PyTorch's attention with that mask (not fused)",
            stacklevel=4,
        )
    keep = ~mask if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool else mask
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


class RopeAttentionMixin:
    """The forward of the bonus models' grouped-query attention: projections, optional QK-norm, RoPE, and
    one kernel call with the query heads of a group reading their key/value head (no repeat_interleave)."""

    def _qkv_normed(self, x) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (b, heads, n, head_dim), keys and values (b, kv_heads, n, head_dim), QK-normed, not rotated."""
        _check_rank(x, 3, "(batch, num_tokens, d_in)", type(self).__name__)
        heads = {"W_query": self.num_heads, "W_key": self.num_kv_groups, "W_value": self.num_kv_groups}
        queries, keys, values = (
            fused.project_heads(self, x, name, n).transpose(1, 2) for name, n in heads.items()
        )  # (b, heads, n, head_dim)
        if getattr(self, "q_norm", None) is not None:
            queries = self.q_norm(queries)
        if getattr(self, "k_norm", None) is not None:
            keys = self.k_norm(keys)
        return queries, keys, values

    def _qkv_rope(self, x, cos, sin, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``_qkv_normed`` with queries and keys rotated for the positions offset + [0, n)."""
        queries, keys, values = self._qkv_normed(x)
        return apply_rope(queries, cos, sin, offset), apply_rope(keys, cos, sin, offset), values
