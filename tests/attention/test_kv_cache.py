"""The fused KV-cache MultiHeadAttention (ch04/03_kv-cache) against a reader's copy of the book's, alone and in
chapter 4's GPT: same parameters, same cached outputs step by step, the same greedy tokens from the book's
own generation loop, a cache allocated once and written in place, clear errors past the context."""

from __future__ import annotations

import copy

import pytest
import torch
from chapter3_flash.attention import kv_cache
from helpers import DEVICE, twin_layers

from bench.book import kv_cache as book
from chapter3_flash import attention

CFG = {
    "vocab_size": 97,
    "context_length": 48,
    "emb_dim": 24,
    "n_heads": 3,
    "n_layers": 2,
    "drop_rate": 0.0,
    "qkv_bias": True,
}


def pair(seed=3, **kw):
    args = dict(d_in=12, d_out=12, context_length=40, dropout=0.0, num_heads=3, qkv_bias=True) | kw
    return twin_layers(kv_cache.MultiHeadAttention, book.MultiHeadAttention, seed=seed, **args)


def test_same_parameters_buffers_and_state_dict():
    ours, theirs = pair()
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert "mask" not in a  # the book's KV-cache class registers its mask non-persistent
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]


def test_cached_steps_match_the_book(backend):
    ours, theirs = pair()
    ours.eval(), theirs.eval()
    x = torch.randn(2, 30, 12, device=DEVICE)
    with torch.no_grad():
        for a, b in ((0, 7), (7, 8), (8, 9), (9, 26), (26, 30)):  # a prompt, single tokens, a chunk
            torch.testing.assert_close(
                ours(x[:, a:b], use_cache=True), theirs(x[:, a:b], use_cache=True), atol=2e-5, rtol=1e-4
            )
            # The book's buffers show what the book's layer holds: (b, T, heads, hd), T growing.
            for mine, book_cache in ((ours.cache_k, theirs.cache_k), (ours.cache_v, theirs.cache_v)):
                torch.testing.assert_close(mine, book_cache, atol=2e-5, rtol=1e-4)
        assert ours.ptr_current_pos == theirs.ptr_current_pos == 30
        # A call without the cache leaves it alone, as in the book.
        torch.testing.assert_close(ours(x), theirs(x), atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(ours(x[:, 30:]), theirs(x[:, 30:]), atol=2e-5, rtol=1e-4)


def test_cache_is_allocated_once_and_written_in_place():
    ours, _ = pair()
    ours.eval()
    x = torch.randn(1, 20, 12, device=DEVICE)
    with torch.no_grad():
        ours(x[:, :5], use_cache=True)
        storage = ours.cache_storage()[0]
        assert storage.shape == (1, 40, 3, 4)  # (b, context_length, heads, head_dim): the book's layout
        for t in range(5, 20):
            ours(x[:, t : t + 1], use_cache=True)
            assert ours.cache_k.shape == (1, t + 1, 3, 4)  # a view of the first t + 1 rows, as the book's
            assert ours.cache_k.data_ptr() == storage.data_ptr(), "the cache was reallocated during generation"
        assert ours.cache_storage()[0] is storage
        ours.reset_cache()
        assert ours.cache_k is None and ours.cache_storage() is None and ours.ptr_current_pos == 0
        ours(x[:2, :3].expand(2, 3, 12).contiguous(), use_cache=True)  # a new batch size: a new cache
        assert ours.cache_k.shape == (2, 3, 3, 4)


def test_a_new_batch_size_mid_generation_is_refused_and_changes_nothing():
    # The book's torch.cat raises here; ours must not restart the cache silently (generation would go on from an
    # empty cache with no word).
    ours, theirs = pair()
    ours.eval(), theirs.eval()
    x = torch.randn(2, 10, 12, device=DEVICE)
    with torch.no_grad():
        ours(x[:, :4], use_cache=True)
        theirs(x[:, :4], use_cache=True)
        with pytest.raises(RuntimeError):
            theirs(x[:1, 4:5], use_cache=True)
        k, v, pos = ours.cache_k.clone(), ours.cache_v.clone(), ours.ptr_current_pos
        with pytest.raises(ValueError, match="batch of 2, this call has a batch of 1"):
            ours(x[:1, 4:5], use_cache=True)
        assert torch.equal(ours.cache_k, k) and torch.equal(ours.cache_v, v) and ours.ptr_current_pos == pos
        step = ours(x[:, 4:5], use_cache=True)  # the same batch goes on where it was
        torch.testing.assert_close(step, theirs(x[:, 4:5], use_cache=True), atol=2e-5, rtol=1e-4)


def test_a_cache_the_layer_did_not_publish_is_taken_over():
    """The reader's own assignments (the book's reset assigns None), and a cache moved by module.to()."""
    ours, theirs = pair()
    ours.eval(), theirs.eval()
    x = torch.randn(1, 20, 12, device=DEVICE)
    with torch.no_grad():
        for m in (ours, theirs):
            m(x[:, :6], use_cache=True)
            m.cache_k, m.cache_v = None, None  # emptied by hand; the position goes on, as in the book
            m.ptr_current_pos = 0
            m(x[:, 6:9], use_cache=True)
        torch.testing.assert_close(ours.cache_k, theirs.cache_k, atol=2e-5, rtol=1e-4)
        # A cache from elsewhere: a copy of the book's, assigned; then the whole layer converted and back.
        ours.cache_k, ours.cache_v = theirs.cache_k.clone(), theirs.cache_v.clone()
        ours.double().float()
        step = ours(x[:, 9:10], use_cache=True)
        torch.testing.assert_close(step, theirs(x[:, 9:10], use_cache=True), atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(ours.cache_v, theirs.cache_v, atol=2e-5, rtol=1e-4)


def test_running_past_the_context_is_a_clear_error():
    ours, _ = pair()
    x = torch.randn(1, 41, 12, device=DEVICE)
    with torch.no_grad():
        ours(x[:, :38], use_cache=True)
        with pytest.raises(ValueError, match="context_length 40"):
            ours(x[:, 38:41], use_cache=True)
        with pytest.raises(ValueError, match="exceeds context_length"):
            ours(x)


def test_training_through_the_cache_matches_the_book(backend):
    ours, theirs = pair(dropout=0.0)
    x = torch.randn(2, 9, 12, device=DEVICE)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_a, out_b = ours(xa, use_cache=True), theirs(xb, use_cache=True)
    torch.testing.assert_close(out_a, out_b, atol=2e-5, rtol=1e-4)
    out_a.sum().backward()
    out_b.sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, atol=2e-5, rtol=1e-4)


def gpt_pair(seed=123, device=DEVICE):
    torch.manual_seed(seed)
    theirs = book.GPTModel(CFG).to(device).eval()
    ours = attention.swap_attention(copy.deepcopy(theirs))
    return ours, theirs


def test_books_generation_loop_gives_the_same_greedy_tokens(backend):
    ours, theirs = gpt_pair()
    assert all(type(b.att) is kv_cache.MultiHeadAttention for b in ours.trf_blocks)
    prompt = torch.randint(0, CFG["vocab_size"], (2, 6), device=DEVICE)
    uncached = book.generate_text_simple_cached(theirs, prompt, 20, use_cache=False)
    assert torch.equal(book.generate_text_simple_cached(theirs, prompt, 20), uncached)
    assert torch.equal(book.generate_text_simple_cached(ours, prompt, 20), uncached)
    assert torch.equal(book.generate_text_simple_cached(ours, prompt, 20, use_cache=False), uncached)


def test_generation_past_the_context_fails_as_in_the_book():
    # In chapter 4's GPT the position embedding runs out first (an IndexError in both); the layer's own
    # ValueError is test_running_past_the_context_is_a_clear_error. On the CPU: on a GPU the same index is a
    # device-side assert, which poisons the CUDA context of every later test in the process.
    ours, theirs = gpt_pair(device="cpu")
    prompt = torch.randint(0, CFG["vocab_size"], (1, 40))
    for model in (theirs, ours):
        with pytest.raises(IndexError):
            book.generate_text_simple_cached(model, prompt, 10)


def test_swap_in_the_middle_of_generation_adopts_the_books_cache():
    torch.manual_seed(0)
    theirs = book.MultiHeadAttention(12, 12, 40, 0.0, 3).to(DEVICE).eval()
    ours = copy.deepcopy(theirs)
    x = torch.randn(1, 12, 12, device=DEVICE)
    with torch.no_grad():
        theirs(x[:, :8], use_cache=True)
        ours(x[:, :8], use_cache=True)
        attention.swap_attention(ours)
        assert type(ours) is kv_cache.MultiHeadAttention
        for t in range(8, 12):
            torch.testing.assert_close(
                ours(x[:, t : t + 1], use_cache=True), theirs(x[:, t : t + 1], use_cache=True), atol=2e-5, rtol=1e-4
            )
