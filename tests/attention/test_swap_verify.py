"""swap_attention converts only what it has verified: each family's probe runs and compares, look-alikes that compute
something else (another scale, no mask, softmax over another dim, Tiny Aya's interleaved or absent RoPE) are refused
with the difference, a refusal converts nothing, and the probe leaves the model exactly as it was."""

from __future__ import annotations

import copy

import pytest
import torch
from chapter3_flash.attention import kv_cache, qwen3, tiny_aya
from chapter3_flash.attention import reference as ref
from helpers import DEVICE
from torch import nn

from bench.book import buffers as book_buffers
from bench.book import fast as book_fast
from bench.book import gemma3 as book_gemma3
from bench.book import gqa as book_gqa
from bench.book import kv_cache as book_kv
from bench.book import kv_cache_batched as book_batched
from bench.book import kv_cache_optimized as book_kvopt
from bench.book import kv_cache_pkg as book_pkg
from bench.book import llama3 as book_llama3
from bench.book import mha_variants as book_variants
from bench.book import noncausal as book_noncausal
from bench.book import qwen3 as book_qwen3
from bench.book import swa as book_swa
from bench.book import tiny_aya as book_tiny_aya
from chapter3_flash import attention

# One small layer of every family swap_attention converts: (name, constructor).
FAMILIES = {
    "SelfAttention_v1": lambda: ref.SelfAttention_v1(8, 6),
    "SelfAttention_v2": lambda: ref.SelfAttention_v2(8, 6, qkv_bias=True),
    "CausalAttention": lambda: ref.CausalAttention(8, 6, 10, 0.0),
    "MultiHeadAttentionWrapper": lambda: ref.MultiHeadAttentionWrapper(8, 6, 10, 0.0, 2),
    "MultiHeadAttention": lambda: ref.MultiHeadAttention(8, 8, 10, 0.0, 2),
    "ch04 kv-cache": lambda: book_kv.MultiHeadAttention(8, 8, 10, 0.0, 2),
    "ch04 kv-cache optimized": lambda: book_kvopt.MultiHeadAttention(8, 8, 10, 0.0, 2, window_size=3),
    "ch04 gqa": lambda: book_gqa.GroupedQueryAttention(8, 8, 0.0, 4, 2),
    "ch04 kv mha": lambda: book_swa.MultiHeadAttention(8, 8, 0.0, 2),
    "ch04 swa": lambda: book_swa.MultiHeadAttentionWithSWA(8, 8, 0.0, 2, sliding_window_size=3),
    "llama3": lambda: book_llama3.GroupedQueryAttention(16, 16, 4, 2),
    "qwen3": lambda: book_qwen3.GroupedQueryAttention(16, 4, 2, 8, qk_norm=True),
    "gemma3": lambda: book_gemma3.GroupedQueryAttention(16, 4, 1, 8, True, query_pre_attn_scalar=16),
    "pkg gpt2": lambda: book_pkg.MultiHeadAttention(8, 8, 10, 0.0, 2),
    "pkg llama3": lambda: book_pkg.Llama3GroupedQueryAttention(16, 16, 4, 2),
    "pkg qwen3": lambda: book_pkg.Qwen3GroupedQueryAttention(16, 4, 2, 8, qk_norm=True),
    "pkg gemma3": lambda: book_pkg.Gemma3GroupedQueryAttention(16, 4, 1, 8, True, query_pre_attn_scalar=16),
    "pkg batched qwen3": lambda: book_batched.GroupedQueryAttention(16, 4, 2, 8, qk_norm=True),
    "fast mha": lambda: book_fast.PyTorchMultiHeadAttention(8, 8, 2),
    "fast gqa": lambda: book_fast.GroupedQueryAttentionFast(16, 16, 4, 2),
    "ch06 non-causal": lambda: book_noncausal.MultiHeadAttention(8, 8, 10, 0.0, 2, disable_causal_mask=True),
    "ch03 bonus combined qkv": lambda: book_variants.MultiHeadAttentionCombinedQKV(8, 8, 2, 10),
    "ch03 bonus einsum": lambda: book_variants.MHAEinsum(8, 8, 10, 0.0, 2, qkv_bias=True),
    "ch03 bonus sdpa": lambda: book_variants.MHAPyTorchScaledDotProduct(8, 8, 2, 10),
    "ch03 bonus sdpa with mask": lambda: book_variants.MHAPyTorchSDPAWithoutFlash(8, 8, 2, 10, keep_below=True),
    "ch03 bonus pytorch class": lambda: book_variants.MHAPyTorchClass(8, 8, 2, 10),
    "nn.MultiheadAttention": lambda: nn.MultiheadAttention(8, 2, batch_first=True),
    "ch03/03 with buffer": lambda: book_buffers.CausalAttentionWithBuffer(8, 6, 10, 0.0),
    "ch03/03 without buffers": lambda: book_buffers.CausalAttentionWithoutBuffers(8, 6, 10, 0.0),
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
def test_every_family_is_probed_and_a_wrong_fused_forward_is_refused(family, monkeypatch):
    torch.manual_seed(0)
    target = type(attention.swap_attention(FAMILIES[family]().to(DEVICE)))
    assert target.__module__.startswith("chapter3_flash.attention."), family
    # A fused forward off by 1e-7 (float32 rounding) still passes: the tolerance is not zero.
    monkeypatch.setattr(target, "forward", perturbed(target.forward, 1 + 1e-7))
    assert type(attention.swap_attention(FAMILIES[family]().to(DEVICE))) is target
    # Off by 1e-3: the probe sees it on every family, whatever calls it takes (masks, RoPE tables, caches).
    monkeypatch.setattr(target, "forward", perturbed(target.forward, 1 + 1e-3))
    layer = FAMILIES[family]().to(DEVICE)
    book = type(layer)
    with pytest.raises(ValueError, match=r"disagree on a probe input .* max abs difference [0-9.e-]+ \(relative"):
        attention.swap_attention(nn.Sequential(layer))
    assert type(layer) is book


# A reader's copy of the chapter's MultiHeadAttention written out, so that one line can change.
class MultiHeadAttention(nn.Module):
    scale_power = 0.5
    causal = True
    softmax_dim = -1

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        self.d_out, self.num_heads, self.head_dim = d_out, num_heads, d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x):
        b, n, _ = x.shape
        split = lambda t: t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # noqa: E731  (b, nh, T, hs)
        queries, keys, values = split(self.W_query(x)), split(self.W_key(x)), split(self.W_value(x))
        scores = queries @ keys.transpose(2, 3)
        if self.causal:
            scores.masked_fill_(self.mask.bool()[:n, :n], -torch.inf)
        weights = self.dropout(torch.softmax(scores / keys.shape[-1] ** self.scale_power, dim=self.softmax_dim))
        context = (weights @ values).transpose(1, 2).reshape(b, n, self.d_out)  # (b, T, d_out)
        return self.out_proj(context)


class OtherScale(MultiHeadAttention):
    scale_power = 0.25  # / keys.shape[-1] ** 0.25


class NoCausalMask(MultiHeadAttention):
    causal = False  # the mask buffer is there, the forward never applies it


class SoftmaxOverQueries(MultiHeadAttention):
    softmax_dim = -2


for _cls in (OtherScale, NoCausalMask, SoftmaxOverQueries):
    _cls.__name__ = _cls.__qualname__ = "MultiHeadAttention"


def test_a_faithful_copy_written_out_is_converted():
    torch.manual_seed(0)
    layer = MultiHeadAttention(16, 16, 12, 0.0, 4).to(DEVICE)
    x = torch.randn(2, 9, 16, device=DEVICE)
    expected = layer(x)
    attention.swap_attention(layer)
    assert type(layer) is attention.MultiHeadAttention
    torch.testing.assert_close(layer(x), expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("look_alike", [OtherScale, NoCausalMask, SoftmaxOverQueries], ids=["scale", "mask", "dim"])
def test_a_look_alike_with_one_line_changed_is_refused_and_nothing_is_converted(look_alike):
    torch.manual_seed(0)
    model = nn.Sequential(ref.MultiHeadAttention(16, 16, 12, 0.0, 4), look_alike(16, 16, 12, 0.0, 4)).to(DEVICE)
    words = (
        r"cannot swap 1 \(MultiHeadAttention\) faithfully: it is laid out as the chapter 3 class, but its forward "
        r"and the fused one disagree on a probe input \(float32, 7 tokens\): max abs difference"
    )
    with pytest.raises(ValueError, match=words) as err:
        attention.swap_attention(model)
    assert "silently change" in str(err.value)
    assert type(model[0]) is ref.MultiHeadAttention and type(model[1]) is look_alike, "a refusal converts nothing"
    # Callers who have checked may skip the probe: then the name and layout decide, as before.
    attention.swap_attention(model, verify=False)
    assert type(model[1]) is attention.MultiHeadAttention


# Tiny Aya (ch05/15) as it looks to the swap: a Qwen3-style GroupedQueryAttention with an ``attn_type``; its
# sliding-window layers rotate with interleaved (GPT-J style) RoPE, its full-attention layers not at all.
def rope_interleaved(x, cos, sin):
    n = x.shape[2]
    cos, sin = cos[:n][None, None], sin[:n][None, None]  # (1, 1, n, head_dim)
    rotated = torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)  # pairs (x0, x1) -> (-x1, x0)
    return x * cos + rotated * sin


class TinyAyaLikeAttention(book_qwen3.GroupedQueryAttention):
    def __init__(self, *args, attn_type="sliding_attention", qwen3_layout=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.rule = attn_type
        if not qwen3_layout:  # without its attn_type it is laid out exactly as Qwen3's layer
            self.attn_type = attn_type

    def forward(self, x, mask, cos, sin):
        b, n, _ = x.shape
        queries = self.W_query(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        keys = self.W_key(x).view(b, n, self.num_kv_groups, self.head_dim).transpose(1, 2)
        values = self.W_value(x).view(b, n, self.num_kv_groups, self.head_dim).transpose(1, 2)
        if self.rule == "sliding_attention":
            queries, keys = rope_interleaved(queries, cos, sin), rope_interleaved(keys, cos, sin)
        keys = keys.repeat_interleave(self.group_size, dim=1)
        values = values.repeat_interleave(self.group_size, dim=1)
        scores = (queries @ keys.transpose(2, 3)).masked_fill(mask, -torch.inf)
        weights = torch.softmax(scores / self.head_dim**0.5, dim=-1)
        return self.out_proj((weights @ values).transpose(1, 2).reshape(b, n, self.d_out))


TinyAyaLikeAttention.__name__ = "GroupedQueryAttention"


@pytest.mark.parametrize("attn_type", ["sliding_attention", "full_attention"])
def test_tiny_aya_look_alike_is_refused(attn_type):
    torch.manual_seed(0)
    # Laid out as Qwen3's (no attn_type: how Tiny Aya looked before it was recognised), it is refused by the probe.
    layer = TinyAyaLikeAttention(32, 4, 2, 8, attn_type=attn_type, qwen3_layout=True).to(DEVICE)
    with pytest.raises(ValueError, match=r"as the Qwen3 class, but its forward and the fused one disagree"):
        attention.swap_attention(nn.ModuleDict({"att": layer}))
    assert type(layer) is TinyAyaLikeAttention
    # With its attn_type it is Tiny Aya's layer, written independently of attention.tiny_aya: the probe agrees.
    layer = TinyAyaLikeAttention(32, 4, 2, 8, attn_type=attn_type).to(DEVICE)
    x = torch.randn(2, 6, 32, device=DEVICE)
    mask = torch.triu(torch.ones(6, 6, dtype=torch.bool, device=DEVICE), diagonal=1)
    cos, sin = (t.to(DEVICE) for t in book_tiny_aya.compute_rope_params(8, context_length=6))
    expected = layer(x, mask, cos, sin)
    attention.swap_attention(nn.ModuleDict({"att": layer}))
    assert type(layer) is tiny_aya.GroupedQueryAttention
    torch.testing.assert_close(layer(x, mask, cos, sin), expected, atol=2e-5, rtol=1e-4)


def test_the_probe_leaves_the_model_exactly_as_it_was():
    # A KV-cache layer mid-generation (cache filled, position 3), in train mode, with a forward hook: after the
    # swap only its class has changed; the global random stream is where it was; the hook never fired.
    torch.manual_seed(0)
    layer = book_kv.MultiHeadAttention(16, 16, 12, 0.1, 4).to(DEVICE)
    layer.eval()
    x = torch.randn(1, 5, 16, device=DEVICE)
    with torch.no_grad():
        layer(x[:, :3], use_cache=True)
    layer.train()
    calls = []
    layer.register_forward_hook(lambda *args: calls.append(1))
    before = dict(layer.__dict__)
    tables = {k: dict(getattr(layer, k)) for k in ("_parameters", "_buffers", "_modules", "_forward_hooks")}
    cache = layer.cache_k.clone(), layer.cache_v.clone()
    book = copy.deepcopy(layer)
    rng = torch.get_rng_state()
    attention.swap_attention(layer)
    assert type(layer) is kv_cache.MultiHeadAttention and torch.equal(torch.get_rng_state(), rng)
    assert calls == [] and layer.training and all(m.training for m in layer.modules())
    assert layer.ptr_current_pos == 3 and layer.__dict__.keys() == before.keys()
    assert all(layer.__dict__[k] is v for k, v in before.items() if not k.startswith("_")), "attributes replaced"
    assert {k: dict(getattr(layer, k)) for k in tables} == tables
    assert torch.equal(layer.cache_k, cache[0]) and torch.equal(layer.cache_v, cache[1])
    # The swapped layer takes the book's cache over and goes on from position 3, as the book's layer does.
    layer.eval(), book.eval()
    with torch.no_grad():
        ours, theirs = layer(x[:, 3:], use_cache=True), book(x[:, 3:], use_cache=True)
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)


def test_a_refusal_leaves_every_layer_as_it_was():
    torch.manual_seed(0)
    good = book_kv.MultiHeadAttention(16, 16, 12, 0.0, 4).to(DEVICE)
    with torch.no_grad():
        good(torch.randn(1, 4, 16, device=DEVICE), use_cache=True)
    cache = good.cache_k.clone()
    model = nn.Sequential(good, OtherScale(16, 16, 12, 0.0, 4).to(DEVICE))
    with pytest.raises(ValueError, match="disagree"):
        attention.swap_attention(model)
    assert type(good) is book_kv.MultiHeadAttention and good.ptr_current_pos == 4
    assert torch.equal(good.cache_k, cache)


def test_a_bfloat16_model_is_probed_in_float32_and_keeps_its_weights():
    torch.manual_seed(0)
    layer = book_qwen3.GroupedQueryAttention(32, 4, 2, 8, qk_norm=True, dtype=torch.bfloat16).to(DEVICE)
    layer.q_norm.to(torch.bfloat16), layer.k_norm.to(torch.bfloat16)
    params = {k: (p, p.detach().clone()) for k, p in layer.named_parameters()}
    attention.swap_attention(layer)
    assert type(layer) is qwen3.GroupedQueryAttention
    for k, p in layer.named_parameters():
        assert p is params[k][0] and p.dtype == torch.bfloat16 and torch.equal(p, params[k][1])
    bad = TinyAyaLikeAttention(32, 4, 2, 8, dtype=torch.bfloat16, qwen3_layout=True).to(DEVICE)
    with pytest.raises(ValueError, match="disagree"):
        attention.swap_attention(bad)


def test_a_layer_on_the_meta_device_cannot_be_probed_and_verify_must_be_a_bool():
    with torch.device("meta"):
        layer = ref.MultiHeadAttention(8, 8, 10, 0.0, 2)
    with pytest.raises(ValueError, match="on the meta device, so its forward cannot be run"):
        attention.swap_attention(layer)
    assert type(layer) is ref.MultiHeadAttention
    attention.swap_attention(layer, verify=False)  # unchecked, by the caller's choice
    assert type(layer) is attention.MultiHeadAttention
    with pytest.raises(TypeError, match="verify must be True or False, got 'no'"):
        attention.swap_attention(ref.MultiHeadAttention(8, 8, 10, 0.0, 2), verify="no")
