"""The layers people import: the chapter's class names, fused.

``from attention import MultiHeadAttention`` instead of the chapter's own class is the whole change;
``attention.swap_attention(model)`` converts a model built from the chapter's layers in place.
The chapter's eager layers themselves live in ``attention.reference``.
"""

from attention.fused import (
    CausalAttention,
    MultiHeadAttention,
    MultiHeadAttentionWrapper,
    SelfAttention_v1,
    SelfAttention_v2,
    simplified_self_attention,
    use_backend,
)
from attention.swap import swap_attention

__all__ = [
    "CausalAttention",
    "MultiHeadAttention",
    "MultiHeadAttentionWrapper",
    "SelfAttention_v1",
    "SelfAttention_v2",
    "simplified_self_attention",
    "swap_attention",
    "use_backend",
]
