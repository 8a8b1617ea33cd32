"""The ch03 bonus notebook's variants and ch03/03's buffer variants, fused (attention.bonus), against a reader's
copies: the same constructor, weights after a seed, state_dict, outputs and gradients; attention dropout in training;
nn.MultiheadAttention fused for causal self-attention and PyTorch's own for every other call; and swap_attention."""

from __future__ import annotations

import pytest
import torch
from chapter3_flash.attention import bonus
from helpers import DEVICE, assert_same_outputs_and_grads, twin_layers
from torch import nn

from bench.book import buffers as book_buffers
from bench.book import mha_variants as book
from chapter3_flash import attention

TOL = dict(atol=2e-5, rtol=1e-4)
X = (2, 21, 16)  # 21 tokens: not a multiple of any tile

# (ours, the reader's copy, constructor args, kwargs)
PAIRS = {
    "combined qkv": (bonus.MultiHeadAttentionCombinedQKV, book.MultiHeadAttentionCombinedQKV, (16, 16, 4, 24), {}),
    "combined qkv, bias": (
        bonus.MultiHeadAttentionCombinedQKV,
        book.MultiHeadAttentionCombinedQKV,
        (16, 16, 4, 24),
        {"qkv_bias": True},
    ),
    "einsum": (bonus.MHAEinsum, book.MHAEinsum, (16, 16, 24, 0.0, 4), {}),
    "einsum, bias": (bonus.MHAEinsum, book.MHAEinsum, (16, 16, 24, 0.0, 4), {"qkv_bias": True}),
    "sdpa": (bonus.MHAPyTorchScaledDotProduct, book.MHAPyTorchScaledDotProduct, (16, 16, 4, 24), {}),
    "pytorch class": (bonus.MHAPyTorchClass, book.MHAPyTorchClass, (16, 16, 4, 24), {}),
    "pytorch class, no weights": (
        bonus.MHAPyTorchClass,
        book.MHAPyTorchClass,
        (16, 16, 4, 24),
        {"need_weights": False},
    ),
    "with buffer": (bonus.CausalAttentionWithBuffer, book_buffers.CausalAttentionWithBuffer, (16, 8, 24, 0.0), {}),
    "without buffers": (
        bonus.CausalAttentionWithoutBuffers,
        book_buffers.CausalAttentionWithoutBuffers,
        (16, 8, 24, 0.0),
        {},
    ),
}


@pytest.mark.parametrize("pair", list(PAIRS))
def test_outputs_and_gradients_match_the_readers_copy(backend, pair):
    ours_cls, book_cls, args, kw = PAIRS[pair]
    ours, theirs = twin_layers(ours_cls, book_cls, *args, seed=11, **kw)  # same weights, same state_dict keys
    assert_same_outputs_and_grads(ours, theirs, torch.randn(*X, device=DEVICE), tol=TOL)


def test_sdpa_without_flash_is_the_causal_attention_meant():
    # The notebook's class as written attends to later tokens only (its triu mask read as "attend"); ours is causal,
    # which is the reader's copy with the mask's complement.
    torch.manual_seed(11)
    ours = bonus.MHAPyTorchSDPAWithoutFlash(16, 16, 4, 24).to(DEVICE)
    torch.manual_seed(11)
    meant = book.MHAPyTorchSDPAWithoutFlash(16, 16, 4, 24, keep_below=True).to(DEVICE)
    assert ours.mask.dtype == torch.bool and list(ours.state_dict()) == list(meant.state_dict())
    assert_same_outputs_and_grads(ours, meant, torch.randn(*X, device=DEVICE), tol=TOL)
    as_written = book.MHAPyTorchSDPAWithoutFlash(16, 16, 4, 24)
    with pytest.raises(ValueError, match=r"disagree .* reads True as attend: each token attends only to the tokens"):
        attention.swap_attention(as_written)
    assert type(as_written) is book.MHAPyTorchSDPAWithoutFlash
    attention.swap_attention(meant)
    assert type(meant) is bonus.MHAPyTorchSDPAWithoutFlash


@pytest.mark.parametrize("pair", ["combined qkv", "einsum", "sdpa", "pytorch class", "without buffers"])
def test_attention_dropout_in_training_only(pair):
    ours_cls, _, args, kw = PAIRS[pair]
    args = tuple(0.5 if a == 0.0 else a for a in args)  # the positional dropout, where there is one
    kw = {**kw, "dropout": 0.5} if 0.5 not in args else kw
    layer = ours_cls(*args, **kw).to(DEVICE)
    x = torch.randn(1, 9, 16, device=DEVICE)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_pytorch_class_with_qkv_bias_runs_pytorch_and_is_not_swapped():
    # add_bias_kv appends a learned key and value every query sees: PyTorch's module runs, with one warning.
    ours, theirs = twin_layers(bonus.MHAPyTorchClass, book.MHAPyTorchClass, 16, 16, 4, 24, qkv_bias=True, seed=3)
    x = torch.randn(*X, device=DEVICE)
    with pytest.warns(UserWarning, match="add_bias_kv"):
        torch.testing.assert_close(ours(x), theirs(x), **TOL)
    with pytest.raises(ValueError, match="add_bias_kv .* every query sees"):
        attention.swap_attention(theirs)


def test_multihead_attention_fuses_causal_self_attention_only():
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(16, 4, batch_first=True).to(DEVICE).eval()
    ours = bonus.MultiheadAttention(16, 4, batch_first=True).to(DEVICE).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 9, 16, device=DEVICE)
    causal = torch.triu(torch.ones(9, 9, dtype=torch.bool, device=DEVICE), diagonal=1)
    assert ours.fuses(x, x, x, None, False, causal, False)
    out, weights = ours(x, x, x, attn_mask=causal, need_weights=False)
    assert weights is None
    torch.testing.assert_close(out, theirs(x, x, x, attn_mask=causal, need_weights=False)[0], **TOL)
    # Not fused, PyTorch's own (so the same to the bit): weights asked for, another mask, cross-attention, padding.
    y = torch.randn(2, 5, 16, device=DEVICE)
    padding = torch.zeros(2, 9, dtype=torch.bool, device=DEVICE)
    padding[0, -2:] = True
    for args, kw in (
        ((x, x, x), {"attn_mask": causal}),  # need_weights=True: returns the weights
        ((x, x, x), {"attn_mask": ~causal, "need_weights": False}),  # not causal
        ((x, y, y), {"need_weights": False}),  # cross-attention
        ((x, x, x), {"key_padding_mask": padding, "need_weights": False}),
    ):
        assert not ours.fuses(*args, kw.get("key_padding_mask"), kw.get("need_weights", True), kw.get("attn_mask"), 0)
        for a, b in zip(ours(*args, **kw), theirs(*args, **kw)):
            assert (a is None and b is None) or torch.equal(a, b)


def test_swap_converts_nn_multihead_attention_where_it_can_fuse():
    model = nn.ModuleDict(
        {
            "first": nn.MultiheadAttention(16, 4, batch_first=True),
            "seq_first": nn.MultiheadAttention(16, 4),  # batch_first=False: never fused, left as PyTorch's
            "bias_kv": nn.MultiheadAttention(16, 4, add_bias_kv=True, batch_first=True),
        }
    )
    attention.swap_attention(model)
    assert type(model["first"]) is bonus.MultiheadAttention
    assert type(model["seq_first"]) is nn.MultiheadAttention and type(model["bias_kv"]) is nn.MultiheadAttention


def test_without_buffers_has_no_mask_in_its_state_dict():
    layer = bonus.CausalAttentionWithoutBuffers(16, 8, 24, 0.0)
    assert "mask" not in layer.state_dict() and "mask" not in dict(layer.named_buffers())
    with pytest.raises(ValueError, match="exceeds context_length 24"):
        layer(torch.randn(1, 25, 16))


def test_multihead_attention_gradients_match_pytorchs(backend):
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(16, 4, batch_first=True).to(DEVICE)
    ours = bonus.MultiheadAttention(16, 4, batch_first=True).to(DEVICE)
    ours.load_state_dict(theirs.state_dict())
    causal = torch.triu(torch.ones(21, 21, dtype=torch.bool, device=DEVICE), diagonal=1)

    x = torch.randn(*X, device=DEVICE)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_a = ours(xa, xa, xa, attn_mask=causal, need_weights=False)[0]
    out_b = theirs(xb, xb, xb, attn_mask=causal, need_weights=False)[0]
    torch.testing.assert_close(out_a, out_b, **TOL)
    dout = torch.randn_like(out_a)
    out_a.backward(dout)
    out_b.backward(dout)
    torch.testing.assert_close(xa.grad, xb.grad, **TOL)
    for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, **TOL, msg=lambda m, n=name: f"{n}: {m}")


def test_swap_converts_every_notebook_variant_and_keeps_the_outputs():
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {
            "combined": book.MultiHeadAttentionCombinedQKV(16, 16, 4, 24),
            "einsum": book.MHAEinsum(16, 16, 24, 0.0, 4, qkv_bias=True),
            "sdpa": book.MHAPyTorchScaledDotProduct(16, 16, 4, 24),
            "sdpa_mask": book.MHAPyTorchSDPAWithoutFlash(16, 16, 4, 24, keep_below=True),
            "pytorch": book.MHAPyTorchClass(16, 16, 4, 24),
            "ch03_mha": book.Ch03_MHA(16, 16, 24, 0.0, 4),
            "with_buffer": book_buffers.CausalAttentionWithBuffer(16, 16, 24, 0.0),
            "without_buffers": book_buffers.CausalAttentionWithoutBuffers(16, 16, 24, 0.0),
        }
    ).to(DEVICE)
    for layer in model.values():  # the plain-attribute mask stays where it was made, as in the book
        if isinstance(getattr(layer, "mask", None), torch.Tensor):
            layer.mask = layer.mask.to(DEVICE)
    x = torch.randn(*X, device=DEVICE)
    expected = {k: m(x) for k, m in model.items()}
    attention.swap_attention(model)
    assert len(attention.fused_layers(model)) == 9  # the eight, and MHAPyTorchClass's nn.MultiheadAttention
    for k, m in model.items():
        assert type(m).__module__.startswith("chapter3_flash.attention"), k
        torch.testing.assert_close(m(x), expected[k], **TOL)
