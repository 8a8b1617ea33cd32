"""The bonus models' fused attention (grouped-query, sliding window, Llama 3.2, Qwen3, Gemma 3) against a reader's
copies of the book's classes: same parameters, outputs and gradients (float32 1e-5; bf16 by the suite's rule),
their KV caches step by step, the masks the models pass in read as the kernel's rules, and swap_attention."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from chapter3_flash.attention import gemma3, gqa, llama3, qwen3, swa
from chapter3_flash.attention.rope import mask_rule
from helpers import DEVICE, assert_close_to_reference, assert_same_outputs_and_grads, twin_layers
from torch import nn

from bench.book import gemma3 as book_gemma3
from bench.book import gqa as book_gqa
from bench.book import llama3 as book_llama3
from bench.book import qwen3 as book_qwen3
from bench.book import swa as book_swa
from bench.book.rope import compute_rope_params
from chapter3_flash import attention

TOL = dict(atol=1e-5, rtol=1e-5)


def pair(ours_cls, book_cls, *args, **kw):
    return twin_layers(ours_cls, book_cls, *args, seed=7, **kw)


def compare(ours, theirs, *inputs, tol=TOL):
    assert_same_outputs_and_grads(ours, theirs, *inputs, tol=tol)


# ---------------------------------------------------------------------------------------------
# ch04/04_gqa and ch04/06_swa: their own caches
# ---------------------------------------------------------------------------------------------


def same_cache(ours, theirs):
    """The book's cache_k / cache_v buffers show the same tensors (shape, layout, values) on both layers."""
    for mine, book_cache in ((ours.cache_k, theirs.cache_k), (ours.cache_v, theirs.cache_v)):
        assert mine.shape == book_cache.shape
        torch.testing.assert_close(mine, book_cache, **TOL)


def test_gqa_outputs_gradients_and_cache(backend):
    ours, theirs = pair(gqa.GroupedQueryAttention, book_gqa.GroupedQueryAttention, 16, 16, 0.0, 4, 2, qkv_bias=True)
    compare(ours, theirs, torch.randn(2, 37, 16, device=DEVICE))
    x = torch.randn(2, 300, 16, device=DEVICE)  # past the first cache allocation (256): it doubles
    ours.eval(), theirs.eval()
    with torch.no_grad():
        for a, b in ((0, 250), (250, 251), (251, 260), (260, 300)):
            torch.testing.assert_close(ours(x[:, a:b], use_cache=True), theirs(x[:, a:b], use_cache=True), **TOL)
            same_cache(ours, theirs)  # (b, kv_heads, T, hd), as the book's
        ours(x[:, :5])  # a call without the cache resets it, as the book's does
        theirs(x[:, :5])
        assert ours.cache_k is None and ours.ptr_current_pos == theirs.ptr_current_pos == 0


@pytest.mark.parametrize("window", [None, 1, 5, 16])
def test_sliding_window_outputs_gradients_and_cache(window, backend):
    ours, theirs = pair(swa.MultiHeadAttentionWithSWA, book_swa.MultiHeadAttentionWithSWA, 12, 12, 0.0, 3)
    ours.sliding_window_size = theirs.sliding_window_size = window  # the book's GPTModel sets it per layer
    compare(ours, theirs, torch.randn(2, 41, 12, device=DEVICE))
    x = torch.randn(1, 80, 12, device=DEVICE)
    ours.eval(), theirs.eval()
    with torch.no_grad():  # a prompt, tokens one by one past two cache trims (2 W), a chunk
        steps = [(0, 9)] + [(t, t + 1) for t in range(9, 60)] + [(60, 80)]
        for a, b in steps:
            torch.testing.assert_close(ours(x[:, a:b], use_cache=True), theirs(x[:, a:b], use_cache=True), **TOL)
            same_cache(ours, theirs)  # the last W keys and values, as the book keeps


def test_the_bonus_folders_cached_baseline(backend):
    """gpt_with_kv_mha.py's MultiHeadAttention: cached steps, its cache as the book's, gradients, and the book's
    own positions after a call without the cache (which resets the position but keeps the cache)."""
    ours, theirs = pair(swa.MultiHeadAttention, book_swa.MultiHeadAttention, 12, 12, 0.0, 3)
    assert "sliding_window_size" not in vars(ours)  # an attribute the book's class does not have
    compare(ours, theirs, torch.randn(2, 23, 12, device=DEVICE))
    x = torch.randn(1, 40, 12, device=DEVICE)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        for a, b in [(0, 9)] + [(t, t + 1) for t in range(9, 20)] + [(20, 30)]:
            torch.testing.assert_close(ours(x[:, a:b], use_cache=True), theirs(x[:, a:b], use_cache=True), **TOL)
            same_cache(ours, theirs)  # (b, T, heads, hd), growing
        torch.testing.assert_close(ours(x[:, :4]), theirs(x[:, :4]), **TOL)  # position back to 0, cache kept
        for a, b in ((30, 33), (33, 34)):
            torch.testing.assert_close(ours(x[:, a:b], use_cache=True), theirs(x[:, a:b], use_cache=True), **TOL)
            same_cache(ours, theirs)
    model = nn.Sequential(copy.deepcopy(theirs))
    attention.swap_attention(model)
    assert type(model[0]) is swa.MultiHeadAttention


def test_sliding_window_size_is_checked():
    layer = swa.MultiHeadAttentionWithSWA(8, 8, 0.0, 2, sliding_window_size=0).to(DEVICE)
    with pytest.raises(ValueError, match="sliding_window_size"):
        layer(torch.randn(1, 4, 8, device=DEVICE))


# ---------------------------------------------------------------------------------------------
# Llama 3.2, Qwen3, Gemma 3: RoPE, QK-norm, the model's mask
# ---------------------------------------------------------------------------------------------


def rope(head_dim, n):
    cos, sin = compute_rope_params(head_dim, context_length=n)
    return cos.to(DEVICE), sin.to(DEVICE)


def causal(n):
    return torch.triu(torch.ones(n, n, device=DEVICE, dtype=torch.bool), diagonal=1)


def test_llama3(backend):
    ours, theirs = pair(llama3.GroupedQueryAttention, book_llama3.GroupedQueryAttention, 32, 32, 4, 2)
    n = 33
    # Llama builds its mask at full length and the layer slices it to the tokens.
    compare(ours, theirs, torch.randn(2, n, 32, device=DEVICE), causal(n + 7), *rope(8, n + 7))


@pytest.mark.parametrize("qk_norm", [True, False])
def test_qwen3(qk_norm, backend):
    ours, theirs = pair(qwen3.GroupedQueryAttention, book_qwen3.GroupedQueryAttention, 32, 4, 2, 16, qk_norm)
    n = 29
    compare(ours, theirs, torch.randn(2, n, 32, device=DEVICE), causal(n), *rope(16, n))


@pytest.mark.parametrize("local", [False, True], ids=["global", "sliding-window"])
def test_gemma3(local, backend):
    # Head dim 256 and one KV head as at 270M; a window shorter than the sequence on local layers.
    ours, theirs = pair(
        gemma3.GroupedQueryAttention, book_gemma3.GroupedQueryAttention, 64, 4, 1, 256, True, query_pre_attn_scalar=256
    )
    n, window = 45, 12
    global_mask, local_mask = book_gemma3.masks(n, window, DEVICE)
    mask = local_mask if local else global_mask
    assert mask_rule(mask) == (True, (window - 1, -1) if local else (-1, -1))
    compare(ours, theirs, torch.randn(2, n, 64, device=DEVICE), mask, *rope(256, n), tol=dict(atol=2e-5, rtol=1e-4))


def test_qwen3_in_bfloat16_by_the_suites_rule():
    ours, theirs = pair(qwen3.GroupedQueryAttention, book_qwen3.GroupedQueryAttention, 64, 4, 2, 32, True)
    n = 40
    x = torch.randn(2, n, 64, device=DEVICE)
    cos, sin = rope(32, n)
    exact = copy.deepcopy(theirs).double()(x.double(), causal(n), cos.double(), sin.double())
    low = copy.deepcopy(theirs).bfloat16()(x.bfloat16(), causal(n), cos, sin)
    out = copy.deepcopy(ours).bfloat16()(x.bfloat16(), causal(n), cos, sin)
    assert_close_to_reference("qwen3 bf16", out, exact, low)


def test_an_unknown_mask_takes_pytorchs_attention_with_one_warning():
    ours, theirs = pair(qwen3.GroupedQueryAttention, book_qwen3.GroupedQueryAttention, 32, 4, 2, 8, False)
    n = 20
    mask = causal(n).clone()
    mask[5:, :3] = True  # also hide the first keys from later rows: no rule of the kernel's
    mask_rule(mask)
    x = torch.randn(1, n, 32, device=DEVICE)
    with pytest.warns(UserWarning, match="neither causal nor a causal sliding window"):
        out = ours(x, mask, *rope(8, n))
    torch.testing.assert_close(out, theirs(x, mask, *rope(8, n)), **TOL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours(x, mask, *rope(8, n))  # once per layer class


def test_mask_verdicts_are_remembered_per_tensor_and_version():
    mask = causal(9)
    assert mask_rule(mask) == (True, (-1, -1))
    mask[0, 1:] = False  # changed in place: its version moved, the verdict is read again
    assert mask_rule(mask) is None
    assert mask_rule(torch.zeros(4, 4, dtype=torch.bool, device=DEVICE)) == (False, (-1, -1))
    assert mask_rule(causal(6)[2:, :]) == (True, (-1, -1))  # bottom-right causal, Nq < Nk (a cached chunk)


# ---------------------------------------------------------------------------------------------
# swap_attention on the bonus models
# ---------------------------------------------------------------------------------------------


class QwenLikeModel(nn.Module):
    """Two Qwen3 blocks as the book's Qwen3Model drives them: the mask built on every call."""

    def __init__(self, cfg):
        super().__init__()
        self.blocks = nn.ModuleList([book_qwen3.TransformerBlock(cfg) for _ in range(2)])
        cos, sin = compute_rope_params(cfg["head_dim"], context_length=64)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x):
        mask = book_qwen3.causal_mask(x.shape[1], x.device)
        for block in self.blocks:
            x = block(x, mask, self.cos, self.sin)
        return x


def test_swap_converts_each_bonus_class_and_keeps_outputs():
    cfg = {"emb_dim": 32, "n_heads": 4, "n_kv_groups": 2, "head_dim": 8, "hidden_dim": 48, "qk_norm": True}
    torch.manual_seed(0)
    model = QwenLikeModel({**cfg, "dtype": torch.float32}).to(DEVICE)
    model.add_module("llama", book_llama3.GroupedQueryAttention(32, 32, 4, 2))
    model.add_module("gemma", book_gemma3.GroupedQueryAttention(32, 4, 1, 16, True, query_pre_attn_scalar=16))
    model.add_module("gqa", book_gqa.GroupedQueryAttention(32, 32, 0.0, 4, 2))
    model.add_module("swa", book_swa.MultiHeadAttentionWithSWA(32, 32, 0.0, 4, sliding_window_size=6))
    model.to(DEVICE)
    x = torch.randn(2, 21, 32, device=DEVICE)
    expected = model(x)
    swapped = attention.swap_attention(copy.deepcopy(model))
    kinds = {name: type(m) for name, m in swapped.named_modules()}
    assert kinds["blocks.0.att"] is qwen3.GroupedQueryAttention and kinds["llama"] is llama3.GroupedQueryAttention
    assert kinds["gemma"] is gemma3.GroupedQueryAttention and kinds["gqa"] is gqa.GroupedQueryAttention
    assert kinds["swa"] is swa.MultiHeadAttentionWithSWA
    assert len(attention.fused_layers(swapped)) == 6
    torch.testing.assert_close(swapped(x), expected, **TOL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # these models now have fused layers: no "nothing swapped" warning
        attention.swap_attention(swapped)


@pytest.mark.parametrize(
    "tables, words",
    [
        (lambda: rope(8, 10), "RoPE positions 0 to 12 are outside the tables' 10 positions"),  # shorter than the input
        (lambda: rope(16, 12), r"must both be \(context_length, head_dim 8\)"),  # another head dim
        (lambda: (rope(8, 12)[0], rope(8, 13)[1]), r"cos \(12, 8\) and sin \(13, 8\)"),  # tables that disagree
    ],
)
def test_rope_tables_that_do_not_fit_are_value_errors(tables, words):
    # The book's broadcasting fails with a RuntimeError deep in the rotation (or slices a shorter table silently
    # for a negative offset); ours names the shapes before any kernel runs.
    layer = llama3.GroupedQueryAttention(32, 32, 4, 2).to(DEVICE)
    cos, sin = tables()
    with pytest.raises(ValueError, match=words):
        layer(torch.randn(1, 12, 32, device=DEVICE), causal(12), cos, sin)
