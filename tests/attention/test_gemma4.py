"""Gemma 4 (ch05/17) fused against a reader's copy of the book's: the layer (no softmax scale, a weightless value
norm, a wider head on full layers, proportional RoPE) forward and backward on both masks, with and without
another layer's shared keys and values; the KV-cache layer step by step; and a tiny model's logits, training
loss, KV-shared logits, cached logits (sliding caches trimmed, shared layers reading earlier layers' caches)
and greedy tokens."""

from __future__ import annotations

import copy

import pytest
import torch
from chapter3_flash.attention import gemma4
from chapter3_flash.attention.rope import mask_rule
from helpers import DEVICE, assert_same_outputs_and_grads, assert_same_training_step, fused_copy, greedy

from bench.book import gemma4 as book
from chapter3_flash import attention

# Unscaled scores of unit-RMS q and k reach head_dim (16 to 32 here): a sharper softmax than the other models', so
# float32 rounding in the kernels' different summation order shows a little more (as for Gemma 3's test).
TOL = dict(atol=2e-5, rtol=1e-4)
CFG = book.TINY_CONFIG
LAYERS = CFG["n_layers"]


def layer_pair(cls_ours, cls_book, idx, seed=21):
    torch.manual_seed(seed)
    theirs = cls_book(CFG, idx).to(DEVICE)
    ours = copy.deepcopy(theirs)
    ours.__class__ = cls_ours  # as swap_attention converts
    torch.manual_seed(seed)
    built = cls_ours(CFG, idx).to(DEVICE)  # and built directly: the same attributes and state_dict
    assert vars(built).keys() == vars(theirs).keys()
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), theirs.state_dict().values()))
    return ours, theirs


def model_tables(model):
    return model._tables()


class Wrapped(torch.nn.Module):
    """The layer's output alone, for the outputs-and-gradients helper."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x, *args, **kw):
        return self.layer(x, *args, **kw)[0]


@pytest.mark.parametrize("idx", [0, 2], ids=["sliding", "full"])
def test_layer_outputs_and_gradients(idx, backend):
    ours, theirs = layer_pair(gemma4.Gemma4Attention, book.Gemma4Attention, idx)
    model = book.Gemma4(CFG).to(DEVICE)
    n = 23
    local, glob = model.masks(0, n, DEVICE)
    mask, (cos, sin) = (local, model._tables()[0]) if idx == 0 else (glob, model._tables()[1])
    assert mask_rule(mask) == (True, (CFG["sliding_window"] - 1, -1) if idx == 0 else (-1, -1))
    x = torch.randn(2, n, CFG["emb_dim"], device=DEVICE)
    assert_same_outputs_and_grads(Wrapped(ours), Wrapped(theirs), x, mask, cos, sin, tol=TOL)
    with torch.no_grad():  # another layer's keys and values, and this layer's own handed back
        shared = theirs(x, mask, cos, sin, return_kv=True)[1]
        ref = theirs(x, mask, cos, sin, shared_kv=shared)
        out = ours(x, mask, cos, sin, shared_kv=shared)
        torch.testing.assert_close(out[0], ref[0], **TOL)
        assert out[1] is None and ref[1] is None
        mine = ours(x, mask, cos, sin, return_kv=True)[1]
        torch.testing.assert_close(mine, shared, **TOL)


@pytest.mark.parametrize("idx", [0, 2], ids=["sliding", "full"])
def test_kv_layer_prefill_then_tokens(idx, backend):
    ours, theirs = layer_pair(gemma4.KVGemma4Attention, book.KVGemma4Attention, idx)
    ours.eval(), theirs.eval()
    model = book.KVGemma4(CFG).to(DEVICE)
    cos, sin = model._tables()[0 if idx == 0 else 1]
    x = torch.randn(2, 30, CFG["emb_dim"], device=DEVICE)
    mine = book_cache = None
    with torch.no_grad():
        for a, b in [(0, 9)] + [(t, t + 1) for t in range(9, 20)] + [(20, 30)]:  # a prompt, tokens, a chunk
            mask = model.masks(a, b, DEVICE)[0 if idx == 0 else 1]
            out, mine = ours(x[:, a:b], mask, cos, sin, start_pos=a, cache=mine)
            ref, book_cache = theirs(x[:, a:b], mask, cos, sin, start_pos=a, cache=book_cache)
            torch.testing.assert_close(out, ref, **TOL)
            torch.testing.assert_close(mine, book_cache, **TOL)


def models(book_cls, seed=22):
    torch.manual_seed(seed)
    theirs = book_cls(CFG).to(DEVICE)
    targets = {book.Gemma4Attention: gemma4.Gemma4Attention, book.KVGemma4Attention: gemma4.KVGemma4Attention}
    return fused_copy(theirs, targets), theirs


def test_model_logits_training_loss_and_shared_kv(backend):
    ours, theirs = models(book.Gemma4)
    ids, targets = torch.randint(0, CFG["vocab_size"], (2, 2, 17), device=DEVICE)
    assert_same_training_step(ours, theirs, ids, targets, TOL)
    with torch.no_grad():
        shared = ours(ids, reuse_shared_kv=True)
        torch.testing.assert_close(shared, theirs(ids, reuse_shared_kv=True), **TOL)
        assert not torch.allclose(shared, theirs(ids), atol=1e-3)  # sharing changes the output: it was exercised


def test_model_cached_logits_and_greedy_tokens(backend):
    # A prompt (6) longer than the window (5): the KV-shared sliding layer reads a cache trimmed to the window, so
    # its first query sees no key, and the book gives it the mean of the values.
    ours, theirs = models(book.KVGemma4)
    prompt = torch.randint(0, CFG["vocab_size"], (1, 6), device=DEVICE)
    ids_o, logits_o = greedy(ours, prompt, 9, LAYERS)  # past the window (5): sliding caches trimmed
    ids_t, logits_t = greedy(theirs, prompt, 9, LAYERS)
    torch.testing.assert_close(logits_o, logits_t, **TOL)
    assert torch.equal(ids_o, ids_t)


@pytest.mark.parametrize("cached", [False, True], ids=["plain", "kv-cache"])
def test_swap_converts_gemma4(cached):
    torch.manual_seed(23)
    theirs = (book.KVGemma4 if cached else book.Gemma4)(CFG).to(DEVICE)
    ours = attention.swap_attention(copy.deepcopy(theirs))
    target = gemma4.KVGemma4Attention if cached else gemma4.Gemma4Attention
    assert {type(b.att) for b in ours.blocks} == {target}
    prompt = torch.randint(0, CFG["vocab_size"], (1, 6), device=DEVICE)
    layers = LAYERS if cached else None
    theirs.eval(), ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(prompt), theirs(prompt), **TOL)
    assert torch.equal(greedy(ours, prompt, 6, layers)[0], greedy(theirs, prompt, 6, layers)[0])
