"""The book's SDPA ("fast") layers fused (attention.fast) against a reader's copies (bench/book/fast.py): same
parameters, outputs and gradients, dropout applied to the weights in training mode only, the checks, and
swap_attention on a GPTModelFast-like and a Llama3ModelFast-like stack."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from chapter3_flash.attention import fast
from helpers import DEVICE, assert_same_outputs_and_grads, twin_layers
from torch import nn

from bench.book import fast as book
from bench.book.rope import compute_rope_params
from chapter3_flash import attention

TOL = dict(atol=1e-5, rtol=1e-5)


def pair(ours_cls, book_cls, *args, **kw):
    return twin_layers(ours_cls, book_cls, *args, seed=3, **kw)


def compare(ours, theirs, *inputs):
    assert_same_outputs_and_grads(ours, theirs, *inputs, tol=TOL)


@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train-p0"])
def test_pytorch_multihead_attention_matches_the_books(qkv_bias, train, backend):
    ours, theirs = pair(fast.PyTorchMultiHeadAttention, book.PyTorchMultiHeadAttention, 24, 32, 4, 0.0, qkv_bias)
    ours.train(train)
    theirs.train(train)
    compare(ours, theirs, torch.randn(2, 37, 24, device=DEVICE))  # 37 tokens: not a multiple of any tile


def test_pytorch_multihead_attention_drops_weights_in_training_only(backend):
    torch.manual_seed(0)
    layer = fast.PyTorchMultiHeadAttention(16, 16, 2, dropout=0.5).to(DEVICE)
    x = torch.randn(2, 20, 16, device=DEVICE)
    layer.eval()
    evaluated = layer(x)
    torch.testing.assert_close(layer(x), evaluated, atol=0, rtol=0)
    layer.train()
    assert not torch.allclose(layer(x), evaluated, atol=1e-3), "dropout 0.5 in training mode changed nothing"
    layer.dropout = 1.0  # every weight dropped: the context is zero and only proj's bias is left
    torch.testing.assert_close(layer(x), layer.proj.bias.expand(2, 20, 16), **TOL)


def test_grouped_query_attention_fast_matches_the_books(backend):
    ours, theirs = pair(fast.GroupedQueryAttentionFast, book.GroupedQueryAttentionFast, 32, 32, 4, 2)
    n = 41
    cos, sin = compute_rope_params(8, context_length=n + 9)  # the model's tables are longer than the input
    compare(ours, theirs, torch.randn(2, n, 32, device=DEVICE), cos.to(DEVICE), sin.to(DEVICE))


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: fast.PyTorchMultiHeadAttention(16, 18, 4), "d_out 18 must be divisible by num_heads 4"),
        (lambda: fast.GroupedQueryAttentionFast(16, 16, 4, 3), "num_heads 4 must be divisible by num_kv_groups 3"),
    ],
)
def test_bad_constructor_arguments_are_value_errors(make, words):
    with pytest.raises(ValueError, match=words):
        make()


def test_bad_inputs_are_value_errors():
    layer = fast.PyTorchMultiHeadAttention(16, 16, 2).to(DEVICE)
    with pytest.raises(ValueError, match=r"shape \(batch, num_tokens, d_in\)"):
        layer(torch.randn(5, 16, device=DEVICE))
    with pytest.raises(ValueError, match="d_in=16, got input with last dimension 12"):
        layer(torch.randn(1, 5, 12, device=DEVICE))


class FastGPTLike(nn.Module):
    """GPTModelFast's attention stack (pkg ch04.py) and a Llama3ModelFast layer, enough for the swap."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([book.PyTorchMultiHeadAttention(32, 32, 4, 0.1, True) for _ in range(2)])
        self.llama = book.GroupedQueryAttentionFast(32, 32, 4, 1)
        cos, sin = compute_rope_params(8, context_length=64)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x + self.llama(x, self.cos, self.sin)


def test_swap_converts_the_fast_layers_and_keeps_outputs():
    torch.manual_seed(0)
    model = FastGPTLike().to(DEVICE).eval()
    x = torch.randn(2, 30, 32, device=DEVICE)
    expected = model(x)
    swapped = attention.swap_attention(copy.deepcopy(model))
    assert type(swapped.blocks[0]) is fast.PyTorchMultiHeadAttention
    assert type(swapped.llama) is fast.GroupedQueryAttentionFast
    assert len(attention.fused_layers(swapped)) == 3
    torch.testing.assert_close(swapped(x), expected, **TOL)
    assert swapped.blocks[0].dropout == 0.1  # the float attribute carried over
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fused layers present: no "nothing swapped" warning
        attention.swap_attention(swapped)


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda m: setattr(m, "qkv", nn.Linear(32, 64)), "qkv maps 32 -> 64, expected 32 -> 96"),
        (lambda m: setattr(m, "dropout", "0.1"), "dropout is '0.1', expected a probability in \\[0, 1\\]"),
        (lambda m: setattr(m, "dropout", nn.Dropout(0.1)), r"submodules \['dropout', 'proj', 'qkv'\]"),  # a module
        (lambda m: setattr(m, "num_heads", 3), "num_heads 3 x head_dim 8 = 24, expected d_out 32"),
        (lambda m: m.register_buffer("mask", torch.ones(2, 2)), "expected the pkg ch03 bonus"),
    ],
)
def test_swap_refuses_a_fast_layer_it_cannot_convert_faithfully(edit, words):
    layer = book.PyTorchMultiHeadAttention(32, 32, 4)
    edit(layer)
    with pytest.raises(ValueError, match=words):
        attention.swap_attention(nn.Sequential(layer))
    assert type(layer) is book.PyTorchMultiHeadAttention  # untouched
