"""Fused attention for readers of *Build a Large Language Model (From Scratch)*, installed under one name.

The repository keeps two top-level folders, ``kernels/`` (Triton kernels and the functions that launch them)
and ``attention/`` (the book's layers, fused). They install as ``chapter3_flash.kernels`` and
``chapter3_flash.attention``: one top-level import name of our own, as FlashAttention installs as ``flash_attn``,
so that nothing of ours lands in another distribution's folder (Hugging Face's hub-kernel loader is the top-level
package ``kernels``)::

    from chapter3_flash.attention import MultiHeadAttention, swap_attention
    from chapter3_flash.kernels import flash_attention
"""
