"""Triton kernels and the autograd functions that launch them."""

from kernels.flash_attn import flash_attention

__all__ = ["flash_attention"]
