"""Triton kernels and the autograd functions that launch them.

``flash_attention`` (training and prefill: forward, backward, dropout, causal, sliding windows, grouped
heads), ``flash_attention_with_kvcache`` (generation: a KV cache appended in place, a split-KV decode
kernel) and ``MAX_HEAD_DIM``, the largest head dim the Triton kernels take.
"""

from .decode import flash_attention_with_kvcache
from .flash_attn import MAX_HEAD_DIM
from .interface import flash_attention

__all__ = ["MAX_HEAD_DIM", "flash_attention", "flash_attention_with_kvcache"]
