"""Padded batches to packed ones and back: FlashAttention-2's ``bert_padding`` helpers, same names and returns.

A caller holding ``(B, N, ...)`` activations and a ``(B, N)`` padding mask (True / 1 where a token is real, any
pattern: right-padded, left-padded, holes) packs them with ``unpad_input`` for ``flash_attention_varlen`` and
scatters the result back with ``pad_input``.

Host syncs: ``pad_input`` has none. ``unpad_input`` has exactly one on a device, unavoidable: the packed tensor's
length (the number of real tokens) and ``max_seqlen`` (an int, as the varlen call wants it) are data the host
must know. Both are read in one copy, and the token indices are then gathered with that length known
(``torch.nonzero_static``), so ``nonzero`` adds no second sync. With the mask on the CPU nothing syncs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_mask(x: torch.Tensor, padding_mask: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(padding_mask, torch.Tensor):
        raise TypeError("hidden_states and padding_mask must be torch.Tensors")
    if padding_mask.dim() != 2 or x.dim() < 2 or tuple(x.shape[:2]) != tuple(padding_mask.shape):
        raise ValueError(
            f"hidden_states (B, N, ...) and padding_mask (B, N) must agree, got {tuple(x.shape)} and "
            f"{tuple(padding_mask.shape)}"
        )
    if padding_mask.dtype.is_floating_point or padding_mask.dtype.is_complex:
        raise TypeError(f"padding_mask must be bool or integer (1: a real token), got {padding_mask.dtype}")
    if padding_mask.device != x.device:
        raise ValueError(f"padding_mask is on {padding_mask.device}, hidden_states on {x.device}")


def unpad_input(hidden_states: torch.Tensor, padding_mask: torch.Tensor):
    """``(B, N, ...)`` and a ``(B, N)`` mask (True / nonzero: a real token) -> the real tokens packed.

    Returns ``(packed, indices, cu_seqlens, max_seqlen, seqused)`` as FlashAttention-2's ``unpad_input``:
    packed ``(total, ...)``, the real tokens in row-major order; indices ``(total,)`` int64, their rows in
    ``hidden_states.reshape(B * N, ...)``; cu_seqlens int32 ``(B + 1,)``; max_seqlen an int; seqused int32 ``(B,)``,
    the real tokens per sequence. One host sync on a device (module docstring). Differentiable in hidden_states.
    """
    _check_mask(hidden_states, padding_mask)
    B, N = padding_mask.shape
    mask = padding_mask != 0  # (B, N) bool
    seqused = mask.sum(dim=1, dtype=torch.int32)  # (B,)
    cu_seqlens = F.pad(torch.cumsum(seqused, dim=0, dtype=torch.int32), (1, 0))  # (B + 1,)
    longest = seqused.max() if B else seqused.new_zeros(())
    total, max_seqlen = torch.stack([cu_seqlens[-1], longest]).tolist()  # the one sync
    indices = torch.nonzero_static(mask.flatten(), size=total).flatten()  # (total,): no sync of its own
    packed = hidden_states.reshape(B * N, *hidden_states.shape[2:])[indices]  # (total, ...)
    return packed, indices, cu_seqlens, max_seqlen, seqused


def pad_input(hidden_states: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """The inverse: packed ``(total, ...)`` back to ``(batch, seqlen, ...)``, zeros at the padding. No host sync;
    differentiable in hidden_states."""
    if not isinstance(hidden_states, torch.Tensor) or not isinstance(indices, torch.Tensor):
        raise TypeError("hidden_states and indices must be torch.Tensors")
    if indices.dim() != 1 or indices.shape[0] != hidden_states.shape[0]:
        raise ValueError(
            f"indices must be (total,) with total = hidden_states.shape[0] = {hidden_states.shape[0]}, "
            f"got {tuple(indices.shape)}"
        )
    for name, n in (("batch", batch), ("seqlen", seqlen)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{name} must be an int >= 0, got {n!r}")
    rest = hidden_states.shape[1:]
    out = hidden_states.new_zeros((batch * seqlen, *rest)).index_put((indices,), hidden_states)  # (B * N, ...)
    return out.reshape(batch, seqlen, *rest)
