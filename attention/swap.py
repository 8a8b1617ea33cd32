"""``swap_attention``: turn the book's attention layers inside an existing model into the fused ones.

Recognised, by class name, attribute layout and forward signature (a reader's own copy of the book's
code, or ours from ``attention.reference``):

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
| OLMo 3 (ch05/13, both notebooks)       | ``GroupedQueryAttention``    | ``attention.olmo3``                |
| Tiny Aya (ch05/15, both notebooks)     | ``GroupedQueryAttention``    | ``attention.tiny_aya``             |
| Qwen3.5 gated attention (ch05/16)      | ``GroupedQueryAttention``    | ``attention.qwen3_5``              |
| Gemma 4 (ch05/17, both notebooks)      | ``Gemma4Attention``          | ``attention.gemma4``               |
| ch04/05_mla                            | ``MultiHeadLatentAttention`` | ``attention.mla``                  |

Projections may be any module that maps the same widths (the book's LoRA wrapper, quantized linears):
the fused layers call them as the book's code does. The pkg package's cached variants, whose forward takes
``(..., start_pos, cache)`` and returns ``(context, next_cache)`` with the cache held by the caller, keep that
contract; its batched variant (``kv_cache_batched``: per-sequence positions and caches) is refused.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import warnings

import torch
from torch import nn

from . import (
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
    olmo3,
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
    fast.PyTorchMultiHeadAttention,
    fast.GroupedQueryAttentionFast,
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


_PROJECTIONS = ("W_query", "W_key", "W_value")
_KINDS = {
    "SelfAttention_v1": _Kind("chapter 3", fused.SelfAttention_v1, params=_PROJECTIONS),
    "SelfAttention_v2": _Kind("chapter 3", fused.SelfAttention_v2, children=_PROJECTIONS),
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
    "kv:MultiHeadAttention": _Kind(
        "ch04/03_kv-cache",
        kv_cache.MultiHeadAttention,
        children=_PROJECTIONS + ("out_proj", "dropout"),
        buffers=("mask", "cache_k", "cache_v"),
        attrs=("d_out", "num_heads", "head_dim", "ptr_current_pos"),
    ),
    "kvopt:MultiHeadAttention": _Kind(
        "ch04/03_kv-cache optimized",
        kv_cache_optimized.MultiHeadAttention,
        children=_PROJECTIONS + ("out_proj", "dropout"),
        buffers=("cache_k", "cache_v"),
        attrs=("d_out", "num_heads", "head_dim", "window_size", "max_seq_len"),
    ),
    "kvmha:MultiHeadAttention": _Kind(
        "ch04/04_gqa and ch04/06_swa gpt_with_kv_mha",
        swa.MultiHeadAttention,
        children=_PROJECTIONS + ("out_proj", "dropout"),
        buffers=("cache_k", "cache_v"),
        attrs=("d_out", "num_heads", "head_dim", "ptr_current_pos"),
    ),
    "gqa:GroupedQueryAttention": _Kind(
        "ch04/04_gqa",
        gqa.GroupedQueryAttention,
        children=_PROJECTIONS + ("out_proj", "dropout"),
        buffers=("cache_k", "cache_v"),
        attrs=("d_out", "num_heads", "head_dim", "num_kv_groups", "group_size", "ptr_current_pos"),
    ),
    "MultiHeadAttentionWithSWA": _Kind(
        "ch04/06_swa",
        swa.MultiHeadAttentionWithSWA,
        children=_PROJECTIONS + ("out_proj", "dropout"),
        buffers=("cache_k", "cache_v"),
        attrs=("d_out", "num_heads", "head_dim", "sliding_window_size", "ptr_current_pos"),
    ),
    "llama3:GroupedQueryAttention": _Kind(
        "Llama 3.2",
        llama3.GroupedQueryAttention,
        children=_PROJECTIONS + ("out_proj",),
        attrs=("d_out", "num_heads", "head_dim", "num_kv_groups"),
    ),
    "qwen3:GroupedQueryAttention": _Kind(
        "Qwen3",
        qwen3.GroupedQueryAttention,
        children=_PROJECTIONS + ("out_proj",),
        optional_children=("q_norm", "k_norm"),
        attrs=("d_out", "num_heads", "head_dim", "num_kv_groups"),
    ),
    "gemma3:GroupedQueryAttention": _Kind(
        "Gemma 3",
        gemma3.GroupedQueryAttention,
        children=_PROJECTIONS + ("out_proj",),
        optional_children=("q_norm", "k_norm"),
        attrs=("d_out", "num_heads", "head_dim", "num_kv_groups", "scaling"),
    ),
    "pkgkv:MultiHeadAttention": _Kind(
        "pkg kv_cache gpt2.py",
        kv_cache_pkg.MultiHeadAttention,
        children=_PROJECTIONS + ("out_proj", "dropout"),
        attrs=("d_out", "num_heads", "head_dim"),
    ),
    "pkgkv:llama3": _Kind(
        "pkg kv_cache llama3.py",
        kv_cache_pkg.Llama3GroupedQueryAttention,
        children=_PROJECTIONS + ("out_proj",),
        attrs=("d_out", "num_heads", "head_dim", "num_kv_groups"),
    ),
    "pkgkv:qwen3": _Kind(
        "pkg kv_cache qwen3.py",
        kv_cache_pkg.Qwen3GroupedQueryAttention,
        children=_PROJECTIONS + ("out_proj",),
        optional_children=("q_norm", "k_norm"),
        attrs=("d_out", "num_heads", "head_dim", "num_kv_groups"),
    ),
    "pkgkv:gemma3": _Kind(
        "Gemma 3 with a KV cache",
        kv_cache_pkg.Gemma3GroupedQueryAttention,
        children=_PROJECTIONS + ("out_proj",),
        optional_children=("q_norm", "k_norm"),
        attrs=("d_out", "num_heads", "head_dim", "num_kv_groups", "scaling"),
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
    ),
}


def _newer_gqa_kind(book: str, target: type, extra: tuple = (), qk_norm_required: bool = False) -> _Kind:
    """A ch05/13-16 GroupedQueryAttention: the Qwen3 layout (projections, out_proj, QK-norms) plus ``extra``
    attributes; OLMo 3 always builds its QK-norms, the others only with ``qk_norm=True``."""
    norms = ("q_norm", "k_norm")
    children = _PROJECTIONS + ("out_proj",) + (norms if qk_norm_required else ())
    optional = () if qk_norm_required else norms
    attrs = ("d_out", "num_heads", "head_dim", "num_kv_groups") + extra
    return _Kind(book, target, children=children, optional_children=optional, attrs=attrs)


# The newer models of ch05, told apart by what their constructors keep (_newer_gqa); ":kv": the KV-cache notebook's.
_OLMO3_ATTRS = ("attn_type", "sliding_window")
_KINDS |= {
    "tiny_aya": _newer_gqa_kind("Tiny Aya (ch05/15)", tiny_aya.GroupedQueryAttention, ("attn_type",)),
    "tiny_aya:kv": _newer_gqa_kind("Tiny Aya with a KV cache", tiny_aya.KVGroupedQueryAttention, ("attn_type",)),
    "olmo3": _newer_gqa_kind("OLMo 3 (ch05/13)", olmo3.GroupedQueryAttention, _OLMO3_ATTRS, True),
    "olmo3:kv": _newer_gqa_kind("OLMo 3 with a KV cache", olmo3.KVGroupedQueryAttention, _OLMO3_ATTRS, True),
    "qwen3_5": _newer_gqa_kind("Qwen3.5 gated attention (ch05/16)", qwen3_5.GroupedQueryAttention),
    "qwen3_5:kv": _newer_gqa_kind("Qwen3.5 gated attention with a KV cache", qwen3_5.KVGroupedQueryAttention),
}
_GEMMA4 = {
    "children": ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "v_norm"),
    "attrs": ("head_dim", "num_heads", "num_kv_heads", "num_key_value_groups", "is_kv_shared_layer"),
}
_KINDS["gemma4"] = _Kind("Gemma 4 (ch05/17)", gemma4.Gemma4Attention, **_GEMMA4)
_KINDS["gemma4:kv"] = _Kind("Gemma 4 with a KV cache (ch05/17)", gemma4.KVGemma4Attention, **_GEMMA4)
_KINDS["MultiHeadLatentAttention"] = _Kind(
    "ch04/05_mla",
    mla.MultiHeadLatentAttention,
    children=("W_query", "W_DKV", "W_UK", "W_UV", "out_proj", "dropout"),
    buffers=("cache_c_kv",),
    attrs=("d_out", "num_heads", "head_dim", "latent_dim", "ptr_current_pos"),
)
_NAMES = {"MultiHeadAttention", "GroupedQueryAttention", "MultiHeadAttentionWithSWA", *_CHAPTER}
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
            raise _refuse(
                name,
                module,
                "the pkg's kv_cache_batched variant (per-sequence positions and caches) is not supported; its "
                "kv_cache variant (one position for the batch) is",
            )
        if cls.__name__ == "MultiHeadAttention":
            return "pkgkv:MultiHeadAttention"
        if cls.__name__ == "GroupedQueryAttention":
            if hasattr(module, "scaling"):
                return "pkgkv:gemma3"
            return "pkgkv:qwen3" if hasattr(module, "q_norm") else "pkgkv:llama3"
        raise _refuse(name, module, "a forward with (start_pos, cache) that is not one of the pkg's KV-cache layers")
    if cls.__name__ == "MultiHeadAttention":
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
        raise _refuse(name, module, f"{attr} is not a module")
    got_in, got_out = widths(proj)
    if (d_in is not None and got_in is not None and got_in != d_in) or (got_out is not None and got_out != d_out):
        raise _refuse(name, module, f"{attr} maps {got_in} -> {got_out}, expected {d_in} -> {d_out}")


def _check_layout(name: str, module: nn.Module, key: str) -> None:
    kind = _KINDS[key]
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
            f"expected the {kind.book} layout: parameters {sorted(kind.params)}, submodules {sorted(want_children)}, "
            f"buffers {sorted(kind.buffers)}; found {sorted(module._parameters)}, {sorted(have_children)}, "
            f"{sorted(module._buffers)} (a KV cache or other extension of another shape is not supported)",
        )
    missing = [a for a in kind.attrs if not hasattr(module, a)]
    if missing:
        raise _refuse(name, module, f"attributes {missing} of the {kind.book} class are missing")
    if key == "SelfAttention_v1":
        shapes = {tuple(module._parameters[p].shape) for p in kind.params}
        if len(shapes) != 1 or len(shapes.pop()) != 2:
            raise _refuse(name, module, "W_query, W_key, W_value must be (d_in, d_out) matrices of one shape")
        return
    if key == "MultiHeadAttentionWrapper":
        heads = module.heads
        ok = isinstance(heads, nn.ModuleList) and all(
            type(h) is fused.CausalAttention or _kind_of("", h) == "CausalAttention" for h in heads
        )
        if not ok:
            raise _refuse(name, module, "heads must be a ModuleList of CausalAttention layers")
        return
    if key == "PyTorchMultiHeadAttention":
        _check_fused_qkv(name, module)
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
        raise _refuse(name, module, f"d_out {d_out}, num_heads {heads}, num_kv_groups {kv_heads} do not split")
    if heads * head_dim != d_out:
        raise _refuse(name, module, f"num_heads {heads} x head_dim {head_dim} != d_out {d_out}")
    gated = key.startswith("qwen3_5")  # its query projection also yields the output gate: twice d_out
    _check_projection(name, module, "W_query", d_in, 2 * d_out if gated else d_out)
    _check_projection(name, module, "W_key", d_in, kv_heads * head_dim)
    _check_projection(name, module, "W_value", d_in, kv_heads * head_dim)
    if "out_proj" in kind.children:  # back to d_out (the chapter, ch04) or to d_in (Qwen3, Gemma 3)
        qwen_like = ("qwen3:GroupedQueryAttention", "gemma3:GroupedQueryAttention", "pkgkv:qwen3", "pkgkv:gemma3")
        back = d_in if key in qwen_like or key.split(":")[0] in _NEWER_MODELS else d_out
        _check_projection(name, module, "out_proj", d_out, back)
    if key.split(":")[0] in _NEWER_MODELS:
        _check_newer_norms(name, module, key, head_dim, kv_heads)
    if "dropout" in kind.children and type(module.dropout) is not nn.Dropout:
        raise _refuse(name, module, "dropout is not nn.Dropout")
    if "mask" in kind.buffers:
        _check_mask(name, module)
    if key == "kvopt:MultiHeadAttention":
        w = module.window_size
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise _refuse(name, module, f"window_size must be a positive int, got {w!r}")
        cache = module._buffers["cache_k"]
        want = (module.num_heads, w, head_dim)
        if cache is not None and (cache.dim() != 4 or tuple(cache.shape[1:]) != want):
            shape = tuple(cache.shape)
            raise _refuse(name, module, f"its cache has shape {shape}, expected (b, heads, window, head_dim) = {want}")
    if key == "MultiHeadAttentionWithSWA":
        try:
            swa.window_of(module.sliding_window_size)
        except (TypeError, ValueError) as err:
            raise _refuse(name, module, str(err)) from None


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
                f"{attr} has width {tuple(weight.shape)}; the {_KINDS[key].book} layer norms over {over} ({want})",
            )
    if not isinstance(getattr(module, "attn_type", ""), str):
        raise _refuse(name, module, f"attn_type must be a str, got {module.attn_type!r}")


def _check_gemma4(name: str, module: nn.Module) -> None:
    """Gemma4Attention: head counts that split, projections of num_heads (q) and num_kv_heads (k, v) heads of
    head_dim, o_proj back to the input width."""
    heads, kv_heads, head_dim = module.num_heads, module.num_kv_heads, module.head_dim
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (heads, kv_heads, head_dim)):
        raise _refuse(name, module, f"num_heads {heads!r}, num_kv_heads {kv_heads!r}, head_dim {head_dim!r}")
    if heads % kv_heads or module.num_key_value_groups != heads // kv_heads:
        raise _refuse(
            name,
            module,
            f"num_heads {heads}, num_kv_heads {kv_heads}, num_key_value_groups "
            f"{module.num_key_value_groups} do not split",
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
        raise _refuse(name, module, f"d_out {d_out!r}, num_heads {heads!r}, head_dim {head_dim!r}, latent {latent!r}")
    if heads * head_dim != d_out:
        raise _refuse(name, module, f"num_heads {heads} x head_dim {head_dim} != d_out {d_out}")
    d_in, _ = widths(module.W_query)
    _check_projection(name, module, "W_query", d_in, d_out)
    _check_projection(name, module, "W_DKV", d_in, latent)
    _check_projection(name, module, "W_UK", latent, d_out)
    _check_projection(name, module, "W_UV", latent, d_out)
    _check_projection(name, module, "out_proj", d_out, d_out)
    if type(module.dropout) is not nn.Dropout:
        raise _refuse(name, module, "dropout is not nn.Dropout")


def _check_fused_qkv(name: str, module: nn.Module) -> None:
    """pkg ch03's PyTorchMultiHeadAttention: one qkv projection to 3 * d_out, proj back to d_out, a float dropout."""
    d_out, heads, head_dim, p = module.d_out, module.num_heads, module.head_dim, module.dropout
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (d_out, heads, head_dim)):
        raise _refuse(
            name, module, f"d_out {d_out!r}, num_heads {heads!r}, head_dim {head_dim!r} must be positive ints"
        )
    if heads * head_dim != d_out:
        raise _refuse(name, module, f"num_heads {heads} x head_dim {head_dim} != d_out {d_out}")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise _refuse(name, module, f"dropout must be a probability in [0, 1], got {p!r}")
    d_in, _ = widths(module.qkv)
    _check_projection(name, module, "qkv", d_in, 3 * d_out)
    _check_projection(name, module, "proj", d_out, d_out)


def _check_mask(name: str, module: nn.Module) -> None:
    mask = module.mask
    n = mask.shape[0] if mask.dim() == 2 else -1
    causal = torch.triu(torch.ones(n, n, device=mask.device), diagonal=1) if n >= 0 else None
    if causal is None or mask.shape != causal.shape or not torch.equal(mask.bool(), causal.bool()):
        raise _refuse(name, module, "its mask buffer is not the chapter's causal triu(ones, 1)")


def fused_layers(model: nn.Module) -> list[str]:
    """Names of the fused attention layers in ``model`` (what swap_attention converted, or built fused)."""
    return [name or "<root>" for name, m in model.named_modules() if isinstance(m, FUSED_CLASSES)]


def swap_attention(model: nn.Module) -> nn.Module:
    """Replace, in place, every book attention layer in ``model`` by its fused drop-in (see the module's table).

    The module objects stay the same (their class changes), so Parameters, buffers, hooks, train/eval mode
    and any optimizer built before the swap carry over; ``isinstance(layer, TheBookClass)`` is False
    afterwards. A look-alike that cannot be converted faithfully (a cache of another shape, other
    submodules, a non-causal mask) raises ``ValueError`` before anything is changed. Each swap is logged at
    INFO level on the ``attention.swap`` logger; a model in which nothing was or is fused gets a
    ``UserWarning`` naming the attention-like classes it left alone. ``fused_layers(model)`` lists them.

    Returns the model (the same object, or the model's own class changed when the root is a layer).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"swap_attention expects an nn.Module, got {type(model).__name__}")
    todo = [(name, m, key) for name, m in model.named_modules() if (key := _kind_of(name, m)) is not None]
    # Check every layer first, so a refusal leaves the model untouched.
    for name, module, key in todo:
        _check_layout(name, module, key)
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
