"""ch06/02_bonus_additional-experiments' MultiHeadAttention(..., disable_causal_mask=...), fused: the same
constructor, weights and state_dict as a reader's copy, the same outputs and gradients (every token sees every token
when the mask is disabled; the chapter's layer otherwise), attention dropout in training, and swap_attention."""

from __future__ import annotations

import pytest
import torch
from chapter3_flash.attention import noncausal
from helpers import DEVICE, assert_same_outputs_and_grads, twin_layers
from torch import nn

from bench.book import noncausal as book
from chapter3_flash import attention

TOL = dict(atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("disable", [True, False])
def test_outputs_and_gradients_match_the_book(backend, disable):
    ours, theirs = twin_layers(
        noncausal.MultiHeadAttention,
        book.MultiHeadAttention,
        16,
        16,
        24,
        0.0,
        4,
        qkv_bias=True,
        seed=5,
        disable_causal_mask=disable,
    )
    assert ("mask" in dict(ours.named_buffers())) is not disable  # the buffer only where the book has it
    assert_same_outputs_and_grads(ours, theirs, torch.randn(2, 21, 16, device=DEVICE), tol=TOL)  # 21: no tile multiple


def test_non_causal_has_no_context_limit_and_the_future_matters():
    torch.manual_seed(0)
    layer = noncausal.MultiHeadAttention(8, 8, 4, 0.0, 2, disable_causal_mask=True).to(DEVICE)
    x = torch.randn(1, 9, 8, device=DEVICE)  # longer than its context_length 4, as the book's allows
    y = x.clone()
    y[:, -1] += 1.0  # the last token changes: without the causal mask the first token's output moves too
    assert not torch.allclose(layer(x)[:, 0], layer(y)[:, 0])


def test_attention_dropout_in_training_only():
    torch.manual_seed(0)
    layer = noncausal.MultiHeadAttention(8, 8, 4, 0.5, 2, disable_causal_mask=True).to(DEVICE)
    x = torch.randn(1, 6, 8, device=DEVICE)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_swap_converts_the_book_layer_and_keeps_its_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(
        book.MultiHeadAttention(16, 16, 12, 0.0, 4, disable_causal_mask=True),
        book.MultiHeadAttention(16, 16, 12, 0.0, 4),
    ).to(DEVICE)
    x = torch.randn(2, 10, 16, device=DEVICE)
    expected = model(x)
    attention.swap_attention(model)
    assert type(model[0]) is noncausal.MultiHeadAttention and type(model[1]) is attention.MultiHeadAttention
    torch.testing.assert_close(model(x), expected, **TOL)


class StillCausal(book.MultiHeadAttention):
    """Says disable_causal_mask=True, has no mask buffer, but masks causally all the same."""

    def forward(self, x):
        b, n, _ = x.shape
        split = lambda t: t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (b, nh, T, hs)
        keys, queries, values = split(self.W_key(x)), split(self.W_query(x)), split(self.W_value(x))
        hidden = torch.triu(torch.ones(n, n, dtype=torch.bool, device=x.device), diagonal=1)
        scores = (queries @ keys.transpose(2, 3)).masked_fill(hidden, -torch.inf)
        weights = torch.softmax(scores / self.head_dim**0.5, dim=-1)
        return self.out_proj((weights @ values).transpose(1, 2).reshape(b, n, self.d_out))


StillCausal.__name__ = StillCausal.__qualname__ = "MultiHeadAttention"


def test_swap_refuses_a_layer_that_still_masks():
    layer = StillCausal(16, 16, 12, 0.0, 4, disable_causal_mask=True)
    with pytest.raises(ValueError, match=r"as the ch06/02_bonus_additional-experiments .* disagree .* max abs diff"):
        attention.swap_attention(nn.Sequential(layer))
    assert type(layer) is StillCausal
