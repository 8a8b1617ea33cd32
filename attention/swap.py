"""``swap_attention``: turn the chapter's attention layers inside an existing model into the fused ones."""

from __future__ import annotations

import logging

import torch
from torch import nn

from attention import fused, reference

log = logging.getLogger(__name__)

_FUSED = {
    "SelfAttention_v1": fused.SelfAttention_v1,
    "SelfAttention_v2": fused.SelfAttention_v2,
    "CausalAttention": fused.CausalAttention,
    "MultiHeadAttentionWrapper": fused.MultiHeadAttentionWrapper,
    "MultiHeadAttention": fused.MultiHeadAttention,
}

# What each chapter class holds, by name: what a faithful conversion needs and may not exceed.
_LAYOUT = {
    "SelfAttention_v1": (("W_query", "W_key", "W_value"), (), ()),
    "SelfAttention_v2": ((), ("W_query", "W_key", "W_value"), ()),
    "CausalAttention": ((), ("W_query", "W_key", "W_value", "dropout"), ("mask",)),
    "MultiHeadAttentionWrapper": ((), ("heads",), ()),
    "MultiHeadAttention": ((), ("W_query", "W_key", "W_value", "out_proj", "dropout"), ("mask",)),
}


def _refuse(name: str, module: nn.Module, why: str) -> ValueError:
    return ValueError(f"cannot swap {name or '<root>'} ({type(module).__qualname__}) faithfully: {why}")


def _check_linear(name: str, module: nn.Module, attr: str, d_in: int, d_out: int) -> None:
    lin = getattr(module, attr)
    if type(lin) is not nn.Linear or (lin.in_features, lin.out_features) != (d_in, d_out):
        raise _refuse(name, module, f"{attr} is not nn.Linear({d_in}, {d_out})")


def _check_mask(name: str, module: nn.Module) -> None:
    mask = module.mask
    n = mask.shape[0] if mask.dim() == 2 else -1
    causal = torch.triu(torch.ones(n, n, device=mask.device), diagonal=1) if n >= 0 else None
    if causal is None or mask.shape != causal.shape or not torch.equal(mask.bool(), causal.bool()):
        raise _refuse(name, module, "its mask buffer is not the chapter's causal triu(ones, 1)")


def _check_layout(name: str, module: nn.Module, cls_name: str) -> None:
    params, children, buffers = _LAYOUT[cls_name]
    have_params = set(module._parameters)
    have_children = set(module._modules)
    have_buffers = set(module._buffers)
    if have_params != set(params) or have_children != set(children) or have_buffers != set(buffers):
        raise _refuse(
            name,
            module,
            f"expected parameters {sorted(params)}, submodules {sorted(children)}, buffers {sorted(buffers)}; "
            f"found {sorted(have_params)}, {sorted(have_children)}, {sorted(have_buffers)} "
            "(a KV cache or other extension is not supported)",
        )
    if cls_name == "SelfAttention_v1":
        shapes = {tuple(module._parameters[p].shape) for p in params}
        if len(shapes) != 1 or len(shapes.pop()) != 2:
            raise _refuse(name, module, "W_query, W_key, W_value must be (d_in, d_out) matrices of one shape")
        return
    if cls_name == "MultiHeadAttentionWrapper":
        heads = module.heads
        # Heads that are chapter CausalAttention layers are checked (and swapped) as layers of their own.
        ok = isinstance(heads, nn.ModuleList) and all(
            type(h) is fused.CausalAttention or _chapter_class(h) == "CausalAttention" for h in heads
        )
        if not ok:
            raise _refuse(name, module, "heads must be a ModuleList of CausalAttention layers")
        return
    d_in, d_out = module.W_query.in_features, module.W_query.out_features
    for attr in ("W_query", "W_key", "W_value"):
        _check_linear(name, module, attr, d_in, d_out)
    if cls_name in ("CausalAttention", "MultiHeadAttention"):
        if type(module.dropout) is not nn.Dropout:
            raise _refuse(name, module, "dropout is not nn.Dropout")
        _check_mask(name, module)
        if getattr(module, "d_out", None) != d_out:
            raise _refuse(name, module, f"attribute d_out {getattr(module, 'd_out', None)} != projection width {d_out}")
    if cls_name == "MultiHeadAttention":
        _check_linear(name, module, "out_proj", d_out, d_out)
        nh, hd = getattr(module, "num_heads", None), getattr(module, "head_dim", None)
        if not isinstance(nh, int) or nh < 1 or hd != d_out // nh or d_out % nh:
            raise _refuse(name, module, f"num_heads {nh} and head_dim {hd} do not split d_out {d_out}")


def _chapter_class(module: nn.Module) -> str | None:
    """The chapter class name this module is an instance of, or a look-alike copy of; None otherwise."""
    cls = type(module)
    if cls in _FUSED.values():
        return None  # already fused
    for name in _FUSED:
        if cls is getattr(reference, name) or cls.__name__ == name:
            return name
    return None


def swap_attention(model: nn.Module) -> nn.Module:
    """Replace, in place, every chapter-3 attention layer in ``model`` by its fused drop-in.

    Converts instances of ``attention.reference``'s classes and of any class with a chapter class's
    name and attribute layout (a reader's own copy of the book's code). The module objects stay the
    same (their class changes), so Parameters, buffers, hooks, train/eval mode and any optimizer built
    before the swap carry over. A look-alike that cannot be converted faithfully (extra buffers such as
    a KV cache, other submodules, a non-causal mask) raises ``ValueError`` before anything is changed.
    Each swap is logged at INFO level on the ``attention.swap`` logger.

    Returns the model (the same object, or the model's own class changed when the root is a layer).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"swap_attention expects an nn.Module, got {type(model).__name__}")
    todo = [(name, m, cls) for name, m in model.named_modules() if (cls := _chapter_class(m)) is not None]
    # Check every layer first, so a refusal leaves the model untouched.
    for name, module, cls in todo:
        _check_layout(name, module, cls)
    for name, module, cls in todo:
        log.info("swap_attention: %s: %s -> %s", name or "<root>", type(module).__qualname__, _FUSED[cls].__qualname__)
        module.__class__ = _FUSED[cls]
    log.info("swap_attention: %d layer(s) swapped", len(todo))
    return model
