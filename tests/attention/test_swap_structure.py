"""Recognition by structure plus verification: the chapter's classes under other names (the ch03 bonus notebook's
Ch03_MHA) are converted when their layout matches and the probe agrees; a renamed class that computes something
else is left alone with a warning that says why; with verify=False only names count."""

from __future__ import annotations

import warnings

import pytest
import torch
from chapter3_flash.attention import reference as ref
from helpers import DEVICE
from torch import nn

from bench.book import mha_variants as book
from chapter3_flash import attention

TOL = dict(atol=2e-5, rtol=1e-4)


def test_ch03_mha_is_recognised_by_structure_and_converted():
    torch.manual_seed(0)
    layer = book.Ch03_MHA(16, 16, 12, 0.0, 4).to(DEVICE)
    keys = list(layer.state_dict())
    x = torch.randn(2, 11, 16, device=DEVICE)
    expected = layer(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attention.swap_attention(layer)
    assert type(layer) is attention.MultiHeadAttention and list(layer.state_dict()) == keys
    torch.testing.assert_close(layer(x), expected, **TOL)


def test_without_verification_structure_alone_converts_nothing():
    layer = book.Ch03_MHA(16, 16, 12, 0.0, 4)
    with pytest.warns(UserWarning, match="converted no layer"):
        attention.swap_attention(layer, verify=False)
    assert type(layer) is book.Ch03_MHA


class MyAttention(book.Ch03_MHA):
    """Laid out as the chapter's MultiHeadAttention, but attends to every token (no mask applied)."""

    def forward(self, x):
        b, n, _ = x.shape
        split = lambda t: t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (b, nh, T, hs)
        keys, queries, values = split(self.W_key(x)), split(self.W_query(x)), split(self.W_value(x))
        weights = torch.softmax(queries @ keys.transpose(2, 3) / self.head_dim**0.5, dim=-1)
        return self.out_proj((weights @ values).transpose(1, 2).reshape(b, n, self.d_out))


def test_a_renamed_class_that_computes_something_else_is_left_alone_with_the_reason():
    torch.manual_seed(0)
    model = nn.ModuleDict({"mine": MyAttention(16, 16, 12, 0.0, 4)})
    model["chapter"] = ref.MultiHeadAttention(16, 16, 12, 0.0, 4)
    with pytest.warns(UserWarning, match=r"left alone .* cannot swap mine \(MyAttention\) .* max abs difference"):
        attention.swap_attention(model)
    assert type(model["mine"]) is MyAttention  # not the book's class: left alone, not an error
    assert type(model["chapter"]) is attention.MultiHeadAttention  # the rest of the model is converted


def test_the_notebook_wrapper_keeps_its_projection_and_its_heads_are_fused():
    # Ch03_MHA_Wrapper has an out_proj the chapter's wrapper has not: it is not converted, its CausalAttention heads
    # are, each on its own.
    torch.manual_seed(0)
    wrapper = book.Ch03_MHA_Wrapper(16, 4, 12, 0.0, 4).to(DEVICE)
    x = torch.randn(2, 9, 16, device=DEVICE)
    expected = wrapper(x)
    attention.swap_attention(wrapper)
    assert type(wrapper) is book.Ch03_MHA_Wrapper
    assert all(type(h) is attention.CausalAttention for h in wrapper.heads)
    torch.testing.assert_close(wrapper(x), expected, **TOL)


def test_renamed_chapter_classes_of_every_step():
    renamed = {
        "v1": type("AttentionStepTwo", (ref.SelfAttention_v1,), {}),
        "v2": type("AttentionStepTwoLinear", (ref.SelfAttention_v2,), {}),
        "causal": type("MaskedAttention", (ref.CausalAttention,), {}),
        "wrapper": type("Heads", (ref.MultiHeadAttentionWrapper,), {}),
    }
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {
            "v1": renamed["v1"](8, 6),
            "v2": renamed["v2"](8, 6),
            "causal": renamed["causal"](8, 6, 10, 0.0),
            "wrapper": renamed["wrapper"](8, 6, 10, 0.0, 2),
        }
    ).to(DEVICE)
    x2, x3 = torch.randn(7, 8, device=DEVICE), torch.randn(2, 7, 8, device=DEVICE)
    inputs = {"v1": x2, "v2": x2, "causal": x3, "wrapper": x3}
    expected = {k: m(inputs[k]) for k, m in model.items()}
    attention.swap_attention(model)
    fused = {"v1": "SelfAttention_v1", "v2": "SelfAttention_v2", "causal": "CausalAttention"}
    fused["wrapper"] = "MultiHeadAttentionWrapper"
    for k, m in model.items():
        assert type(m) is getattr(attention, fused[k]), k
        torch.testing.assert_close(m(inputs[k]), expected[k], **TOL)
