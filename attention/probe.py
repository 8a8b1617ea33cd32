"""The check behind ``swap_attention``: a layer is converted only once its own forward and the fused forward agree.

Recognising a book class by name and layout is evidence, not proof: a reader's copy with one line changed (another
scale, no mask, interleaved RoPE as Tiny Aya has) looks the same. So before a layer is converted, both forwards run
on a small probe input and their outputs are compared:

- on twins of the layer, never on the layer itself: each twin shares the layer's float32 weights (a layer in
  another dtype gets float32 copies) and submodules, but has its own parameter, buffer and submodule tables and
  attributes, with its KV cache emptied and its position at 0. The layer's weights, buffers, caches, positions,
  hooks and training mode are exactly as they were, whatever the probe does; its own forward hooks do not fire
  (the twins' forwards are called directly), while hooks on its submodules (a projection's) do, as they would in
  any forward, since they may be part of what the projection computes (weight norm, LoRA by hook);
- float32, eval mode, ``torch.no_grad()``, exact float32 matmuls (TF32 off for the probe), on the layer's device,
  the fused side on the backend the fused layers run now (``use_backend``; "auto": Triton on CUDA, SDPA elsewhere);
- inputs drawn from a generator of their own (the caller's random stream is untouched): batch 2, a few tokens
  (7: not a multiple of any tile), the call arguments the family takes (the model's causal mask, a sliding-window
  mask, RoPE cos/sin tables, start positions; Gemma 4's 2-D masks and keys and values shared from another layer),
  and where the layer caches keys and values (or MLA's latents), an uncached call and a cached sequence (a prompt,
  one token, a chunk) with its returned caches.

Tolerance: float32 rounding, scaled by the output's magnitude: ``max|ours - theirs| <= 1e-5 * max(1, max|theirs|)``
for every output tensor. Two summation orders of one attention differ by about 1e-7 of the output's magnitude;
a changed scale, mask or rotation moves it by 1e-3 and more.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

RTOL = 1e-5  # of max(1, max|theirs|): float32 rounding of two summation orders, with room
TOKENS = 7  # probe length: not a multiple of any kernel tile
BATCH = 2


class Disagreement(Exception):
    """The two forwards differ (or one failed: ``failed``): the message says how."""

    def __init__(self, message: str, failed: bool = False):
        super().__init__(message)
        self.failed = failed


def twin(module: nn.Module, cast: bool) -> nn.Module:
    """A shallow copy of ``module`` and its submodules to run the probe on (see the module docstring): tables and
    attributes of its own, tensors shared; with ``cast``, floating tensors not in float32 are copied to float32."""
    copy = object.__new__(type(module))
    copy.__dict__.update(module.__dict__)  # attributes: its own dict, the same values
    copy._parameters = {k: _float32(p, cast, parameter=True) for k, p in module._parameters.items()}
    copy._buffers = {k: _float32(b, cast) for k, b in module._buffers.items()}
    copy._modules = {k: None if m is None else twin(m, cast) for k, m in module._modules.items()}
    copy.training = False
    # A cache the layer holds is the user's: the twins start empty, at position 0 (and never write into it).
    for name in [b for b in copy._buffers if b.startswith("cache")]:
        copy._buffers[name] = None
    for attr in ("ptr_current_pos", "ptr_cur"):
        if isinstance(copy.__dict__.get(attr), int):
            copy.__dict__[attr] = 0
    return copy


def _float32(t, cast: bool, parameter: bool = False):
    if t is None or not cast or not t.is_floating_point() or t.dtype == torch.float32:
        return t
    t = t.detach().float()
    return nn.Parameter(t, requires_grad=False) if parameter else t


def needs_cast(module: nn.Module) -> bool:
    tensors = list(module.parameters()) + list(module.buffers())
    return any(t.is_floating_point() and t.dtype != torch.float32 for t in tensors)


def device_of(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def _exact_float32() -> Iterator[None]:
    """Exact float32 matmuls for the probe (a TF32 setting would move both sides by 1e-3)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


# --- the calls each family takes ------------------------------------------------------------------------------
# A probe is a function (layer, inputs) -> list of outputs; it runs the same calls on both twins.


class Inputs:
    """The probe's inputs for one layer: x (BATCH, n, d_in), drawn once, and the tables its family needs."""

    def __init__(self, d_in: int, n: int, device: torch.device, head_dim: int | None = None):
        gen = torch.Generator().manual_seed(1234)
        self.n = n
        self.x = torch.randn(BATCH, n, d_in, generator=gen).to(device)
        self.device = device
        if head_dim is not None and head_dim % 2 == 0:
            self.cos, self.sin = rope_tables(head_dim, n, device)

    def mask(self, start: int, end: int, window: int | None = None, broadcast: bool = False) -> torch.Tensor:
        """The models' mask for the positions [start, end): True above the diagonal (hidden), and with ``window``
        also ``window`` or more keys behind; ``broadcast``: (1, 1, n, end) as the pkg's cached models pass it."""
        ones = torch.ones(end, end, dtype=torch.bool, device=self.device)
        hidden = torch.triu(ones, diagonal=1)
        if window is not None:
            hidden = hidden | torch.triu(ones, diagonal=window).T
        hidden = hidden[start:end, :end]
        return hidden[None, None] if broadcast else hidden


def rope_tables(head_dim: int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The book's split-halves RoPE tables (base 10,000) for n positions: cos, sin (n, head_dim)."""
    inv_freq = 1.0 / (10_000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.arange(n, dtype=torch.float32)[:, None] * inv_freq[None, :]  # (n, head_dim / 2)
    angles = torch.cat([angles, angles], dim=1)  # (n, head_dim)
    return angles.cos().to(device), angles.sin().to(device)


def chunks(n: int, most: int) -> list[tuple[int, int]]:
    """[start, end) spans covering n tokens for a cached sequence: a prompt of up to 4, one token, then chunks
    of up to 2, none longer than ``most``."""
    spans, start = [], 0
    for want in [4, 1] + [2] * n:
        if start >= n:
            break
        end = min(start + want, start + most, n)
        spans.append((start, end))
        start = end
    return spans


def plain(layer: nn.Module, inp: Inputs) -> list:
    """forward(x): chapter 3, the fused-QKV SDPA layer."""
    return [layer.forward(inp.x)]


def tokens_only(layer: nn.Module, inp: Inputs) -> list:
    """forward(x) with x (num_tokens, d_in): the chapter's SelfAttention_v1 and _v2."""
    return [layer.forward(inp.x[0])]


def use_cache(most: int) -> Callable[[nn.Module, Inputs], list]:
    """forward(x); then forward(chunk, use_cache=True) over the tokens (the ch04 KV-cache layers), then forward(x)
    again (a call without the cache resets it); ``most``: the longest chunk the layer takes (its window)."""

    def calls(layer: nn.Module, inp: Inputs) -> list:
        out = [layer.forward(inp.x)]
        out += [layer.forward(inp.x[:, a:b], use_cache=True) for a, b in chunks(inp.n, most)]
        out.append(getattr(layer, "ptr_current_pos", None))  # the position a model may read
        out.append(layer.forward(inp.x))
        return out

    return calls


def rope(local_window: int | None = None) -> Callable[[nn.Module, Inputs], list]:
    """forward(x, mask, cos, sin) with the models' causal mask (Llama 3.2, Qwen3, Gemma 3) and, with
    ``local_window``, also with a sliding-window mask (Gemma 3's local layers)."""

    def calls(layer: nn.Module, inp: Inputs) -> list:
        out = [layer.forward(inp.x, inp.mask(0, inp.n), inp.cos, inp.sin)]
        if local_window is not None:
            out.append(layer.forward(inp.x, inp.mask(0, inp.n, local_window), inp.cos, inp.sin))
        return out

    return calls


def rope_causal(layer: nn.Module, inp: Inputs) -> list:
    """forward(x, cos, sin): the pkg's Llama3ModelFast layer (causal inside)."""
    return [layer.forward(inp.x, inp.cos, inp.sin)]


def multihead(layer: nn.Module, inp: Inputs) -> list:
    """nn.MultiheadAttention as the ch03 bonus notebook calls it (self-attention, the causal boolean mask, no
    weights), also with is_causal, and a call it does not fuse (weights asked for): PyTorch's own both ways."""
    x, mask = inp.x, inp.mask(0, inp.n)
    return [
        layer.forward(x, x, x, attn_mask=mask, need_weights=False),
        layer.forward(x, x, x, attn_mask=mask, need_weights=False, is_causal=True),
        layer.forward(x, x, x, attn_mask=mask),
    ]


def pkg_cached(layer: nn.Module, inp: Inputs) -> list:
    """The pkg's GPT-2 cached layer: forward(x); then forward(chunk, use_cache=True, start_pos, cache) over the
    tokens, each call given the cache the previous one returned."""
    out, cache = [layer.forward(inp.x)], None
    for a, b in chunks(inp.n, inp.n):
        context, cache = layer.forward(inp.x[:, a:b], use_cache=True, start_pos=a, cache=cache)
        out += [context, cache]
    return out


def pkg_rope(local_window: int | None = None) -> Callable[[nn.Module, Inputs], list]:
    """The pkg's cached Llama 3.2 / Qwen3 (and Gemma 3's notebook): forward(chunk, mask, cos, sin, start_pos,
    cache) over the tokens with the model's mask for those positions; with ``local_window`` also a sliding one."""

    def calls(layer: nn.Module, inp: Inputs) -> list:
        out = []
        for window in (None, local_window) if local_window is not None else (None,):
            cache = None
            for a, b in chunks(inp.n, inp.n):
                mask = inp.mask(a, b, window, broadcast=True)
                context, cache = layer.forward(inp.x[:, a:b], mask, inp.cos, inp.sin, start_pos=a, cache=cache)
                out += [context, cache]
        return out

    return calls


def pkg_batched(layer: nn.Module, inp: Inputs) -> list:
    """The pkg's batched Qwen3 layer as its model calls it: forward(x, mask, cos, sin, start_pos=zeros(b)) without a
    cache; then over the tokens with a (b,) tensor of positions and the list of per-sequence caches the previous
    call returned (a list of None at first), the mask (b, 1, n, T) of each sequence's rows."""
    b = inp.x.shape[0]
    zeros = torch.zeros(b, dtype=torch.long, device=inp.device)
    out = [layer.forward(inp.x, inp.mask(0, inp.n, broadcast=True), inp.cos, inp.sin, start_pos=zeros, cache=None)]
    cache = [None] * b
    for a, e in chunks(inp.n, inp.n):
        mask = inp.mask(a, e, broadcast=True).expand(b, 1, e - a, e).contiguous()
        context, cache = layer.forward(inp.x[:, a:e], mask, inp.cos, inp.sin, start_pos=zeros + a, cache=cache)
        out += [context, cache]
    return out


def _shared_kv(layer: nn.Module, inp: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values (BATCH, num_kv_heads, n, head_dim) as an earlier Gemma 4 layer hands a KV-shared one, drawn
    from a generator of their own (the same tensors for both forwards)."""
    gen = torch.Generator().manual_seed(4321)
    shape = (BATCH, layer.num_kv_heads, inp.n, layer.head_dim)
    return torch.randn(shape, generator=gen).to(inp.device), torch.randn(shape, generator=gen).to(inp.device)


def gemma4(local_window: int) -> Callable[[nn.Module, Inputs], list]:
    """Gemma 4's forward(x, mask, cos, sin, shared_kv=None, return_kv=False) -> (output, kv): its masks are 2-D
    (n, n) (its forward adds the batch and head dimensions itself); the causal and a sliding-window mask with the
    keys and values it computes returned, then a call on keys and values shared from another layer."""

    def calls(layer: nn.Module, inp: Inputs) -> list:
        out = [
            layer.forward(inp.x, inp.mask(0, inp.n, window), inp.cos, inp.sin, return_kv=True)
            for window in (None, local_window)
        ]
        out.append(layer.forward(inp.x, inp.mask(0, inp.n), inp.cos, inp.sin, shared_kv=_shared_kv(layer, inp)))
        return out

    return calls


def gemma4_cached(local_window: int) -> Callable[[nn.Module, Inputs], list]:
    """Gemma 4's KV-cache notebook: forward(chunk, mask, cos, sin, start_pos, cache) -> (output, next_cache) over
    the tokens, 2-D masks (n_chunk, end) causal and sliding, each call given the cache the previous one returned;
    then the last token on keys and values shared from another layer (no cache of its own: None returned)."""

    def calls(layer: nn.Module, inp: Inputs) -> list:
        out = []
        for window in (None, local_window):
            cache = None
            for a, b in chunks(inp.n, inp.n):
                context, cache = layer.forward(inp.x[:, a:b], inp.mask(a, b, window), inp.cos, inp.sin, a, cache)
                out += [context, cache]
        last = inp.n - 1
        shared = _shared_kv(layer, inp)
        out.append(
            layer.forward(inp.x[:, last:], inp.mask(last, inp.n), inp.cos, inp.sin, last, None, shared_kv=shared)
        )
        return out

    return calls


# --- comparing --------------------------------------------------------------------------------------------------


def _leaves(out) -> list:
    if isinstance(out, (tuple, list)):
        return [leaf for item in out for leaf in _leaves(item)]
    return [out]


def compare(theirs: list, ours: list) -> None:
    """Raise Disagreement unless every output tensor agrees within the tolerance (module docstring) and every
    other output (None, a position) is equal."""
    a_leaves, b_leaves = _leaves(theirs), _leaves(ours)
    if len(a_leaves) != len(b_leaves):
        raise Disagreement(f"the two forwards return {len(a_leaves)} and {len(b_leaves)} values")
    worst = None  # (abs diff, rel diff, index)
    for i, (a, b) in enumerate(zip(a_leaves, b_leaves)):
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            if a != b:
                raise Disagreement(f"output {i} is {a!r} from the layer's forward and {b!r} from the fused one")
            continue
        if a.shape != b.shape:
            shapes = f"{tuple(a.shape)} from the layer's forward, {tuple(b.shape)} from the fused one"
            raise Disagreement(f"output {i} has shape {shapes}")
        a, b = a.float(), b.float()
        if not torch.equal(a.isnan(), b.isnan()):
            raise Disagreement(f"output {i} has NaNs in one forward and not the other")
        a, b = a.nan_to_num(0.0), b.nan_to_num(0.0)
        diff = float((a - b).abs().max()) if a.numel() else 0.0
        magnitude = float(a.abs().max()) if a.numel() else 0.0
        if math.isnan(diff):  # matching infinities
            diff = 0.0
        if diff > RTOL * max(1.0, magnitude) and (worst is None or diff > worst[0]):
            worst = (diff, diff / magnitude if magnitude else math.inf, i)
    if worst is not None:
        diff, rel, i = worst
        raise Disagreement(
            f"max abs difference {diff:.3g} (relative {rel:.3g}; allowed {RTOL:g} x max(1, |output|)) in output {i}"
        )


def verify(module: nn.Module, target: type, calls: Callable[[nn.Module, Inputs], list], inputs: Inputs) -> None:
    """Run ``calls`` on a twin of ``module`` and on a twin converted to ``target``; raise Disagreement when they
    differ or either fails. ``module`` itself is never run nor changed."""
    cast = needs_cast(module)
    theirs_layer, ours_layer = twin(module, cast), twin(module, cast)
    ours_layer.__class__ = target
    with torch.no_grad(), _exact_float32():
        try:
            theirs = calls(theirs_layer, inputs)
        except Exception as err:  # the layer's own forward: a look-alike may take other arguments
            raise Disagreement(f"its own forward failed on the probe: {type(err).__name__}: {err}", True) from err
        try:
            ours = calls(ours_layer, inputs)
        except Exception as err:
            raise Disagreement(f"the fused forward failed on the probe: {type(err).__name__}: {err}", True) from err
    compare(theirs, ours)
