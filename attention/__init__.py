"""The layers people import: the chapter's class names, fused.

``from attention import MultiHeadAttention`` instead of the chapter's own class is the whole change;
``attention.swap_attention(model)`` converts a model built from the book's layers in place (chapter 3,
the KV-cache GPTs, grouped-query, sliding-window and latent attention, Llama 3.2, Qwen3, Gemma 3, OLMo 3,
Tiny Aya, Qwen3.5's gated attention, Gemma 4, the pkg's cached layers and its SDPA "fast" variants, ch06's
non-causal layer, the ch03 bonus notebook's variants), each once its fused forward agrees with its own on a
probe, and ``attention.fused_layers(model)`` lists what is fused.
The chapter's eager layers themselves live in ``attention.reference``; the bonus models' fused layers in
``attention.kv_cache``, ``attention.kv_cache_optimized``, ``attention.kv_cache_pkg``, ``attention.gqa``,
``attention.swa``, ``attention.mla``, ``attention.llama3``, ``attention.qwen3``, ``attention.gemma3``,
``attention.olmo3``, ``attention.tiny_aya``, ``attention.qwen3_5``, ``attention.gemma4``, ``attention.fast``,
``attention.noncausal`` and ``attention.bonus`` (the ch03 bonus notebook's variants).
"""

from .fused import (
    CausalAttention,
    MultiHeadAttention,
    MultiHeadAttentionWrapper,
    SelfAttention_v1,
    SelfAttention_v2,
    simplified_self_attention,
    use_backend,
)
from .swap import fused_layers, swap_attention

__all__ = [
    "CausalAttention",
    "MultiHeadAttention",
    "MultiHeadAttentionWrapper",
    "SelfAttention_v1",
    "SelfAttention_v2",
    "fused_layers",
    "simplified_self_attention",
    "swap_attention",
    "use_backend",
]
