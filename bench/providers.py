"""The attentions the benchmarks compare, each called as ``fn(q, k, v, dropout_p)`` on causal ``(B, H, N, D)``
inputs: ours, every SDPA backend, FlexAttention, ``nn.MultiheadAttention`` and the chapter's own core.

A peer that this PyTorch build or device lacks raises ``Unavailable`` (the sweep records it as "n/a");
any other exception, and every exception of ours, is an error.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from chapter3_flash.kernels import flash_attention


class Unavailable(Exception):
    """A peer's backend that does not run here (not built, no kernel for this case)."""


def ours(q, k, v, p, **kw):
    """Our kernel as every provider is called: causal, (B, H, N, D), dropout p."""
    return flash_attention(q, k, v, causal=True, dropout_p=p, **kw)


def sdpa(backend_name: str, **sdpa_kw) -> Callable:
    """scaled_dot_product_attention restricted to one backend (FLASH_ATTENTION, CUDNN_ATTENTION, ...)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def run(q, k, v, p):
        with sdpa_kernel(backend):
            try:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p, **sdpa_kw)
            except RuntimeError as err:
                if "No available kernel" in str(err) or "No viable backend" in str(err):
                    raise Unavailable(f"SDPA {backend_name}: no kernel for this case") from err
                raise

    return run


def chapter_core(q, k, v, p, _masks={}):
    """The chapter's MultiHeadAttention core, line for line (its mask is a buffer: built once)."""
    n = q.shape[2]
    key = (n, q.device)
    if key not in _masks:
        _masks.clear()
        _masks[key] = torch.triu(torch.ones(n, n, device=q.device), diagonal=1).bool()
    attn_scores = q @ k.transpose(2, 3)  # (B, H, N, N)
    attn_scores.masked_fill_(_masks[key], -torch.inf)
    attn_weights = torch.softmax(attn_scores / k.shape[-1] ** 0.5, dim=-1)
    attn_weights = F.dropout(attn_weights, p, training=p > 0)
    return attn_weights @ v


def flex(window: int | None = None) -> Callable:
    """FlexAttention (compiled), causal or a causal sliding window of ``window`` keys."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as err:
        raise Unavailable("FlexAttention is not in this PyTorch") from err
    compiled = torch.compile(flex_attention, dynamic=False)
    masks = {}

    def causal(b, h, qi, kv):
        return qi >= kv

    def sliding(b, h, qi, kv):
        return (qi >= kv) & (qi - kv < window)

    def run(q, k, v, p):
        if p > 0:
            raise Unavailable("FlexAttention has no dropout")
        n = q.shape[2]
        if n not in masks:
            masks[n] = create_block_mask(sliding if window else causal, None, None, n, n, device=q.device)
        return compiled(q, k, v, block_mask=masks[n])

    return run


def nn_mha(cache={}) -> Callable:
    """nn.MultiheadAttention on (B, N, H*D): includes its input and output projections."""

    def run(q, k, v, p):
        B, H, N, D = q.shape
        key = (H, D, q.dtype, p)
        if key not in cache:
            cache.clear()
            mha = torch.nn.MultiheadAttention(H * D, H, dropout=p, bias=False, batch_first=True)
            cache[key] = mha.to(q.device, q.dtype).train(p > 0)
        x = q.transpose(1, 2).reshape(B, N, H * D)  # (B, N, H*D): a view of q's storage where possible
        mask = torch.ones(N, N, device=q.device, dtype=torch.bool).triu(1)
        return cache[key](x, x, x, attn_mask=mask, is_causal=True, need_weights=False)[0]

    return run


def table() -> dict[str, Callable[[], Callable]]:
    """Provider name -> a constructor of its callable (constructed lazily: FlexAttention compiles)."""
    return {
        "ours": lambda: ours,
        "sdpa_flash": lambda: sdpa("FLASH_ATTENTION"),
        "sdpa_cudnn": lambda: sdpa("CUDNN_ATTENTION"),
        "sdpa_efficient": lambda: sdpa("EFFICIENT_ATTENTION"),
        "sdpa_math": lambda: sdpa("MATH"),
        "flex": flex,
        "chapter": lambda: chapter_core,
        "nn_mha": nn_mha,
    }
