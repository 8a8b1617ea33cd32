"""Fused attention for readers of *Build a Large Language Model (From Scratch)*, installed under one name.

The repository keeps two top-level folders, ``kernels/`` (Triton kernels and the functions that launch them)
and ``attention/`` (the book's layers, fused). They install as ``chapter3_flash.kernels`` and
``chapter3_flash.attention``: one top-level import name of our own, as FlashAttention installs as ``flash_attn``,
so that nothing of ours lands in another distribution's folder (Hugging Face's hub-kernel loader is the top-level
package ``kernels``)::

    from chapter3_flash.attention import MultiHeadAttention, swap_attention
    from chapter3_flash.kernels import flash_attention
"""

import os as _os

# In a checkout (the repository, or an editable install of it) the subpackages are the folders beside this one: the
# package's path includes the checkout, so ``chapter3_flash.kernels`` is the ``kernels/`` of the tree this file is
# in, whatever else an editable install maps (a second worktree of the repository imports its own code).
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "kernels")) and _os.path.isdir(_os.path.join(_checkout, "kernels")):
    __path__.append(_checkout)
