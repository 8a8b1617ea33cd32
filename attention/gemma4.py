"""Gemma 4's attention (the book's ch05/17_gemma4, its dense E2B/E4B models), fused: same constructor
``(cfg, layer_idx)``, parameters and forwards as the book's ``Gemma4Attention``: the plain notebook's
``forward(x, mask, cos, sin, shared_kv=None, return_kv=False)`` and the KV-cache notebook's ``forward(x, mask,
cos, sin, start_pos=0, cache=None, shared_kv=None)``, each returning ``(output, kv)``.

What sets it apart from Gemma 3's: no softmax scaling at all (scale 1; the QK-norms set the logits' size),
an RMSNorm without a weight on the values, a larger head_dim on the full-attention layers (512 at E2B/E4B,
past the Triton kernel's 256, so those layers run PyTorch's attention with one warning), and KV sharing: the
last ``num_kv_shared_layers`` layers attend to the keys and values an earlier layer of their type computed
(``shared_kv``, already normed and rotated) instead of their own. The model's 2-D global and local masks are
read as the kernel's causal flag and window (``attention.rope``)."""

from __future__ import annotations

import torch
from torch import nn

from . import fused
from .kv_cache_pkg import _check_call, _grow
from .reference import _check_rank
from .rope import apply_rope, attend_cached, attend_with_mask


class Gemma4RMSNorm(nn.Module):
    """Gemma 4's RMSNorm: float32, times ``weight`` (ones at init) unless built ``with_scale=False``."""

    def __init__(self, dim: int, eps: float = 1e-6, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.with_scale = with_scale
        if with_scale:
            self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.pow(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps, -0.5)
        if self.with_scale:
            out = out * self.weight.float()
        return out.to(x.dtype)


def _rows_that_see_nothing(context: torch.Tensor, value: torch.Tensor, mask, groups: int) -> torch.Tensor:
    """The book fills hidden scores with the dtype's lowest finite value, not -inf, so a query that sees no key
    gets equal weights on all keys: the mean of the values. That happens in the KV-cache notebook when a prompt
    longer than the window reaches a KV-shared sliding layer: the cache it shares was trimmed to the window, and
    the first queries' keys are gone. With more queries than keys (bottom-right masks), such rows are the first
    ``n_q - n_k``; they get the book's mean (the kernel gives a row without keys zeros)."""
    extra = context.shape[2] - value.shape[2]
    if extra <= 0 or not isinstance(mask, torch.Tensor) or not bool(mask[..., :extra, :].all()):
        return context
    mean = value.float().mean(dim=2, keepdim=True).repeat_interleave(groups, dim=1)  # (b, heads, 1, head_dim)
    rows = mean.to(context.dtype).expand(-1, -1, extra, -1)
    return torch.cat([rows, context[:, :, extra:]], dim=2)  # (b, heads, n_q, head_dim)


class Gemma4Attention(nn.Module):
    _label = "gemma4.Gemma4Attention"

    def __init__(self, cfg: dict, layer_idx: int):
        super().__init__()
        types = cfg["layer_types"]
        self.layer_type = types[layer_idx]
        self.is_sliding = self.layer_type == "sliding_attention"
        self.head_dim = cfg["head_dim"] if self.is_sliding else cfg["global_head_dim"]
        self.num_heads = cfg["n_heads"]
        self.num_kv_heads = cfg["n_kv_heads"]
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"n_heads {self.num_heads} must be divisible by n_kv_heads {self.num_kv_heads}")
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        d, hd, dtype = cfg["emb_dim"], self.head_dim, cfg["dtype"]
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=False, dtype=dtype)
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=False, dtype=dtype)
        self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=False, dtype=dtype)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=False, dtype=dtype)
        self.q_norm = Gemma4RMSNorm(hd, eps=cfg["layer_norm_eps"])
        self.k_norm = Gemma4RMSNorm(hd, eps=cfg["layer_norm_eps"])
        self.v_norm = Gemma4RMSNorm(hd, eps=cfg["layer_norm_eps"], with_scale=False)
        # KV sharing: layers from first_shared on reuse the last earlier layer of their type's keys and values.
        first_shared = cfg["n_layers"] - cfg["num_kv_shared_layers"]
        self.is_kv_shared_layer = layer_idx >= first_shared > 0
        before = types[:first_shared]
        last_of_type = len(before) - 1 - before[::-1].index(self.layer_type) if self.layer_type in before else None
        self.kv_shared_layer_index = last_of_type if self.is_kv_shared_layer else None
        self.store_full_length_kv = (not self.is_kv_shared_layer) and first_shared > 0 and layer_idx == last_of_type

    def _heads(self, x: torch.Tensor, name: str, heads: int, norm: nn.Module) -> torch.Tensor:
        return norm(fused.project_heads(self, x, name, heads).transpose(1, 2))  # (b, heads, n, head_dim), normed

    def _attend(self, query, key, value, mask, cached: bool) -> torch.Tensor:
        b, n = query.shape[0], query.shape[2]
        attend = attend_cached if cached else attend_with_mask
        context = attend(query, key, value, mask, 1.0, self._label)  # the book scales nothing
        context = _rows_that_see_nothing(context, value, mask, self.num_key_value_groups)
        return self.o_proj(context.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))

    def _kv(self, x: torch.Tensor, cos, sin, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        key = apply_rope(self._heads(x, "k_proj", self.num_kv_heads, self.k_norm), cos, sin, offset)
        return key, self._heads(x, "v_proj", self.num_kv_heads, self.v_norm)

    def forward(self, x: torch.Tensor, mask, cos: torch.Tensor, sin: torch.Tensor, shared_kv=None, return_kv=False):
        _check_rank(x, 3, "(batch, num_tokens, d_in)", type(self).__name__)
        query = apply_rope(self._heads(x, "q_proj", self.num_heads, self.q_norm), cos, sin)
        computed = None
        if shared_kv is None:
            key, value = computed = self._kv(x, cos, sin)
        else:
            key, value = shared_kv
        output = self._attend(query, key, value, mask, cached=False)
        return output, computed if return_kv else None


class KVGemma4Attention(Gemma4Attention):
    """The KV-cache notebook's layer: its cache holds rotated keys, grown by ``torch.cat``; a KV-shared layer
    returns no cache of its own."""

    _label = "gemma4.KVGemma4Attention"

    def __init__(self, cfg: dict, layer_idx: int):
        super().__init__(cfg, layer_idx)
        del self.store_full_length_kv  # the KV-cache notebook's class has no such attribute

    def forward(
        self, x: torch.Tensor, mask, cos: torch.Tensor, sin: torch.Tensor, start_pos=0, cache=None, shared_kv=None
    ):
        _check_rank(x, 3, "(batch, num_tokens, d_in)", type(self).__name__)
        _check_call(self, start_pos, cache)
        query = apply_rope(self._heads(x, "q_proj", self.num_heads, self.q_norm), cos, sin, start_pos)
        next_cache = None
        if shared_kv is None:
            have = cache if cache is not None and cache[0] is not None else None
            key, value = next_cache = _grow(have, *self._kv(x, cos, sin, start_pos))
        else:
            key, value = shared_kv
        return self._attend(query, key, value, mask, cached=True), next_cache
