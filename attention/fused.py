"""The chapter's layers with the fused attention core: drop-in replacements, line for line.

Each class subclasses its counterpart in ``attention.reference`` and keeps its constructor, so
parameters, buffers (the ``mask`` stays, for checkpoints both ways), ``state_dict`` keys and the weights
drawn after ``torch.manual_seed`` are the very same. Only ``forward`` changes: the projections are
called as modules at call time, exactly as the chapter's code does (GPT-2 weight loading assigns new
Parameters to them; LoRA wraps them, appendix E) and the attention itself is one
``kernels.flash_attention`` call, with no ``(b, num_heads, T, T)`` tensor and no copies around it.

Which path runs is ``kernels.flash_attention``'s ``"auto"``: the Triton kernels on CUDA, PyTorch's fused
SDPA kernels elsewhere. ``use_backend`` picks another for a block of code (tests, comparisons); the choice
lives in the kernels' one settings object (``chapter3_flash.kernels.settings``, field ``backend``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from chapter3_flash.kernels import flash_attention, flash_attention_with_kvcache, settings
from torch import nn

from . import reference
from .reference import _check_context, _check_projected, _check_rank, _check_width, in_features


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run every fused layer's attention on ``name`` ("auto", "triton", "sdpa" or "torch") inside the block."""
    with settings.override(backend=name):
        yield


def current_backend() -> str:
    return settings.current.backend


# New tokens per cached call up to which the cached layers run the split-KV decode kernel; a longer chunk (a
# prompt) goes through flash_attention.
DECODE_MAX_TOKENS = 16


def needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def decodes(n_new: int, dropout_p: float, grad: bool) -> bool:
    """Whether a cached call of ``n_new`` tokens runs the decode kernel: a few tokens, no dropout, no gradient
    (``needs_grad`` of its inputs: the decode kernel is forward only)."""
    return n_new <= DECODE_MAX_TOKENS and dropout_p == 0.0 and not grad


def attend_newest(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, dropout_p: float, **kw
) -> torch.Tensor:
    """The queries as the newest positions of the keys k, v hold (a step against a whole cache, bottom-right):
    a few new tokens without dropout or gradient through the split-KV decode kernel, anything else through
    ``flash_attention``. ``kw``: softmax_scale, window_size."""
    n = q.shape[2]
    if n <= k.shape[2] and decodes(n, dropout_p, needs_grad(q, k, v)):
        backend = current_backend()
        return flash_attention_with_kvcache(q, k, v, cache_seqlens=k.shape[2], causal=causal, backend=backend, **kw)
    return _attend(q, k, v, causal=causal, dropout_p=dropout_p, **kw)


def project_heads(layer: nn.Module, x: torch.Tensor, name: str, heads: int) -> torch.Tensor:
    """The layer's projection ``name`` of x split into heads: (b, T, d_in) -> (b, T, heads, head_dim), a view. A
    projection that is not an nn.Linear (LoRA, quantized) is checked by the width it returns."""
    y = getattr(layer, name)(x)  # (b, T, heads * head_dim)
    _check_projected(y, heads * layer.head_dim, name, type(layer).__name__)
    return y.view(x.shape[0], x.shape[1], heads, layer.head_dim)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, dropout_p: float, **kw) -> torch.Tensor:
    return flash_attention(q, k, v, causal=causal, dropout_p=dropout_p, backend=settings.current.backend, **kw)


def _dropout_p(dropout: nn.Dropout) -> float:
    # nn.Dropout semantics: active only while the module is in training mode.
    return dropout.p if dropout.training else 0.0


def _as_batch(x: torch.Tensor, layer: str) -> tuple[torch.Tensor, bool]:
    """v1/v2 take the chapter's (T, d_in) and also a batch (b, T, d_in)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{layer} expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 2:
        return x.unsqueeze(0), True
    if x.dim() == 3:
        return x, False
    raise ValueError(
        f"{layer} expects input of shape (num_tokens, d_in) or (batch, num_tokens, d_in), got {tuple(x.shape)}"
    )


def simplified_self_attention(x: torch.Tensor) -> torch.Tensor:
    """Step 1 fused: softmax(x x^T) x, unscaled (softmax_scale = 1)."""
    _check_rank(x, 2, "(num_tokens, d)", "simplified_self_attention")
    xs = x[None, None]  # (1, 1, T, d)
    return _attend(xs, xs, xs, causal=False, dropout_p=0.0, softmax_scale=1.0)[0, 0]  # (T, d)


class SelfAttention_v1(reference.SelfAttention_v1):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, squeeze = _as_batch(x, type(self).__name__)
        _check_width(x, self.W_query.shape[0], type(self).__name__)
        queries = (x @ self.W_query).unsqueeze(1)  # (b, 1, T, d_out)
        keys = (x @ self.W_key).unsqueeze(1)
        values = (x @ self.W_value).unsqueeze(1)
        context = _attend(queries, keys, values, causal=False, dropout_p=0.0).squeeze(1)  # (b, T, d_out)
        return context[0] if squeeze else context


class SelfAttention_v2(reference.SelfAttention_v2):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, squeeze = _as_batch(x, type(self).__name__)
        _check_width(x, in_features(self.W_query), type(self).__name__)
        queries = self.W_query(x).unsqueeze(1)  # (b, 1, T, d_out)
        keys = self.W_key(x).unsqueeze(1)
        values = self.W_value(x).unsqueeze(1)
        context = _attend(queries, keys, values, causal=False, dropout_p=0.0).squeeze(1)  # (b, T, d_out)
        return context[0] if squeeze else context


class CausalAttention(reference.CausalAttention):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_rank(x, 3, "(batch, num_tokens, d_in)", type(self).__name__)
        _check_width(x, in_features(self.W_query), type(self).__name__)
        num_tokens = x.shape[1]
        _check_context(num_tokens, self.mask.shape[0], type(self).__name__)
        queries = self.W_query(x).unsqueeze(1)  # (b, 1, T, d_out): one head of width d_out
        keys = self.W_key(x).unsqueeze(1)
        values = self.W_value(x).unsqueeze(1)
        context = _attend(queries, keys, values, causal=True, dropout_p=_dropout_p(self.dropout))
        return context.squeeze(1)  # (b, T, d_out)


class MultiHeadAttentionWrapper(reference.MultiHeadAttentionWrapper):
    """All heads in one kernel launch; the heads stay separate CausalAttention modules (same state_dict)."""

    @reference.takes_block_size
    def __init__(
        self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int, qkv_bias: bool = False
    ):
        nn.Module.__init__(self)
        self.heads = nn.ModuleList(
            [CausalAttention(d_in, d_out, context_length, dropout, qkv_bias) for _ in range(num_heads)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads = list(self.heads)
        p = {_dropout_p(h.dropout) for h in heads}
        shapes = {(in_features(h.W_query), h.d_out, h.mask.shape[0]) for h in heads}
        if len(p) != 1 or len(shapes) != 1:
            # Heads edited to differ from each other: run them one by one, each still fused.
            return torch.cat([head(x) for head in heads], dim=-1)
        _check_rank(x, 3, "(batch, num_tokens, d_in)", type(self).__name__)
        _check_width(x, in_features(heads[0].W_query), type(self).__name__)
        b, num_tokens, _ = x.shape
        _check_context(num_tokens, heads[0].mask.shape[0], type(self).__name__)
        d_out, nh = heads[0].d_out, len(heads)

        def project(name: str) -> torch.Tensor:
            layers = [getattr(h, name) for h in heads]
            if all(type(lin) is nn.Linear for lin in layers):
                # One matmul for all heads: the heads' (d_out, d_in) weights stacked to (nh * d_out, d_in).
                bias = None if layers[0].bias is None else torch.cat([lin.bias for lin in layers])
                y = F.linear(x, torch.cat([lin.weight for lin in layers]), bias)  # (b, T, nh * d_out)
                return y.view(b, num_tokens, nh, d_out).transpose(1, 2)  # (b, nh, T, d_out)
            # Wrapped projections (LoRA, quantized): each called as the chapter calls it.
            y = torch.stack([lin(x) for lin in layers], dim=1)  # (b, nh, T, d_out)
            _check_projected(y, d_out, name, type(self).__name__)
            return y

        context = _attend(project("W_query"), project("W_key"), project("W_value"), causal=True, dropout_p=p.pop())
        # (b, nh, T, d_out) -> (b, T, nh * d_out): the heads' outputs concatenated on the last dim.
        return context.transpose(1, 2).reshape(b, num_tokens, nh * d_out)


class MultiHeadAttention(reference.MultiHeadAttention):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_rank(x, 3, "(batch, num_tokens, d_in)", type(self).__name__)
        _check_width(x, in_features(self.W_query), type(self).__name__)
        b, num_tokens, _ = x.shape
        _check_context(num_tokens, self.mask.shape[0], type(self).__name__)
        queries, keys, values = (
            project_heads(self, x, name, self.num_heads).transpose(1, 2) for name in ("W_query", "W_key", "W_value")
        )  # (b, nh, T, hs): views of the projections
        context = _attend(queries, keys, values, causal=True, dropout_p=_dropout_p(self.dropout))  # (b, nh, T, hs)
        # The kernel writes the output in q's (b, T, nh, hs) memory layout, so this reshape is a view.
        context = context.transpose(1, 2).reshape(b, num_tokens, self.d_out)  # (b, T, d_out)
        return self.out_proj(context)
