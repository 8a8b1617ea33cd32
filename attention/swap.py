"""``swap_attention``: turn the book's attention layers inside an existing model into the fused ones.

Recognised by class name, attribute layout and forward signature (a reader's own copy of the book's
code, or ours from ``attention.reference``), then verified: the layer's own forward and the fused one
must agree on a probe (``attention.probe``) before any layer is converted:

| book                                   | class                        | fused                              |
|----------------------------------------|------------------------------|------------------------------------|
| chapter 3                              | the five chapter classes     | ``attention.<name>``               |
| ch04/03_kv-cache                       | ``MultiHeadAttention`` (KV)  | ``attention.kv_cache``             |
| ch04/03_kv-cache (optimized)           | ``MultiHeadAttention``       | ``attention.kv_cache_optimized``   |
| ch04/04_gqa                            | ``GroupedQueryAttention``    | ``attention.gqa``                  |
| ch04/04_gqa, 06_swa gpt_with_kv_mha    | ``MultiHeadAttention``       | ``attention.swa``                  |
| ch04/06_swa                            | ``MultiHeadAttentionWithSWA``| ``attention.swa``                  |
| Llama 3.2 (pkg llama3.py)              | ``GroupedQueryAttention``    | ``attention.llama3``               |
| Qwen3 (pkg qwen3.py)                   | ``GroupedQueryAttention``    | ``attention.qwen3``                |
| Gemma 3 (ch05/12_gemma3)               | ``GroupedQueryAttention``    | ``attention.gemma3``               |
| pkg kv_cache gpt2.py                   | ``MultiHeadAttention``       | ``attention.kv_cache_pkg``         |
| pkg kv_cache llama3.py, qwen3.py       | ``GroupedQueryAttention``    | ``attention.kv_cache_pkg``         |
| Gemma 3 with a KV cache (notebook)     | ``GroupedQueryAttention``    | ``attention.kv_cache_pkg``         |
| pkg ch03 bonus (``GPTModelFast``)      | ``PyTorchMultiHeadAttention``| ``attention.fast``                 |
| pkg llama3.py (``Llama3ModelFast``)    | ``GroupedQueryAttentionFast``| ``attention.fast``                 |
| ch03/02 bonus notebook                 | its five variants (below)    | ``attention.bonus``                |
| ch03/03_understanding-buffers          | ``CausalAttentionWith(out)Buffer(s)`` | ``attention.bonus``        |
| PyTorch                                | ``nn.MultiheadAttention``    | ``attention.bonus``                |
| ch06/02 additional experiments         | ``MultiHeadAttention``,      | ``attention.noncausal``            |
|                                        | ``disable_causal_mask=True`` |                                    |
| OLMo 3 (ch05/13, both notebooks)       | ``GroupedQueryAttention``    | ``attention.olmo3``                |
| Tiny Aya (ch05/15, both notebooks)     | ``GroupedQueryAttention``    | ``attention.tiny_aya``             |
| Qwen3.5 gated attention (ch05/16)      | ``GroupedQueryAttention``    | ``attention.qwen3_5``              |
| Gemma 4 (ch05/17, both notebooks)      | ``Gemma4Attention``          | ``attention.gemma4``               |
| ch04/05_mla                            | ``MultiHeadLatentAttention`` | ``attention.mla``                  |

The notebook's variants: ``MultiHeadAttentionCombinedQKV``, ``MHAEinsum``, ``MHAPyTorchScaledDotProduct``,
``MHAPyTorchSDPAWithoutFlash`` (as written it is not causal: refused by the probe, with that reason) and
``MHAPyTorchClass`` (refused with ``add_bias_kv``). ``nn.MultiheadAttention`` is converted where some call can be
fused (batch first, one embed dim, no ``add_bias_kv``); its other calls run PyTorch's forward.

With ``verify=True`` (the default), a chapter-3 class under another name (the ch03 bonus notebook's ``Ch03_MHA``)
is recognised by its structure alone (the chapter's parameters, submodules, buffers and attributes, and a
``forward(x)``) and converted once the probe agrees; one that does not agree is left alone with a warning that
says why. With ``verify=False`` only the names above are recognised: structure alone is never enough unchecked.

Projections may be any module that maps the same widths (the book's LoRA wrapper, quantized linears):
the fused layers call them as the book's code does. The pkg package's cached variants, whose forward takes
``(..., start_pos, cache)`` and returns ``(context, next_cache)`` with the cache held by the caller, keep that
contract; so does its batched Qwen3 layer (``kv_cache_batched``: a position and a cache per sequence).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import warnings

import torch
from torch import nn

from . import (
    bonus,
    fast,
    fused,
    gemma3,
    gemma4,
    gqa,
    kv_cache,
    kv_cache_optimized,
    kv_cache_pkg,
    llama3,
    mla,
    noncausal,
    olmo3,
    probe,
    qwen3,
    qwen3_5,
    reference,
    swa,
    tiny_aya,
)

log = logging.getLogger(__name__)

_CHAPTER = {
    "SelfAttention_v1": fused.SelfAttention_v1,
    "SelfAttention_v2": fused.SelfAttention_v2,
    "CausalAttention": fused.CausalAttention,
    "MultiHeadAttentionWrapper": fused.MultiHeadAttentionWrapper,
    "MultiHeadAttention": fused.MultiHeadAttention,
}
FUSED_CLASSES = tuple(_CHAPTER.values()) + (
    kv_cache.MultiHeadAttention,
    kv_cache_optimized.MultiHeadAttention,
    gqa.GroupedQueryAttention,
    swa.MultiHeadAttentionWithSWA,
    swa.MultiHeadAttention,
    llama3.GroupedQueryAttention,
    qwen3.GroupedQueryAttention,
    gemma3.GroupedQueryAttention,
    kv_cache_pkg.MultiHeadAttention,
    kv_cache_pkg.Llama3GroupedQueryAttention,
    kv_cache_pkg.Qwen3GroupedQueryAttention,
    kv_cache_pkg.Gemma3GroupedQueryAttention,
    kv_cache_pkg.Qwen3BatchedGroupedQueryAttention,
    fast.PyTorchMultiHeadAttention,
    fast.GroupedQueryAttentionFast,
    noncausal.MultiHeadAttention,
    bonus.MultiHeadAttentionCombinedQKV,
    bonus.MHAEinsum,
    bonus.MHAPyTorchScaledDotProduct,
    bonus.MHAPyTorchSDPAWithoutFlash,
    bonus.MHAPyTorchClass,
    bonus.MultiheadAttention,
    bonus.CausalAttentionWithBuffer,
    bonus.CausalAttentionWithoutBuffers,
    tiny_aya.GroupedQueryAttention,
    olmo3.GroupedQueryAttention,
    qwen3_5.GroupedQueryAttention,
    gemma4.Gemma4Attention,
    mla.MultiHeadLatentAttention,
)


@dataclasses.dataclass(frozen=True)
class _Kind:
    """One book class: what a faithful conversion needs and may not exceed."""

    book: str
    target: type
    params: tuple = ()
    children: tuple = ()
    buffers: tuple = ()
    optional_children: tuple = ()  # submodules the book's constructor may leave as None (QK-norm)
    attrs: tuple = ()  # plain attributes the fused forward reads
    probe: str = "plain"  # the calls the family takes, for the check that the fused forward agrees (_probe_of)


_PROJECTIONS = ("W_query", "W_key", "W_value")
_KINDS = {
    "SelfAttention_v1": _Kind("chapter 3", fused.SelfAttention_v1, params=_PROJECTIONS, probe="tokens"),
    "SelfAttention_v2": _Kind("chapter 3", fused.SelfAttention_v2, children=_PROJECTIONS, probe="tokens"),
    "CausalAttention": _Kind(
        "chapter 3", fused.CausalAttention, children=_PROJECTIONS + ("dropout",), buffers=("mask",), attrs=("d_out",)
    ),
    "MultiHeadAttentionWrapper": _Kind("chapter 3", fused.MultiHeadAttentionWrapper, children=("heads",)),
    "MultiHeadAttention": _Kind(
        "chapter 3",
        fused.MultiHeadAttention,
        children=_PROJECTIONS + ("out_proj", "dropout"),
        buffers=("mask",),
        attrs=("d_out", "num_heads", "head_dim"),
    ),
    "ch06:MultiHeadAttention": _Kind(
        "ch06/02_bonus_additional-experiments (disable_causal_mask=True)",
        noncausal.MultiHeadAttention,
        children=_PROJECTIONS + ("out_proj", "dropout"),
        attrs=("d_out", "num_heads", "head_dim", "disable_causal_mask"),
    ),
    "kv:MultiHeadAttention": _Kind(
        "ch04/03_kv-cache",
        kv_cache.MultiHeadAttention,
        children=_PROJECTIONS + ("out_proj", "dropout"),
        buffers=("mask", "cache_k", "cache_v"),
        attrs=("d_out", "num_heads", "head_dim", "ptr_current_pos"),
        probe="cached",
    ),
    "kvopt:MultiHeadAttention": _Kind(
        "ch04/03_kv-cache optimized",
        kv_cache_optimized.MultiHeadAttention,
        children=_PROJECTIONS + ("out_proj", "dropout"),
        buffers=("cache_k", "cache_v"),
        attrs=("d_out", "num_heads", "head_dim", "window_size", "max_seq_len"),
        probe="cached",
    ),
    "kvmha:MultiHeadAttention": _Kind(
        "ch04/04_gqa and ch04/06_swa gpt_with_kv_mha",
        swa.MultiHeadAttention,
        children=_PROJECTIONS + ("out_proj", "dropout"),
        buffers=("cache_k", "cache_v"),
        attrs=("d_out", "num_heads", "head_dim", "ptr_current_pos"),
        probe="cached",
    ),
    "gqa:GroupedQueryAttention": _Kind(
        "ch04/04_gqa",
        gqa.GroupedQueryAttention,
        children=_PROJECTIONS + ("out_proj", "dropout"),
        buffers=("cache_k", "cache_v"),
        attrs=("d_out", "num_heads", "head_dim", "num_kv_groups", "group_size", "ptr_current_pos"),
        probe="cached",
    ),
    "MultiHeadAttentionWithSWA": _Kind(
        "ch04/06_swa",
        swa.MultiHeadAttentionWithSWA,
        children=_PROJECTIONS + ("out_proj", "dropout"),
        buffers=("cache_k", "cache_v"),
        attrs=("d_out", "num_heads", "head_dim", "sliding_window_size", "ptr_current_pos"),
        probe="cached",
    ),
    "llama3:GroupedQueryAttention": _Kind(
        "Llama 3.2",
        llama3.GroupedQueryAttention,
        children=_PROJECTIONS + ("out_proj",),
        attrs=("d_out", "num_heads", "head_dim", "num_kv_groups"),
        probe="rope",
    ),
    "qwen3:GroupedQueryAttention": _Kind(
        "Qwen3",
        qwen3.GroupedQueryAttention,
        children=_PROJECTIONS + ("out_proj",),
        optional_children=("q_norm", "k_norm"),
        attrs=("d_out", "num_heads", "head_dim", "num_kv_groups"),
        probe="rope",
    ),
    "gemma3:GroupedQueryAttention": _Kind(
        "Gemma 3",
        gemma3.GroupedQueryAttention,
        children=_PROJECTIONS + ("out_proj",),
        optional_children=("q_norm", "k_norm"),
        attrs=("d_out", "num_heads", "head_dim", "num_kv_groups", "scaling"),
        probe="rope_local",
    ),
    "pkgkv:MultiHeadAttention": _Kind(
        "pkg kv_cache gpt2.py",
        kv_cache_pkg.MultiHeadAttention,
        children=_PROJECTIONS + ("out_proj", "dropout"),
        attrs=("d_out", "num_heads", "head_dim"),
        probe="pkg",
    ),
    "pkgkv:llama3": _Kind(
        "pkg kv_cache llama3.py",
        kv_cache_pkg.Llama3GroupedQueryAttention,
        children=_PROJECTIONS + ("out_proj",),
        attrs=("d_out", "num_heads", "head_dim", "num_kv_groups"),
        probe="pkg_rope",
    ),
    "pkgkv:qwen3": _Kind(
        "pkg kv_cache qwen3.py",
        kv_cache_pkg.Qwen3GroupedQueryAttention,
        children=_PROJECTIONS + ("out_proj",),
        optional_children=("q_norm", "k_norm"),
        attrs=("d_out", "num_heads", "head_dim", "num_kv_groups"),
        probe="pkg_rope",
    ),
    "pkgkv:gemma3": _Kind(
        "Gemma 3 with a KV cache",
        kv_cache_pkg.Gemma3GroupedQueryAttention,
        children=_PROJECTIONS + ("out_proj",),
        optional_children=("q_norm", "k_norm"),
        attrs=("d_out", "num_heads", "head_dim", "num_kv_groups", "scaling"),
        probe="pkg_rope_local",
    ),
    "pkgkvb:qwen3": _Kind(
        "pkg kv_cache_batched qwen3.py",
        kv_cache_pkg.Qwen3BatchedGroupedQueryAttention,
        children=_PROJECTIONS + ("out_proj",),
        optional_children=("q_norm", "k_norm"),
        attrs=("d_out", "num_heads", "head_dim", "num_kv_groups"),
        probe="pkg_batched",
    ),
    "PyTorchMultiHeadAttention": _Kind(
        "pkg ch03 bonus (GPTModelFast)",
        fast.PyTorchMultiHeadAttention,
        children=("qkv", "proj"),
        attrs=("d_out", "num_heads", "head_dim", "dropout"),
    ),
    "GroupedQueryAttentionFast": _Kind(
        "pkg llama3.py (Llama3ModelFast)",
        fast.GroupedQueryAttentionFast,
        children=_PROJECTIONS + ("out_proj",),
        attrs=("d_out", "num_heads", "head_dim", "num_kv_groups"),
        probe="rope_causal",
    ),
}


def _newer_gqa_kind(book: str, target: type, probe: str, extra: tuple = (), qk_norm_required: bool = False) -> _Kind:
    """A ch05/13-16 GroupedQueryAttention: the Qwen3 layout (projections, out_proj, QK-norms) plus ``extra``
    attributes, checked by the ``probe`` family; OLMo 3 always builds its QK-norms, the others only with
    ``qk_norm=True``."""
    norms = ("q_norm", "k_norm")
    children = _PROJECTIONS + ("out_proj",) + (norms if qk_norm_required else ())
    optional = () if qk_norm_required else norms
    attrs = ("d_out", "num_heads", "head_dim", "num_kv_groups") + extra
    return _Kind(book, target, children=children, optional_children=optional, attrs=attrs, probe=probe)


# The newer models of ch05, told apart by what their constructors keep (_newer_gqa); ":kv": the KV-cache notebook's.
_OLMO3_ATTRS = ("attn_type", "sliding_window")
# Probes: the layer's calls with the causal and a sliding-window mask (OLMo 3 and Tiny Aya have sliding layers),
# the KV-cache notebooks' over a prompt, a token and chunks with the caches they return.
_KINDS |= {
    "tiny_aya": _newer_gqa_kind("Tiny Aya (ch05/15)", tiny_aya.GroupedQueryAttention, "rope_local", ("attn_type",)),
    "tiny_aya:kv": _newer_gqa_kind(
        "Tiny Aya with a KV cache", tiny_aya.KVGroupedQueryAttention, "pkg_rope_local", ("attn_type",)
    ),
    "olmo3": _newer_gqa_kind("OLMo 3 (ch05/13)", olmo3.GroupedQueryAttention, "rope_local", _OLMO3_ATTRS, True),
    "olmo3:kv": _newer_gqa_kind(
        "OLMo 3 with a KV cache", olmo3.KVGroupedQueryAttention, "pkg_rope_local", _OLMO3_ATTRS, True
    ),
    "qwen3_5": _newer_gqa_kind("Qwen3.5 gated attention (ch05/16)", qwen3_5.GroupedQueryAttention, "rope"),
    "qwen3_5:kv": _newer_gqa_kind(
        "Qwen3.5 gated attention with a KV cache", qwen3_5.KVGroupedQueryAttention, "pkg_rope"
    ),
}
_GEMMA4 = {
    "children": ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "v_norm"),
    "attrs": ("head_dim", "num_heads", "num_kv_heads", "num_key_value_groups", "is_kv_shared_layer"),
}
_KINDS["gemma4"] = _Kind("Gemma 4 (ch05/17)", gemma4.Gemma4Attention, **_GEMMA4, probe="gemma4")
_KINDS["gemma4:kv"] = _Kind("Gemma 4 with a KV cache (ch05/17)", gemma4.KVGemma4Attention, **_GEMMA4, probe="gemma4_kv")
_KINDS["MultiHeadLatentAttention"] = _Kind(
    "ch04/05_mla",
    mla.MultiHeadLatentAttention,
    children=("W_query", "W_DKV", "W_UK", "W_UV", "out_proj", "dropout"),
    buffers=("cache_c_kv",),
    attrs=("d_out", "num_heads", "head_dim", "latent_dim", "ptr_current_pos"),
    probe="cached",
)
_NAMES = {"MultiHeadAttention", "GroupedQueryAttention", "MultiHeadAttentionWithSWA", *_CHAPTER}
_NAMES |= {"PyTorchMultiHeadAttention", "GroupedQueryAttentionFast"}
_BONUS = "ch03/02_bonus_efficient-multihead-attention"
_QKV = ("num_heads", "head_dim", "d_out", "dropout", "context_length")  # the notebook's SDPA classes' attributes
_KINDS.update(
    {
        "MultiHeadAttentionCombinedQKV": _Kind(
            _BONUS,
            bonus.MultiHeadAttentionCombinedQKV,
            children=("qkv", "proj", "dropout"),
            buffers=("mask",),
            attrs=("num_heads", "head_dim", "context_length"),
        ),
        "MHAEinsum": _Kind(
            _BONUS,
            bonus.MHAEinsum,
            params=_PROJECTIONS + ("bias_q", "bias_k", "bias_v"),
            children=("out_proj", "dropout"),
            buffers=("mask",),
            attrs=("d_out", "num_heads", "head_dim"),
        ),
        "MHAPyTorchScaledDotProduct": _Kind(
            _BONUS, bonus.MHAPyTorchScaledDotProduct, children=("qkv", "proj"), attrs=_QKV
        ),
        "MHAPyTorchSDPAWithoutFlash": _Kind(
            _BONUS, bonus.MHAPyTorchSDPAWithoutFlash, children=("qkv", "proj"), buffers=("mask",), attrs=_QKV
        ),
        "MHAPyTorchClass": _Kind(
            _BONUS,
            bonus.MHAPyTorchClass,
            children=("multihead_attn", "proj"),
            buffers=("mask",),
            attrs=("context_length", "need_weights"),
        ),
        "nn.MultiheadAttention": _Kind(
            "PyTorch's nn.MultiheadAttention (as the ch03 bonus notebook's MHAPyTorchClass calls it)",
            bonus.MultiheadAttention,
            params=("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias"),
            children=("out_proj",),
            buffers=(),
            probe="mha",
        ),
        "CausalAttentionWithBuffer": _Kind(
            "ch03/03_understanding-buffers",
            bonus.CausalAttentionWithBuffer,
            children=_PROJECTIONS + ("dropout",),
            buffers=("mask",),
            attrs=("d_out",),
        ),
        "CausalAttentionWithoutBuffers": _Kind(
            "ch03/03_understanding-buffers",
            bonus.CausalAttentionWithoutBuffers,
            children=_PROJECTIONS + ("dropout",),
            attrs=("d_out", "mask"),
        ),
    }
)
_NAMES |= {k for k in _KINDS if k[0].isupper() and ":" not in k}  # the class names among the keys
_NAMES |= {"PyTorchMultiHeadAttention", "GroupedQueryAttentionFast", "Gemma4Attention", "MultiHeadLatentAttention"}


def _refuse(name: str, module: nn.Module, why: str) -> ValueError:
    return ValueError(f"cannot swap {name or '<root>'} ({type(module).__qualname__}) faithfully: {why}")


def _forward_args(module: nn.Module) -> tuple[str, ...]:
    try:
        params = inspect.signature(type(module).forward).parameters
    except (TypeError, ValueError):
        return ()
    return tuple(params)[1:]


def _kind_of(name: str, module: nn.Module) -> str | None:
    """The _KINDS key of a book layer (or a look-alike to check and refuse), None for anything else."""
    cls = type(module)
    if cls is nn.MultiheadAttention:
        # PyTorch's own: converted where some call can be fused (batch first, one embed dim for q, k, v, no
        # add_bias_kv); its fused class runs PyTorch's forward, exactly, for every call the kernel does not compute.
        fusable = module.batch_first and module._qkv_same_embed_dim and module.bias_k is None
        return "nn.MultiheadAttention" if fusable else None
    if "GatedDeltaNet" in cls.__name__ and not isinstance(module, FUSED_CLASSES):
        log.info(
            "swap_attention: %s (%s) left as the book's: Qwen3.5's Gated DeltaNet is linear attention (a recurrent "
            "state, no softmax over keys), which this kernel does not compute",
            name or "<root>",
            cls.__qualname__,
        )
        return None
    if isinstance(module, FUSED_CLASSES) or cls.__name__ not in _NAMES:
        return None
    args = _forward_args(module)
    if cls.__name__ == "Gemma4Attention":
        return "gemma4:kv" if "start_pos" in args or "cache" in args else "gemma4"
    if cls.__name__ == "GroupedQueryAttention" and (newer := _newer_gqa(module)) is not None:
        return newer + (":kv" if "start_pos" in args or "cache" in args else "")
    if "start_pos" in args or "cache" in args:  # the pkg's variants: the caller holds the cache
        if "batched" in cls.__module__:
            if cls.__name__ == "GroupedQueryAttention" and hasattr(module, "q_norm") and not hasattr(module, "scaling"):
                return "pkgkvb:qwen3"  # kv_cache_batched/qwen3.py: a position per sequence, a list of caches
            raise _refuse(
                name,
                module,
                f"it is a {cls.__name__} of the pkg's kv_cache_batched package, whose caller passes a position and a "
                "cache per sequence; expected that package's Qwen3 GroupedQueryAttention, the one batched layer the "
                "fused classes keep that contract for: converting another would misplace its caches",
            )
        if cls.__name__ == "MultiHeadAttention":
            return "pkgkv:MultiHeadAttention"
        if cls.__name__ == "GroupedQueryAttention":
            if hasattr(module, "scaling"):
                return "pkgkv:gemma3"
            return "pkgkv:qwen3" if hasattr(module, "q_norm") else "pkgkv:llama3"
        raise _refuse(
            name,
            module,
            f"its forward takes (start_pos, cache) as the pkg's KV-cache layers do, but it is a {cls.__name__}, "
            "expected the pkg's MultiHeadAttention or GroupedQueryAttention: no fused layer keeps that caller-held "
            "cache contract for it, and guessing one would misplace its cache",
        )
    if cls.__name__ == "MultiHeadAttention":
        no_mask = "mask" not in module._buffers and "cache_k" not in module._buffers
        if no_mask and getattr(module, "disable_causal_mask", None) is True:
            return "ch06:MultiHeadAttention"  # the classification experiments': every token sees every token
        if "mask" not in module._buffers and "cache_k" in module._buffers:
            if hasattr(module, "window_size"):
                return "kvopt:MultiHeadAttention"  # the optimized variant: a preallocated rolling cache, no mask
            return "kvmha:MultiHeadAttention"  # the bonus folders' baseline: a growing cache, no mask, no length
        return "kv:MultiHeadAttention" if "use_cache" in args or "cache_k" in module._buffers else "MultiHeadAttention"
    if cls.__name__ == "GroupedQueryAttention":
        if "use_cache" in args or "cache_k" in module._buffers:
            return "gqa:GroupedQueryAttention"
        if hasattr(module, "scaling"):
            return "gemma3:GroupedQueryAttention"
        return "qwen3:GroupedQueryAttention" if hasattr(module, "q_norm") else "llama3:GroupedQueryAttention"
    return cls.__name__


_CHAPTER_KINDS = tuple(_CHAPTER)  # the chapter-3 kinds: recognised by structure too (with verification)


def _structural_kind(module: nn.Module) -> str | None:
    """The chapter-3 kind a class of another name is laid out as (its parameters, submodules, buffers, attributes and
    a one-argument forward), or None. Evidence only: the probe decides (swap_attention)."""
    cls = type(module)
    if isinstance(module, FUSED_CLASSES) or cls.__name__ in _NAMES or len(_forward_args(module)) != 1:
        return None
    children = {c for c, m in module._modules.items() if m is not None}
    for key in _CHAPTER_KINDS:
        kind = _KINDS[key]
        if (
            set(module._parameters) == set(kind.params)
            and children == set(kind.children)
            and set(module._buffers) == set(kind.buffers)
            and all(hasattr(module, a) for a in kind.attrs)
        ):
            return key
    return None


def _newer_gqa(module: nn.Module) -> str | None:
    """The ch05/13-16 layer a GroupedQueryAttention is, by what only its constructor keeps: OLMo 3 an
    ``attn_type`` and a ``sliding_window``, Tiny Aya an ``attn_type`` alone, Qwen3.5 a query projection twice
    ``d_out`` wide (its output gate); None for the older ones (Llama 3.2, Qwen3, Gemma 3, ch04's)."""
    if hasattr(module, "attn_type"):
        return "olmo3" if hasattr(module, "sliding_window") else "tiny_aya"
    d_out = getattr(module, "d_out", None)
    query = getattr(module, "W_query", None)
    if isinstance(d_out, int) and isinstance(query, nn.Module) and widths(query)[1] == 2 * d_out:
        return "qwen3_5"
    return None


def widths(projection: nn.Module) -> tuple[int | None, int | None]:
    """(in, out) widths of a projection: an nn.Linear's, or that of the module a wrapper holds as ``.linear``
    (LoRA); None where nothing says."""
    d_in = reference.in_features(projection)
    out = None
    for _ in range(8):
        out = getattr(projection, "out_features", None)
        if isinstance(out, int) or not isinstance(getattr(projection, "linear", None), nn.Module):
            break
        projection = projection.linear
    return d_in, out if isinstance(out, int) else None


def _check_projection(name, module, attr, d_in, d_out) -> None:
    proj = getattr(module, attr)
    if not isinstance(proj, nn.Module):
        raise _refuse(
            name,
            module,
            f"{attr} is {type(proj).__name__}, expected a module (an nn.Linear, or a wrapper of one such as LoRA's) "
            "that the fused forward calls as the book's does",
        )
    got_in, got_out = widths(proj)
    if (d_in is not None and got_in is not None and got_in != d_in) or (got_out is not None and got_out != d_out):
        if attr == "W_query" and got_out == 2 * d_out:
            raise _refuse(
                name,
                module,
                f"W_query maps {got_in} -> {got_out}, twice the {d_out} of its heads (expected {d_in} -> {d_out}): "
                "the query projection also produces an output gate, as Qwen3.5's gated attention (ch05/16) does, "
                "whose context is multiplied by sigmoid(gate) before out_proj. Only Qwen3.5's GroupedQueryAttention "
                "(attention.qwen3_5) has a fused output gate; converting this class to one without it would drop "
                "the gate (and misread half the queries), so it is left to the book",
            )
        raise _refuse(
            name,
            module,
            f"{attr} maps {got_in} -> {got_out}, expected {d_in} -> {d_out} (from d_in, num_heads, num_kv_groups and "
            f"head_dim): the fused forward splits the projections into those heads, so a projection of another width "
            f"is attention of another shape than the book's class",
        )


def _check_layout(name: str, module: nn.Module, key: str) -> None:
    kind = _KINDS[key]
    if key == "nn.MultiheadAttention":
        return  # PyTorch's class, whatever it holds: calls the kernel does not compute run its own forward
    have_children = {c for c, m in module._modules.items() if m is not None}
    want_children = set(kind.children) | {c for c in kind.optional_children if module._modules.get(c) is not None}
    if (
        set(module._parameters) != set(kind.params)
        or have_children != want_children
        or set(module._buffers) != set(kind.buffers)
    ):
        raise _refuse(
            name,
            module,
            f"found parameters {sorted(module._parameters)}, submodules {sorted(have_children)}, buffers "
            f"{sorted(module._buffers)}; expected the {kind.book} layout: parameters {sorted(kind.params)}, "
            f"submodules {sorted(want_children)}, buffers {sorted(kind.buffers)}. The fused layer runs on exactly "
            "those: anything else (a KV cache of another shape, an extra rotary or norm module) would be ignored "
            "or broken by its forward",
        )
    missing = [a for a in kind.attrs if not hasattr(module, a)]
    if missing:
        raise _refuse(
            name,
            module,
            f"attributes {missing} of the {kind.book} class are missing (found none of that name); the fused "
            "forward reads them (head counts, widths, positions), so it could not run",
        )
    if key == "SelfAttention_v1":
        shapes = [tuple(module._parameters[p].shape) for p in kind.params]
        if len(set(shapes)) != 1 or len(shapes[0]) != 2:
            raise _refuse(
                name,
                module,
                f"W_query, W_key, W_value have shapes {shapes}, expected (d_in, d_out) matrices of one shape: the "
                "fused layer attends with one head of width d_out",
            )
        return
    if key == "MultiHeadAttentionWrapper":
        heads = module.heads
        ok = isinstance(heads, nn.ModuleList) and all(
            type(h) is fused.CausalAttention or "CausalAttention" in (_kind_of("", h), _structural_kind(h))
            for h in heads
        )
        if not ok:
            found = type(heads).__name__ if not isinstance(heads, nn.ModuleList) else [type(h).__name__ for h in heads]
            raise _refuse(
                name,
                module,
                f"heads is {found}, expected a ModuleList of the chapter's CausalAttention layers: the fused wrapper "
                "runs them as causal heads in one kernel call",
            )
        return
    if key in ("PyTorchMultiHeadAttention", "MHAPyTorchScaledDotProduct", "MHAPyTorchSDPAWithoutFlash"):
        _check_fused_qkv(name, module)
        if "mask" in kind.buffers:
            _check_mask(name, module)
        return
    if key in _BONUS_CHECKS:
        _BONUS_CHECKS[key](name, module)
        return
    if key.startswith("gemma4"):
        _check_gemma4(name, module)
        return
    if key == "MultiHeadLatentAttention":
        _check_mla(name, module)
        return
    d_in, q_out = widths(module.W_query)
    if key == "SelfAttention_v2":
        for attr in _PROJECTIONS:
            _check_projection(name, module, attr, d_in, q_out)
        return
    d_out = getattr(module, "d_out", q_out)
    heads = getattr(module, "num_heads", 1)
    head_dim = getattr(module, "head_dim", d_out)
    kv_heads = getattr(module, "num_kv_groups", heads)
    if not all(isinstance(v, int) and v >= 1 for v in (d_out, heads, head_dim, kv_heads)) or heads % kv_heads:
        raise _refuse(
            name,
            module,
            f"found d_out {d_out!r}, num_heads {heads!r}, num_kv_groups {kv_heads!r}, head_dim {head_dim!r}; expected "
            "positive ints with num_heads a multiple of num_kv_groups: the fused forward splits the projections into "
            "those heads",
        )
    if heads * head_dim != d_out:
        raise _refuse(
            name,
            module,
            f"num_heads {heads} x head_dim {head_dim} = {heads * head_dim}, expected d_out {d_out}: the fused forward "
            "splits d_out into the heads",
        )
    newer = key.split(":")[0] in _NEWER_MODELS
    if not newer:
        _check_norms(name, module, head_dim)
    gated = key.startswith("qwen3_5")  # its query projection also yields the output gate: twice d_out
    _check_projection(name, module, "W_query", d_in, 2 * d_out if gated else d_out)
    _check_projection(name, module, "W_key", d_in, kv_heads * head_dim)
    _check_projection(name, module, "W_value", d_in, kv_heads * head_dim)
    if "out_proj" in kind.children:  # back to d_out (the chapter, ch04) or to d_in (Qwen3, Gemma 3)
        qwen_like = ("qwen3:GroupedQueryAttention", "gemma3:GroupedQueryAttention", "pkgkv:qwen3", "pkgkv:gemma3")
        qwen_like += ("pkgkvb:qwen3",)
        back = d_in if key in qwen_like or newer else d_out
        _check_projection(name, module, "out_proj", d_out, back)
    if key.split(":")[0] in _NEWER_MODELS:
        _check_newer_norms(name, module, key, head_dim, kv_heads)
    if "dropout" in kind.children and type(module.dropout) is not nn.Dropout:
        raise _refuse(
            name,
            module,
            f"dropout is {type(module.dropout).__name__}, expected nn.Dropout: the fused kernel drops attention "
            "weights itself with dropout.p, so what another module does would be lost",
        )
    if "mask" in kind.buffers:
        _check_mask(name, module)
    if key == "kvopt:MultiHeadAttention":
        w = module.window_size
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise _refuse(
                name, module, f"window_size is {w!r}, expected a positive int: the length of its rolling cache"
            )
        cache = module._buffers["cache_k"]
        want = (module.num_heads, w, head_dim)
        if cache is not None and (cache.dim() != 4 or tuple(cache.shape[1:]) != want):
            shape = tuple(cache.shape)
            raise _refuse(
                name,
                module,
                f"its cache has shape {shape}, expected (b, heads, window, head_dim) = (b, {want[0]}, {want[1]}, "
                f"{want[2]}): the fused layer takes the book's cache over in that layout",
            )
    if key == "MultiHeadAttentionWithSWA":
        try:
            swa.window_of(module.sliding_window_size)
        except (TypeError, ValueError) as err:
            raise _refuse(
                name, module, f"{err}: the fused layer hands the kernel that window, which must be a rule it has"
            ) from None


_NEWER_MODELS = ("tiny_aya", "olmo3", "qwen3_5")


def _check_newer_norms(name: str, module: nn.Module, key: str, head_dim: int, kv_heads: int) -> None:
    """QK-norm widths: OLMo 3 normalises q and k over the whole projected width (all heads), Tiny Aya and Qwen3.5
    each head. A norm of the other width would be applied where the book does not."""
    whole = key.startswith("olmo3")
    for attr, width in (("q_norm", module.num_heads * head_dim), ("k_norm", kv_heads * head_dim)):
        norm = module._modules.get(attr)
        weight = getattr(norm, "weight", None)
        want = width if whole else head_dim
        if isinstance(weight, torch.Tensor) and tuple(weight.shape) != (want,):
            over = "the whole projected width" if whole else "each head"
            raise _refuse(
                name,
                module,
                f"{attr} has width {tuple(weight.shape)}; the {_KINDS[key].book} layer norms over {over} ({want}): "
                "the fused layer normalises where the book's does, so a norm of another width would be applied "
                "over the wrong axis",
            )
    if not isinstance(getattr(module, "attn_type", ""), str):
        raise _refuse(
            name,
            module,
            f"attn_type is {module.attn_type!r}, expected a str ('sliding_attention' or 'full_attention'): the fused "
            "layer reads it to decide where RoPE applies",
        )


def _check_gemma4(name: str, module: nn.Module) -> None:
    """Gemma4Attention: head counts that split, projections of num_heads (q) and num_kv_heads (k, v) heads of
    head_dim, o_proj back to the input width."""
    heads, kv_heads, head_dim = module.num_heads, module.num_kv_heads, module.head_dim
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (heads, kv_heads, head_dim)):
        raise _refuse(
            name,
            module,
            f"found num_heads {heads!r}, num_kv_heads {kv_heads!r}, head_dim {head_dim!r}; expected positive ints: "
            "the fused forward splits the projections into those heads",
        )
    if heads % kv_heads or module.num_key_value_groups != heads // kv_heads:
        raise _refuse(
            name,
            module,
            f"found num_heads {heads}, num_kv_heads {kv_heads}, num_key_value_groups {module.num_key_value_groups}; "
            "expected num_heads a multiple of num_kv_heads and num_key_value_groups their quotient: the fused "
            "forward hands the kernel num_kv_heads key heads, each shared by that many query heads",
        )
    d_in, _ = widths(module.q_proj)
    _check_projection(name, module, "q_proj", d_in, heads * head_dim)
    _check_projection(name, module, "k_proj", d_in, kv_heads * head_dim)
    _check_projection(name, module, "v_proj", d_in, kv_heads * head_dim)
    _check_projection(name, module, "o_proj", heads * head_dim, d_in)


def _check_mla(name: str, module: nn.Module) -> None:
    """ch04/05_mla: queries, keys (up from the latent) and values of one head_dim, d_out wide; out_proj d_out to
    d_out. The kernel takes one head_dim for q, k and v: a variant with other widths would need padding the
    book's layer does not have, so it is refused."""
    d_out, heads, head_dim, latent = module.d_out, module.num_heads, module.head_dim, module.latent_dim
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (d_out, heads, head_dim, latent)):
        raise _refuse(
            name,
            module,
            f"found d_out {d_out!r}, num_heads {heads!r}, head_dim {head_dim!r}, latent_dim {latent!r}; expected "
            "positive ints: the fused forward splits the up-projected keys and values into those heads",
        )
    if heads * head_dim != d_out:
        raise _refuse(
            name,
            module,
            f"num_heads {heads} x head_dim {head_dim} = {heads * head_dim}, expected d_out {d_out}: the fused "
            "forward splits d_out into the heads",
        )
    d_in, _ = widths(module.W_query)
    _check_projection(name, module, "W_query", d_in, d_out)
    _check_projection(name, module, "W_DKV", d_in, latent)
    _check_projection(name, module, "W_UK", latent, d_out)
    _check_projection(name, module, "W_UV", latent, d_out)
    _check_projection(name, module, "out_proj", d_out, d_out)
    if type(module.dropout) is not nn.Dropout:
        raise _refuse(
            name,
            module,
            f"dropout is {type(module.dropout).__name__}, expected nn.Dropout: the fused kernel drops attention "
            "weights itself with dropout.p, so what another module does would be lost",
        )


def _check_fused_qkv(name: str, module: nn.Module) -> None:
    """pkg ch03's PyTorchMultiHeadAttention: one qkv projection to 3 * d_out, proj back to d_out, a float dropout."""
    d_out, heads, head_dim, p = module.d_out, module.num_heads, module.head_dim, module.dropout
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (d_out, heads, head_dim)):
        raise _refuse(
            name,
            module,
            f"found d_out {d_out!r}, num_heads {heads!r}, head_dim {head_dim!r}; expected positive ints: the fused "
            "forward splits the qkv projection into those heads",
        )
    if heads * head_dim != d_out:
        raise _refuse(
            name,
            module,
            f"num_heads {heads} x head_dim {head_dim} = {heads * head_dim}, expected d_out {d_out}: the fused forward "
            "splits d_out into the heads",
        )
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise _refuse(
            name,
            module,
            f"dropout is {p!r}, expected a probability in [0, 1]: the kernel's dropout rate on the attention weights",
        )
    d_in, _ = widths(module.qkv)
    _check_projection(name, module, "qkv", d_in, 3 * d_out)
    _check_projection(name, module, "proj", d_out, d_out)


def _check_combined_qkv(name: str, module: nn.Module) -> None:
    """The notebook's MultiHeadAttentionCombinedQKV: qkv to 3 x heads x head_dim, proj back, nn.Dropout, the mask."""
    heads, head_dim = module.num_heads, module.head_dim
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (heads, head_dim)):
        raise _refuse(
            name,
            module,
            f"found num_heads {heads!r}, head_dim {head_dim!r}; expected positive ints: the fused forward splits the "
            "qkv projection into those heads",
        )
    d_in, _ = widths(module.qkv)
    _check_projection(name, module, "qkv", d_in, 3 * heads * head_dim)
    _check_projection(name, module, "proj", heads * head_dim, heads * head_dim)
    _check_dropout(name, module)
    _check_mask(name, module)


def _check_einsum(name: str, module: nn.Module) -> None:
    """The notebook's MHAEinsum: three (d_in, d_out) matrices, biases all or none of (d_out,), out_proj, the mask."""
    shapes = [tuple(getattr(module, w).shape) for w in _PROJECTIONS]
    d_out, heads, head_dim = module.d_out, module.num_heads, module.head_dim
    if len(set(shapes)) != 1 or len(shapes[0]) != 2 or shapes[0][1] != d_out or heads * head_dim != d_out:
        raise _refuse(
            name,
            module,
            f"W_query, W_key, W_value have shapes {shapes} with num_heads {heads} x head_dim {head_dim}, expected "
            f"(d_in, d_out {d_out}) each and num_heads x head_dim = d_out: the fused forward splits them into heads",
        )
    biases = [getattr(module, b) for b in ("bias_q", "bias_k", "bias_v")]
    if not (all(b is None for b in biases) or all(b is not None and tuple(b.shape) == (d_out,) for b in biases)):
        found = [None if b is None else tuple(b.shape) for b in biases]
        raise _refuse(
            name,
            module,
            f"bias_q, bias_k, bias_v are {found}, expected all None or all ({d_out},): the fused forward adds each to "
            "its projection as the book does",
        )
    _check_projection(name, module, "out_proj", d_out, d_out)
    _check_dropout(name, module)
    _check_mask(name, module)


def _check_pytorch_class(name: str, module: nn.Module) -> None:
    """The notebook's MHAPyTorchClass: PyTorch's nn.MultiheadAttention, batch first, without add_bias_kv."""
    mha = module.multihead_attn
    if type(mha) not in (nn.MultiheadAttention, bonus.MultiheadAttention):
        raise _refuse(
            name,
            module,
            f"multihead_attn is {type(mha).__name__}, expected PyTorch's nn.MultiheadAttention: the fused layer reads "
            "its in_proj_weight and out_proj",
        )
    if mha.bias_k is not None:
        raise _refuse(
            name,
            module,
            "its nn.MultiheadAttention has add_bias_kv (the notebook sets it with qkv_bias=True), expected none: it "
            "appends a learned key and value that every query sees, which the fused kernel's causal rule does not "
            "have; it is left to PyTorch",
        )
    if not mha.batch_first or not mha._qkv_same_embed_dim:
        raise _refuse(
            name,
            module,
            f"its nn.MultiheadAttention has batch_first={mha.batch_first}, kdim={mha.kdim}, vdim={mha.vdim}, "
            f"expected batch_first=True and kdim = vdim = embed_dim {mha.embed_dim}: the fused layer takes the "
            "input as (batch, tokens, embed_dim) for queries, keys and values alike",
        )
    _check_projection(name, module, "proj", mha.embed_dim, mha.embed_dim)
    _check_mask(name, module)


def _check_mha(name: str, module: nn.Module) -> None:
    """PyTorch's nn.MultiheadAttention: nothing to refuse, its fused class runs PyTorch's forward for every call the
    kernel does not compute exactly."""


def _check_causal_without_buffers(name: str, module: nn.Module) -> None:
    if not isinstance(module.mask, torch.Tensor):
        raise _refuse(
            name,
            module,
            f"its mask is {type(module.mask).__name__}, expected the chapter's triu(ones, 1) tensor: its length is the "
            "context limit the fused layer keeps",
        )
    d_in, _ = widths(module.W_query)
    for attr in _PROJECTIONS:
        _check_projection(name, module, attr, d_in, module.d_out)
    _check_dropout(name, module)
    _check_mask(name, module)


def _check_dropout(name: str, module: nn.Module) -> None:
    if type(module.dropout) is not nn.Dropout:
        raise _refuse(
            name,
            module,
            f"dropout is {type(module.dropout).__name__}, expected nn.Dropout: the fused kernel drops attention "
            "weights itself with dropout.p, so what another module does would be lost",
        )


_BONUS_CHECKS = {
    "MultiHeadAttentionCombinedQKV": _check_combined_qkv,
    "MHAEinsum": _check_einsum,
    "MHAPyTorchClass": _check_pytorch_class,
    "nn.MultiheadAttention": _check_mha,
    "CausalAttentionWithoutBuffers": _check_causal_without_buffers,
}


def _check_mask(name: str, module: nn.Module) -> None:
    mask = module.mask
    n = mask.shape[0] if mask.dim() == 2 else -1
    causal = torch.triu(torch.ones(n, n, device=mask.device), diagonal=1) if n >= 0 else None
    # A meta tensor has a shape and no values (a model built on the meta device, its weights loaded later).
    same = mask.is_meta or torch.equal(mask.bool(), causal.bool()) if causal is not None else False
    if causal is None or mask.shape != causal.shape or not same:
        found = f"shape {tuple(mask.shape)}" if causal is None or mask.shape != causal.shape else "other entries"
        raise _refuse(
            name,
            module,
            f"its mask buffer has {found}, expected the chapter's causal triu(ones(n, n), 1): the fused kernel "
            "applies the causal rule itself and never reads the buffer, so another mask would be silently dropped",
        )


def _check_norms(name: str, module: nn.Module, head_dim: int) -> None:
    """QK-norm (Qwen3, Gemma 3) normalises each head: its weights have head_dim entries."""
    for attr in ("q_norm", "k_norm"):
        norm = module._modules.get(attr)
        shapes = {tuple(p.shape) for p in norm.parameters()} if norm is not None else set()
        if shapes and shapes != {(head_dim,)}:
            raise _refuse(
                name,
                module,
                f"{attr} has weights of shape {sorted(shapes)}, expected ({head_dim},): the fused layer normalises "
                "each head of head_dim entries, as Qwen3 and Gemma 3 do; a norm over the whole projected width (as "
                "OLMo 3's) would be applied over the wrong axis",
            )


_LOCAL_WINDOW = 3  # the probe's sliding window (Gemma 3's local layers): under its 7 tokens, so keys drop out


def _probe_of(name: str, module: nn.Module, key: str) -> tuple:
    """The calls and inputs that check a layer of kind ``key`` (attention.probe)."""
    kind = _KINDS[key]
    if key == "SelfAttention_v1":
        d_in = module.W_query.shape[0]
    elif key == "MultiHeadAttentionWrapper":
        d_in = widths(module.heads[0].W_query)[0] if len(module.heads) else None
    elif key in ("PyTorchMultiHeadAttention", "MultiHeadAttentionCombinedQKV") or key.startswith("MHAPyTorchS"):
        d_in = widths(module.qkv)[0]
    elif key == "MHAEinsum":
        d_in = module.W_query.shape[0]
    elif key == "MHAPyTorchClass":
        d_in = module.multihead_attn.embed_dim
    elif key == "nn.MultiheadAttention":
        d_in = module.embed_dim
    elif key.startswith("gemma4"):
        d_in = widths(module.q_proj)[0]
    else:
        d_in = widths(module.W_query)[0]
    if d_in is None:
        raise _refuse(
            name,
            module,
            "its input width is unknown (its query projection is neither an nn.Linear nor a wrapper of one), so "
            "no probe input can be built to check that the fused forward computes what it does; "
            "swap_attention(model, verify=False) converts it unchecked",
        )
    device = probe.device_of(module)
    if device.type == "meta":
        raise _refuse(
            name,
            module,
            "its weights are on the meta device, so its forward cannot be run to check the fused one against it; "
            "swap after loading the weights, or pass verify=False",
        )
    n = probe.TOKENS
    mask = getattr(module.heads[0] if key == "MultiHeadAttentionWrapper" else module, "mask", None)
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        n = min(n, mask.shape[0])  # the layer's context_length
    most = module.window_size if key == "kvopt:MultiHeadAttention" else n  # its cached chunks fit its window
    calls = {
        "plain": probe.plain,
        "tokens": probe.tokens_only,
        "cached": probe.use_cache(most),
        "rope": probe.rope(),
        "rope_local": probe.rope(_LOCAL_WINDOW),
        "rope_causal": probe.rope_causal,
        "pkg": probe.pkg_cached,
        "pkg_rope": probe.pkg_rope(),
        "pkg_rope_local": probe.pkg_rope(_LOCAL_WINDOW),
        "mha": probe.multihead,
        "pkg_batched": probe.pkg_batched,
        "gemma4": probe.gemma4(_LOCAL_WINDOW),
        "gemma4_kv": probe.gemma4_cached(_LOCAL_WINDOW),
    }[kind.probe]
    head_dim = getattr(module, "head_dim", None)  # for RoPE tables, where the family takes them
    inputs = probe.Inputs(d_in, n, device, head_dim)
    if key.startswith("qwen3_5") and isinstance(head_dim, int) and head_dim >= 4:
        # Qwen3.5 rotates only the first dims its model's tables cover (partial RoPE): tables narrower than the
        # head, so that the dims left as they are are probed too.
        inputs.cos, inputs.sin = probe.rope_tables(head_dim // 4 * 2, n, device)
    return calls, inputs


_HINTS = {  # what is known to differ, for the classes the book itself writes that way
    "MHAPyTorchSDPAWithoutFlash": (
        ". The notebook's class as written passes its triu(ones, 1) mask to scaled_dot_product_attention, which "
        "reads True as attend: each token attends only to the tokens after it and the last to none. That is not "
        "causal attention; passing ~mask makes it causal, and then it is converted"
    ),
}


def _verify(name: str, module: nn.Module, key: str) -> None:
    """Refuse ``module`` unless its forward and its fused counterpart's agree on a probe (attention.probe)."""
    kind = _KINDS[key]
    calls, inputs = _probe_of(name, module, key)
    try:
        probe.verify(module, kind.target, calls, inputs)
    except probe.Disagreement as err:
        raise _refuse(
            name,
            module,
            f"it is laid out as the {kind.book} class, but its forward and the fused one disagree on a probe input "
            f"(float32, {inputs.n} tokens): {err}. "
            + (
                f"On the calls the {kind.book} class takes, one of the two failed, so they cannot be shown to "
                "compute the same"
                if err.failed
                else "Its forward computes something else than the book's (another scale, mask, rotation or "
                "normalisation), and converting it would silently change the model's outputs"
            )
            + _HINTS.get(key, ""),
        ) from None


def fused_layers(model: nn.Module) -> list[str]:
    """Names of the fused attention layers in ``model`` (what swap_attention converted, or built fused)."""
    return [name or "<root>" for name, m in model.named_modules() if isinstance(m, FUSED_CLASSES)]


def swap_attention(model: nn.Module, verify: bool = True) -> nn.Module:
    """Replace, in place, every book attention layer in ``model`` by its fused drop-in (see the module's table).

    The module objects stay the same (their class changes), so Parameters, buffers, hooks, train/eval mode
    and any optimizer built before the swap carry over; ``isinstance(layer, TheBookClass)`` is False
    afterwards. A look-alike that cannot be converted faithfully (a cache of another shape, other
    submodules, a non-causal mask) raises ``ValueError`` before anything is changed.

    ``verify`` (default True): before anything is converted, each layer's own forward and the fused forward run
    on a small float32 probe (twins of the layer: the model's weights, caches, positions and modes are left as they
    were) and must agree to float32 rounding; a layer that does not is refused with a ``ValueError`` naming it and
    the difference, and no layer is converted (``attention.probe``). ``verify=False`` skips the probe, for callers
    who have checked. A class of another name laid out as a chapter-3 class is converted only with ``verify``, once
    its probe agrees (left alone with a warning otherwise). Each swap is logged at INFO level on this module's
    logger (``chapter3_flash.attention.swap``); a model in which nothing was or is fused gets a
    ``UserWarning`` naming the attention-like classes it left alone. ``fused_layers(model)`` lists them.

    Returns the model (the same object, or the model's own class changed when the root is a layer).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"swap_attention expects an nn.Module, got {type(model).__name__}")
    if not isinstance(verify, bool):
        raise TypeError(f"verify must be True or False, got {verify!r}")
    todo, by_structure = [], []
    for name, m in model.named_modules():
        if (key := _kind_of(name, m)) is not None:
            todo.append((name, m, key))
        elif verify and (key := _structural_kind(m)) is not None:
            by_structure.append((name, m, key))
    # Check every layer first, so a refusal leaves the model untouched.
    for name, module, key in todo:
        _check_layout(name, module, key)
    if verify:
        for name, module, key in todo:
            _verify(name, module, key)
    left = []  # classes of other names laid out as the chapter's that the probe (or the layout check) turned down
    for name, module, key in by_structure:
        try:
            _check_layout(name, module, key)
            _verify(name, module, key)
        except ValueError as err:
            left.append(str(err))
        else:
            todo.append((name, module, key))
    if left:
        warnings.warn(
            "swap_attention left alone layers laid out as a chapter-3 class under another name, whose forward it "
            "could not verify: " + "; ".join(left),
            UserWarning,
            stacklevel=2,
        )
    for name, module, key in todo:
        target = _KINDS[key].target
        old = type(module).__qualname__
        log.info("swap_attention: %s: %s -> %s.%s", name or "<root>", old, target.__module__, target.__qualname__)
        module.__class__ = target  # a cache the book's layer was filling is taken over at its next cached call
    log.info("swap_attention: %d layer(s) swapped", len(todo))
    if not todo and not fused_layers(model):
        seen = sorted(
            {
                f"{type(m).__module__}.{type(m).__qualname__}"
                for _, m in model.named_modules()
                if "attention" in type(m).__name__.lower()
            }
        )
        warnings.warn(
            "swap_attention converted no layer: the model has none of the book's attention classes it knows"
            + (f"; attention-like classes left alone: {', '.join(seen)}" if seen else ""),
            UserWarning,
            stacklevel=2,
        )
    return model
