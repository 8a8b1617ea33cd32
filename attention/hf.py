"""Hugging Face transformers (5.x): any HF decoder runs its attention on our kernels, with one line.

    from chapter3_flash.attention import hf
    name = hf.register()                       # "chapter3"
    model.set_attn_implementation(name)        # or from_pretrained(..., attn_implementation=name)

transformers takes a third-party attention through two registries, and this module fills both:

- ``AttentionMaskInterface``: the mask function (``_mask``) runs once per forward and per mask type (full,
  sliding) and never builds an ``N x N`` mask. It reads HF's mask recipe (causal or bidirectional, a sliding
  window, packed sequences; each parse checked against HF's own rule on a few rows) and the 2-D padding mask,
  and hands the attention function a ``Layout``: the pattern, how many cached keys are filled (a StaticCache's
  prefill arrives with ``max_cache_len`` keys and no mask) and, for padded or packed batches, where each
  sequence's tokens sit (``cu_seqlens``). Its host syncs (the lengths, the token indices) happen here, once per
  forward, never per layer or per sequence.
- ``AttentionInterface``: the attention function (``attention_forward``) takes HF's
  ``(module, query (B, Hq, N, D), key (B, Hkv, Nk, D), value, attention_mask, dropout, scaling, sliding_window,
  softcap, s_aux, ...)`` and returns ``(out (B, N, Hq, D), None)``. Unpadded calls go to ``flash_attention`` (a
  few new tokens against a cache: the split-KV decode kernel); padded and packed batches to the varlen kernel in
  one launch. Keys and values are never repeated per query head.

Any mask this module cannot read (a 4-D custom mask, a vision model's overlay, chunked attention) runs HF's
own SDPA function with HF's mask, with one warning. Attention weights (``output_attentions=True``) are
refused: the kernels never form them.

The name has no "flash" in it: transformers takes any such name for a hub FlashAttention kernel.
transformers is an optional dependency (``pip install .[hf]``) imported only when these functions run.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
import torch.nn.functional as F
from chapter3_flash.kernels import checks, flash_attention_with_kvcache

from . import fused

DEFAULT_NAME = "chapter3"

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


# ----------------------------------------------------------------------------------------------
# What the mask function hands the attention function
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Ragged:
    """Where each sequence's tokens sit in a padded ``(B, N)`` or packed batch, in the varlen kernel's terms.

    ``q_index`` / ``k_index``: ``(batch_idx, position)`` index tensors of the tokens kept, sequence after
    sequence (None: every token, in order, as in a packed batch); ``cu_seqlens_*``: int32 ``(S + 1,)``
    offsets of the S sequences in that order; ``max_seqlen_*``: the longest, as an int."""

    q_index: tuple[torch.Tensor, torch.Tensor] | None
    cu_seqlens_q: torch.Tensor
    max_seqlen_q: int
    k_index: tuple[torch.Tensor, torch.Tensor] | None
    cu_seqlens_k: torch.Tensor
    max_seqlen_k: int


@dataclasses.dataclass(frozen=True)
class Layout:
    """One forward's mask, cheaply: the pattern, the keys in use and, for padded or packed batches, ``Ragged``.

    ``window`` is in the kernels' terms (``window_size``): HF's causal sliding window ``w`` keeps keys with
    ``kv_idx > q_idx - w``, which is ``(w - 1, 0)``; its bidirectional one keeps ``|q_idx - kv_idx| <= w``,
    ``(w, w)``. ``kv_used``: the keys that hold tokens (the first ``kv_used`` of those passed in; a
    StaticCache passes all ``max_cache_len``). ``leftpad``: for a padded step against a cache whose padding
    sits before each sequence's tokens only, the ``(B,)`` count of padded keys (the decode kernel skips them)."""

    causal: bool
    window: tuple[int, int]
    q_length: int
    kv_used: int
    ragged: Ragged | None = None
    leftpad: torch.Tensor | None = None
    padding: tuple[torch.Tensor, torch.Tensor] | None = None  # with leftpad: the (B, Nq), (B, kv_used) kept masks

    # generate() with a StaticCache builds each step's masks ahead (create_masks_for_generate, through ``_mask``)
    # and passes them to the model, whose mask preprocessing reads ``.ndim`` of any mask to spot a 2-D padding mask.
    # A Layout is a prepared mask, like HF's 4-D ones: ``_mask`` hands it back unchanged.
    ndim = 4


# ----------------------------------------------------------------------------------------------
# The mask function: HF's recipe read once per forward
# ----------------------------------------------------------------------------------------------


def _closure(fn) -> dict:
    """The variables a closure captured, by name."""
    cells = fn.__closure__ or ()
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in cells)))


@dataclasses.dataclass
class _Pattern:
    causal: bool | None = None
    window: tuple[int, int] | None = None
    sequence_ids: torch.Tensor | None = None  # (B, N) packed sequences' ids (HF's packed_sequence_mask)
    remapped: bool = False  # positions remapped per packed sequence (comes with sequence_ids)


def _read_pattern(fn, masking_utils, pattern: _Pattern) -> bool:
    """Fill ``pattern`` from HF's mask function ``fn``: True if every piece of it is one this module knows
    (masking_utils' causal, bidirectional, sliding-window and packed-sequence functions, combined by and_masks)."""
    name = getattr(fn, "__qualname__", "")
    if fn is masking_utils.causal_mask_function or fn is masking_utils.bidirectional_mask_function:
        if pattern.causal is not None:
            return False
        pattern.causal = fn is masking_utils.causal_mask_function
        return True
    captured = _closure(fn) if getattr(fn, "__closure__", None) else {}
    if name == "and_masks.<locals>.and_mask":
        return all(_read_pattern(part, masking_utils, pattern) for part in captured.get("mask_functions", ()))
    if name == "sliding_window_overlay.<locals>.inner_mask" and pattern.window is None:
        w = int(captured["sliding_window"])
        pattern.window = (w - 1, 0)
        return w >= 1
    if name == "sliding_window_bidirectional_overlay.<locals>.inner_mask" and pattern.window is None:
        w = int(captured["sliding_window"])
        pattern.window = (w, w)
        return w >= 0
    if name == "packed_sequence_mask_function.<locals>.inner_mask" and pattern.sequence_ids is None:
        pattern.sequence_ids = captured["packed_sequence_mask"]
        return True
    if name == "remap_positions_for_packed_sequence.<locals>.inner_mask" and not pattern.remapped:
        # Positions restart per packed sequence and run on by one inside it (that is how HF finds the sequences),
        # so the causal and window rules on them are the rules on the token order within each sequence.
        pattern.remapped = True
        return _read_pattern(captured["mask_function"], masking_utils, pattern)
    return False


_holds: set[tuple] = set()  # the (causal, window) parses found to agree with HF's own mask functions


def _pattern_holds(mask_function, pattern: _Pattern, batch_size, q_length, kv_length, q_offset, kv_offset, device):
    """Verify, don't assume: HF's own mask function and the parsed pattern agree on a few query rows (the
    first, the last and two between), every key, every batch row. Cheap: ``B * 4 * Nk`` booleans."""
    rows = sorted({0, q_length // 3, (2 * q_length) // 3, q_length - 1})
    b = torch.arange(batch_size, device=device)[:, None, None, None]
    h = torch.zeros(1, dtype=torch.long, device=device)[None, :, None, None]
    q = (torch.tensor(rows, device=device) + q_offset)[None, None, :, None]
    kv = (torch.arange(kv_length, device=device) + kv_offset)[None, None, None, :]
    theirs = mask_function(b, h, q, kv).expand(batch_size, 1, len(rows), kv_length)
    left, right = pattern.window if pattern.window is not None else (-1, -1)
    ours = torch.ones_like(theirs)
    if pattern.causal:
        ours &= kv <= q
    if left >= 0:
        ours &= kv >= q - left
    if right >= 0 and not pattern.causal:
        ours &= kv <= q + right
    if pattern.sequence_ids is not None:
        ids = pattern.sequence_ids.expand(batch_size, -1)
        ours &= ids[:, None, rows, None] == ids[:, None, None, kv_offset : kv_offset + kv_length]
    return bool(torch.equal(theirs, ours))


def _lengths_to_cu(lengths: torch.Tensor) -> torch.Tensor:
    """(S,) lengths -> int32 (S + 1,) offsets starting at 0."""
    return F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def _packed(sequence_ids: torch.Tensor, batch_size: int) -> Ragged:
    """Packed rows ``(B, N)`` of sequence ids (HF's packed_sequence_mask: a new id where positions restart) as
    ``cu_seqlens`` over the ``B * N`` tokens in order; a row's end also ends a sequence. One host sync."""
    ids = sequence_ids.expand(batch_size, -1)
    starts = torch.ones_like(ids, dtype=torch.bool)  # (B, N): a token that begins a sequence
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    first = starts.flatten().nonzero().flatten()  # (S,): host sync, one per forward
    cu = torch.cat([first, first.new_tensor([ids.numel()])]).to(torch.int32)
    max_len = int(cu.diff().max()) if first.numel() else 0
    return Ragged(None, cu, max_len, None, cu, max_len)


def _mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    use_vmap: bool = False,
    device="cpu",
    **kwargs,
):
    """HF's mask function for this implementation: a ``Layout``, or HF's 4-D SDPA mask for what it cannot read."""
    from transformers import masking_utils

    if isinstance(attention_mask, Layout):  # prepared by generate() for this very step
        return attention_mask

    def foreign() -> torch.Tensor:
        """HF's own 4-D SDPA mask, for a mask the kernels do not take: the attention function runs SDPA with it."""
        _warn_once(  # the key the attention function's warning shares: one warning for one fallback
            "sdpa",
            "attention.hf: this model's attention mask is not one the chapter3 kernels take (a custom 4-D mask, an "
            "overlay, chunked attention, padding inside a sliding window); running PyTorch's SDPA with HF's mask",
        )
        kwargs.pop("allow_is_causal_skip", None)
        return masking_utils.sdpa_mask(
            batch_size=batch_size,
            q_length=q_length,
            kv_length=kv_length,
            q_offset=q_offset,
            kv_offset=kv_offset,
            mask_function=mask_function,
            attention_mask=attention_mask,
            use_vmap=use_vmap,
            device=device,
            allow_is_causal_skip=False,
            **kwargs,
        )

    pattern = _Pattern()
    readable = mask_function is not None and not use_vmap and _read_pattern(mask_function, masking_utils, pattern)
    readable = readable and pattern.causal is not None and pattern.remapped == (pattern.sequence_ids is not None)
    if readable:
        # q_offset is a 0-d tensor on a StaticCache: read once here, not in every layer.
        q_offset = int(q_offset)
        # A parse without data (causal or not, a window) is checked once per process; a packed one every time.
        key = (pattern.causal, pattern.window) if pattern.sequence_ids is None else None
        if key not in _holds:
            readable = _pattern_holds(
                mask_function, pattern, batch_size, q_length, kv_length, q_offset, kv_offset, device
            )
            if readable and key is not None:
                _holds.add(key)
    if not readable:
        return foreign()
    window = pattern.window or (-1, -1)
    # Keys hold positions kv_offset, kv_offset + 1, ...; under a causal mask the filled ones end with the last
    # query's position and no query sees past it (a StaticCache's unfilled tail). A bidirectional mask sees all
    # kv_length keys, as HF's sdpa does (cross-attention's keys are the encoder's, not a cache).
    kv_used = max(0, min(kv_length, q_offset + q_length - kv_offset)) if pattern.causal else kv_length
    if pattern.sequence_ids is not None:
        return Layout(pattern.causal, window, q_length, kv_used, ragged=_packed(pattern.sequence_ids, batch_size))
    if attention_mask is None:
        return Layout(pattern.causal, window, q_length, kv_used)
    padding = masking_utils.prepare_padding_mask(attention_mask, kv_length, kv_offset)
    keys = padding[:, kv_offset : kv_offset + kv_used]  # (B, kv_used): the filled keys' padding
    if pattern.causal:
        queries = padding[:, q_offset : q_offset + q_length]  # (B, Nq): the queries', a slice of the same mask
    else:
        # A bidirectional mask restricts the keys only (its queries may be another sequence's: cross-attention):
        # every query sees the kept keys, as in HF's sdpa.
        queries = torch.ones(batch_size, q_length, dtype=torch.bool, device=padding.device)
    layout = _padded(pattern.causal, window, q_length, kv_used, queries, keys)
    if layout is None:
        return foreign()
    return layout


def _padded(causal, window, q_length, kv_used, queries: torch.Tensor, keys: torch.Tensor) -> Layout | None:
    """A Layout for a 2-D padding mask: none if nothing is padded, ``leftpad`` for a step whose padding precedes
    each sequence's keys (the decode kernel's case), else ``Ragged`` for the varlen kernel. None for padding under
    a sliding window that the packed sequences would not place as HF does: HF's window counts positions, padded
    ones included; the packed sequences count kept keys, which is the same only where no padding sits between a
    row's kept keys, and with causal alignment."""
    lens_q = queries.sum(1, dtype=torch.int32)  # (B,)
    lens_k = keys.sum(1, dtype=torch.int32)  # (B,)
    first_k = keys.int().argmax(1).to(torch.int32)  # (B,): the first kept key (0 for a row with none)
    last_k = kv_used - 1 - keys.flip(1).int().argmax(1).to(torch.int32)  # (B,): the last kept key
    suffix = (first_k + lens_k == kv_used) | (lens_k == 0)  # (B,): the kept keys are the row's last ones
    gapless = (last_k - first_k + 1 == lens_k) | (lens_k == 0)  # (B,): no padding between kept keys
    # One host sync for all the decisions below.
    min_q, max_q, min_k, max_k, all_suffix, all_gapless = torch.stack(
        [lens_q.min(), lens_q.max(), lens_k.min(), lens_k.max(), suffix.all().int(), gapless.all().int()]
    ).tolist()
    if min_q == q_length and min_k == kv_used:
        return Layout(causal, window, q_length, kv_used)
    if window != (-1, -1) and not (causal and all_gapless):
        return None
    step = kv_used > q_length and q_length <= fused.DECODE_MAX_TOKENS  # a few new tokens against a cache
    if step and min_q == q_length and all_suffix and min_k > 0:
        return Layout(causal, window, q_length, kv_used, leftpad=first_k, padding=(queries, keys))
    return Layout(causal, window, q_length, kv_used, ragged=_ragged(queries, keys, lens_q, lens_k, max_q, max_k))


def _ragged(queries, keys, lens_q, lens_k, max_q: int, max_k: int) -> Ragged:
    """The kept tokens of (B, Nq) / (B, Nk) masks whose row sums are lens_q / lens_k, as packed sequences."""
    q_index = queries.nonzero(as_tuple=True)  # host sync
    k_index = keys.nonzero(as_tuple=True)  # host sync
    return Ragged(q_index, _lengths_to_cu(lens_q), max_q, k_index, _lengths_to_cu(lens_k), max_k)


# ----------------------------------------------------------------------------------------------
# The attention function
# ----------------------------------------------------------------------------------------------


def _kernel_options(scaling, softcap, sinks) -> dict:
    """softcap and sinks only when set, so a model without them runs on any kernel version."""
    options = {"softmax_scale": None if scaling is None else float(scaling)}
    if softcap is not None and softcap != 0:
        options["softcap"] = float(softcap)
    if sinks is not None:
        options["sinks"] = sinks
    return options


def _sdpa_fallback(module, query, key, value, attention_mask, dropout, scaling, softcap, sinks, **kwargs):
    """HF's own SDPA with HF's mask, for masks this module does not read."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if softcap is not None or sinks is not None:
        raise ValueError(
            "attention.hf: this model's mask is not one the chapter3 kernels read, and its softcap / attention "
            "sinks rule out the SDPA fallback; use attn_implementation='eager' for it"
        )
    _warn_once(
        "sdpa",
        f"attention.hf: got a {type(attention_mask).__name__} mask of shape {tuple(attention_mask.shape)} that the "
        "chapter3 kernels do not take; running PyTorch's SDPA with it",
    )
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def _from_kwargs(kwargs, batch_size: int) -> Ragged | None:
    """Packed sequences described by HF's flash-attention kwargs (DataCollatorWithFlattening with
    ``return_flash_attn_kwargs=True``): ``cu_seq_lens_q/k`` and ``max_length_q/k``, a batch of one row."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None and cu_k is None:
        return None
    if cu_q is None or cu_k is None:
        raise ValueError("attention.hf: cu_seq_lens_q and cu_seq_lens_k come together; got only one of them")
    if batch_size != 1:
        raise ValueError(f"attention.hf: packed sequences (cu_seq_lens_q/k) come as a batch of 1 row, got {batch_size}")
    max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
    max_q = int(cu_q.diff().max()) if max_q is None else int(max_q)
    max_k = int(cu_k.diff().max()) if max_k is None else int(max_k)
    return Ragged(None, cu_q.to(torch.int32), max_q, None, cu_k.to(torch.int32), max_k)


# The last position_ids seen and what they say, so that packing is read once per forward, not in every layer:
# (tensor, its version counter, Ragged or None).
_positions_seen: list = [None, -1, None]


def _packed_from_positions(position_ids: torch.Tensor | None, batch_size: int) -> Ragged | None:
    """Packed sequences told by ``position_ids`` that restart inside a row, as FlashAttention-2's HF path reads
    them. HF's mask machinery sees them only without a cache (``use_cache=False``); a training step with the
    default cache passes them here alone. One host sync per new position_ids tensor."""
    from transformers.masking_utils import find_packed_sequence_indices

    if position_ids is None or position_ids.dim() != 2:
        return None
    tensor, version, ragged = _positions_seen
    if tensor is position_ids and version == position_ids._version:
        return ragged
    ids = find_packed_sequence_indices(position_ids.expand(batch_size, -1))  # (B, N) or None: a host sync
    ragged = None if ids is None else _packed(ids, batch_size)
    _positions_seen[:] = [position_ids, position_ids._version, ragged]
    return ragged


def _attend_ragged(q, k, v, ragged: Ragged, *, causal, dropout_p, window, options) -> torch.Tensor:
    """q (B, Nq, Hq, D), k, v (B, Nk, Hkv, D) through the varlen kernel in one launch: (B, Nq, Hq, D), zeros at
    padded queries."""
    from chapter3_flash.kernels import flash_attention_varlen

    B, Nq, Hq, D = q.shape

    def pack(t, index):
        if index is None:  # every token, in order: (B * N, H, D)
            return t.reshape(-1, *t.shape[2:])
        return t[index]  # (total, H, D): one gather of the kept tokens

    out = flash_attention_varlen(
        pack(q, ragged.q_index),
        pack(k, ragged.k_index),
        pack(v, ragged.k_index),
        ragged.cu_seqlens_q,
        ragged.cu_seqlens_k,
        ragged.max_seqlen_q,
        ragged.max_seqlen_k,
        causal=causal,
        dropout_p=dropout_p,
        window_size=window,
        backend=fused.current_backend(),
        **options,
    )  # (total_q, Hq, D)
    if ragged.q_index is None:
        return out.view(B, Nq, Hq, D)
    return out.new_zeros(B, Nq, Hq, D).index_put(ragged.q_index, out)


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """HF's attention call on the chapter3 kernels: query ``(B, Hq, Nq, D)``, key and value ``(B, Hkv, Nk, D)``
    (not repeated per query head) -> ``((B, Nq, Hq, D), None)``."""
    if kwargs.get("output_attentions"):
        raise ValueError(
            "attention.hf: output_attentions=True needs the attention weights, which the chapter3 kernels never "
            "form; run this call with attn_implementation='eager'"
        )
    # The front door first: HF's tensors and dropout as the kernels take them, before any slicing or gathering.
    checks.check_qkv(query, key, value)
    dropout = checks.check_dropout(dropout)
    sinks = kwargs.pop("s_aux", None)
    if attention_mask is not None and not isinstance(attention_mask, Layout):
        return _sdpa_fallback(module, query, key, value, attention_mask, dropout, scaling, softcap, sinks, **kwargs)
    if attention_mask is None:
        # No mask function ran (a model that builds no mask): the module's own flags.
        causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", True)))
        window = (sliding_window - 1, 0) if sliding_window else (-1, -1)
        attention_mask = Layout(causal, window, query.shape[2], key.shape[2])
    layout = attention_mask
    if sliding_window and layout.window[0] not in (sliding_window - 1, sliding_window):
        raise ValueError(
            f"attention.hf: the layer passes sliding_window={sliding_window} but its mask has window {layout.window}"
        )
    if query.shape[2] != layout.q_length or key.shape[2] < layout.kv_used or value.shape[2] != key.shape[2]:
        raise ValueError(
            f"attention.hf: query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)} do not "
            f"match the mask's {layout.q_length} queries and {layout.kv_used} keys in use"
        )
    options = _kernel_options(scaling, softcap, sinks)
    k = key[:, :, : layout.kv_used]  # (B, Hkv, kv_used, D): a StaticCache's filled part, a view
    v = value[:, :, : layout.kv_used]
    ragged = _from_kwargs(kwargs, query.shape[0]) or layout.ragged
    if ragged is None and layout.leftpad is not None and (dropout > 0 or fused.needs_grad(query, k, v)):
        # The decode kernel is forward only, without dropout: this step goes through varlen (rare: a few tokens
        # trained against a cache), its token indices read here, in each layer.
        queries, keys = layout.padding
        lens_q, lens_k = queries.sum(1, dtype=torch.int32), keys.sum(1, dtype=torch.int32)
        max_q, max_k = torch.stack([lens_q.max(), lens_k.max()]).tolist()
        ragged = _ragged(queries, keys, lens_q, lens_k, max_q, max_k)
    if ragged is None and layout.leftpad is None and query.shape[2] == layout.kv_used > 1:
        # A whole sequence per row, no past: position_ids restarting inside a row are packed sequences.
        ragged = _packed_from_positions(kwargs.get("position_ids"), query.shape[0])
    if ragged is not None:
        out = _attend_ragged(
            query.transpose(1, 2),  # (B, Nq, Hq, D), views
            k.transpose(1, 2),
            v.transpose(1, 2),
            ragged,
            causal=layout.causal,
            dropout_p=dropout,
            window=layout.window,
            options=options,
        )
        return out, None
    if layout.leftpad is not None:
        out = flash_attention_with_kvcache(
            query,
            k,
            v,
            cache_seqlens=layout.kv_used,
            cache_leftpad=layout.leftpad,
            causal=layout.causal,
            window_size=layout.window,
            backend=fused.current_backend(),
            **options,
        )
    else:  # a few new tokens against a cache go to the decode kernel, a longer chunk to flash_attention
        out = fused.attend_newest(
            query, k, v, causal=layout.causal, dropout_p=dropout, window_size=layout.window, **options
        )  # (B, Hq, Nq, D)
    return out.transpose(1, 2), None  # (B, Nq, Hq, D)


def import_transformers():
    """``import transformers`` (ImportError where it is not installed). From a checkout's root, where our
    ``kernels/`` folder could shadow Hugging Face's ``kernels`` package that transformers imports, the folder hands
    the bare name over to Hugging Face's (kernels/__init__.py)."""
    import transformers

    return transformers


def register(name: str = DEFAULT_NAME) -> str:
    """Register the chapter3 attention and mask functions with transformers under ``name`` (idempotent); returns
    the name for ``model.set_attn_implementation(name)`` or ``from_pretrained(..., attn_implementation=name)``."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    if "flash" in name.lower():
        raise ValueError(
            f"name {name!r} contains 'flash': transformers would take it for a hub FlashAttention kernel; pick "
            "another (the default is 'chapter3')"
        )
    transformers = import_transformers()
    AttentionInterface = transformers.AttentionInterface
    AttentionMaskInterface = transformers.masking_utils.AttentionMaskInterface

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, _mask)
    return name
