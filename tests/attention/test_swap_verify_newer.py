"""swap_attention's probe on the book's newer models (OLMo 3, Tiny Aya, Qwen3.5's gated attention, Gemma 4, MLA): each
family's calls run (the plain and the KV-cache notebooks' layers, sliding and full layers, Gemma 4's 2-D masks, tuple
returns and shared keys and values, MLA's latent cache), a fused forward off by 1e-3 is refused, and a reader's
copy with one line changed is refused with the difference and left as it was."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE
from torch import nn

from bench.book import gemma4 as book_gemma4
from bench.book import mla as book_mla
from bench.book import olmo3 as book_olmo3
from bench.book import qwen3_5 as book_qwen3_5
from bench.book import tiny_aya as book_tiny_aya
from chapter3_flash import attention

GEMMA4 = book_gemma4.TINY_CONFIG  # layers 0, 1 sliding (head_dim 16), 2 full (32); 4.. share keys and values
SLIDING = dict(sliding_window=3, attn_type="sliding_attention")  # OLMo 3's sliding layers

# One small layer of every newer family: (name, constructor).
FAMILIES = {
    "tiny_aya sliding": lambda: book_tiny_aya.GroupedQueryAttention(16, 4, 2, 8, True, attn_type="sliding_attention"),
    "tiny_aya full": lambda: book_tiny_aya.GroupedQueryAttention(16, 4, 2, 8, True, attn_type="full_attention"),
    "tiny_aya kv": lambda: book_tiny_aya.KVGroupedQueryAttention(16, 4, 2, 8, True, attn_type="sliding_attention"),
    "olmo3 sliding": lambda: book_olmo3.GroupedQueryAttention(16, 4, 2, 8, **SLIDING),
    "olmo3 full": lambda: book_olmo3.GroupedQueryAttention(16, 4, 2, 8),
    "olmo3 kv": lambda: book_olmo3.KVGroupedQueryAttention(16, 4, 2, 8, **SLIDING),
    "qwen3_5": lambda: book_qwen3_5.GroupedQueryAttention(16, 4, 2, 8, qk_norm=True),
    "qwen3_5 kv": lambda: book_qwen3_5.KVGroupedQueryAttention(16, 4, 2, 8, qk_norm=True),
    "gemma4 sliding": lambda: book_gemma4.Gemma4Attention(GEMMA4, 0),
    "gemma4 full": lambda: book_gemma4.Gemma4Attention(GEMMA4, 2),
    "gemma4 kv": lambda: book_gemma4.KVGemma4Attention(GEMMA4, 0),
    "gemma4 kv full shared": lambda: book_gemma4.KVGemma4Attention(GEMMA4, 5),
    "mla": lambda: book_mla.MultiHeadLatentAttention(16, 16, 0.0, 4, qkv_bias=True, latent_dim=6),
}


def perturbed(forward, factor):
    """A fused forward whose first output is scaled by ``factor``: what a subtly wrong conversion returns."""

    def wrong(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if isinstance(out, tuple):
            return (out[0] * factor, *out[1:])
        return out * factor

    return wrong


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_newer_family_is_probed_and_a_wrong_fused_forward_is_refused(family, monkeypatch):
    torch.manual_seed(0)
    target = type(attention.swap_attention(FAMILIES[family]().to(DEVICE)))  # verify=True: the probe agrees
    assert target.__module__.split(".")[-1] in ("tiny_aya", "olmo3", "qwen3_5", "gemma4", "mla"), family
    monkeypatch.setattr(target, "forward", perturbed(target.forward, 1 + 1e-7))  # float32 rounding: still passes
    assert type(attention.swap_attention(FAMILIES[family]().to(DEVICE))) is target
    monkeypatch.setattr(target, "forward", perturbed(target.forward, 1 + 1e-3))
    layer = FAMILIES[family]().to(DEVICE)
    book = type(layer)
    with pytest.raises(ValueError, match=r"disagree on a probe input .* max abs difference [0-9.e-]+ \(relative"):
        attention.swap_attention(nn.Sequential(layer))
    assert type(layer) is book


# Readers' copies with one line changed. Each keeps the book's class name, layout and signature.


class TinyAyaRotatingFullLayers(book_tiny_aya.GroupedQueryAttention):
    def forward(self, x, mask, cos, sin):
        q, k, v = self._heads(x)
        q, k = book_tiny_aya.apply_rope(q, cos, sin), book_tiny_aya.apply_rope(k, cos, sin)  # on every layer
        return self._attend(q, k, v, mask)


class TinyAyaCacheRotatedAtZero(book_tiny_aya.KVGroupedQueryAttention):
    def forward(self, x, mask, cos, sin, start_pos=0, cache=None):
        return super().forward(x, mask, cos, sin, 0, cache)  # new tokens rotated at position 0, not start_pos


class Olmo3OtherScale(book_olmo3.GroupedQueryAttention):
    def _attend(self, q, k, v, mask):
        return super()._attend(q * self.head_dim**0.25, k, v, mask)  # scale head_dim ** -0.25


class Olmo3KVOtherScale(book_olmo3.KVGroupedQueryAttention):
    def _attend(self, q, k, v, mask):
        return super()._attend(q * self.head_dim**0.25, k, v, mask)


class Qwen3_5GateFlipped(book_qwen3_5.GroupedQueryAttention):
    def _attend(self, q, k, v, gate, mask):
        return super()._attend(q, k, v, -gate, mask)  # sigmoid(-gate)


class Gemma4Scaled(book_gemma4.Gemma4Attention):
    def _attend(self, q, k, v, mask):
        return super()._attend(q * self.head_dim**-0.5, k, v, mask)  # the usual scale, which Gemma 4 does not use


class Gemma4KVScaled(book_gemma4.KVGemma4Attention):
    def _attend(self, q, k, v, mask):
        return super()._attend(q * self.head_dim**-0.5, k, v, mask)


class MLACachedAtZero(book_mla.MultiHeadLatentAttention):
    def forward(self, x, use_cache=False):
        start, self.ptr_current_pos = self.ptr_current_pos, 0  # cached queries placed at 0: the cached calls differ
        out = super().forward(x, use_cache)
        self.ptr_current_pos = start + x.shape[1] if use_cache else 0
        return out


for _cls in (TinyAyaRotatingFullLayers, TinyAyaCacheRotatedAtZero, Olmo3OtherScale, Olmo3KVOtherScale):
    _cls.__name__ = _cls.__qualname__ = "GroupedQueryAttention"
Qwen3_5GateFlipped.__name__ = Qwen3_5GateFlipped.__qualname__ = "GroupedQueryAttention"
for _cls in (Gemma4Scaled, Gemma4KVScaled):
    _cls.__name__ = _cls.__qualname__ = "Gemma4Attention"
MLACachedAtZero.__name__ = MLACachedAtZero.__qualname__ = "MultiHeadLatentAttention"

LOOK_ALIKES = {
    "tiny_aya RoPE on full layers": (lambda: TinyAyaRotatingFullLayers(16, 4, 2, 8, True), "Tiny Aya"),
    "tiny_aya cache at 0": (
        lambda: TinyAyaCacheRotatedAtZero(16, 4, 2, 8, True, attn_type="sliding_attention"),
        "Tiny Aya with a KV cache",
    ),
    "olmo3 scale": (lambda: Olmo3OtherScale(16, 4, 2, 8), "OLMo 3"),
    "olmo3 kv scale": (lambda: Olmo3KVOtherScale(16, 4, 2, 8, **SLIDING), "OLMo 3 with a KV cache"),
    "qwen3_5 gate": (lambda: Qwen3_5GateFlipped(16, 4, 2, 8, qk_norm=True), "Qwen3.5 gated attention"),
    "gemma4 scale": (lambda: Gemma4Scaled(GEMMA4, 2), "Gemma 4"),
    "gemma4 kv scale": (lambda: Gemma4KVScaled(GEMMA4, 0), "Gemma 4 with a KV cache"),
    "mla cache at 0": (lambda: MLACachedAtZero(16, 16, 0.0, 4, latent_dim=6), "ch04/05_mla"),
}


@pytest.mark.parametrize("look_alike", list(LOOK_ALIKES))
def test_a_newer_look_alike_with_one_line_changed_is_refused(look_alike):
    torch.manual_seed(0)
    make, book = LOOK_ALIKES[look_alike]
    layer = make().to(DEVICE)
    look_alike_cls = type(layer)
    model = nn.ModuleDict({"ok": FAMILIES["olmo3 full"]().to(DEVICE), "att": layer})
    words = rf"cannot swap att \({look_alike_cls.__qualname__}\) faithfully: it is laid out as the {book}"
    with pytest.raises(ValueError, match=words + r".* disagree on a probe input .* max abs difference") as err:
        attention.swap_attention(model)
    assert "silently change" in str(err.value)
    assert type(layer) is look_alike_cls and type(model["ok"]) is book_olmo3.GroupedQueryAttention, "nothing converted"
