"""swap_attention on chapter-4 GPTs and readers' own copies of the chapter's classes."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from chapter3_flash.attention import reference as ref
from helpers import DEVICE, requires_gpu
from torch import nn

from bench.gpt import GPT_CONFIG_124M, GPTModel
from chapter3_flash import attention

SMALL_GPT = {**GPT_CONFIG_124M, "vocab_size": 97, "context_length": 40, "emb_dim": 24, "n_heads": 3, "n_layers": 2}


@pytest.fixture(params=["triton", "sdpa", "torch"])
def backend(request):
    with attention.use_backend(request.param):
        yield request.param


def small_gpt(drop_rate=0.0, seed=123):
    torch.manual_seed(seed)
    return GPTModel({**SMALL_GPT, "drop_rate": drop_rate}).to(DEVICE)


def test_same_logits_and_same_parameter_objects(backend, caplog):
    model = small_gpt().eval()
    idx = torch.randint(0, SMALL_GPT["vocab_size"], (2, 37), device=DEVICE)  # 37: not a multiple of a block
    expected = model(idx)
    params_before = [id(p) for p in model.parameters()]
    buffers_before = [id(b) for b in model.buffers()]
    with caplog.at_level(logging.INFO, logger="chapter3_flash.attention.swap"):
        assert attention.swap_attention(model) is model
    assert "2 layer(s) swapped" in caplog.text
    assert all(type(block.att) is attention.MultiHeadAttention for block in model.trf_blocks)
    assert [id(p) for p in model.parameters()] == params_before
    assert [id(b) for b in model.buffers()] == buffers_before
    assert not model.training
    torch.testing.assert_close(model(idx), expected, atol=5e-5, rtol=1e-4)


def test_optimizer_built_before_the_swap_keeps_working(backend):
    model = small_gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    attention.swap_attention(model)
    before = model.trf_blocks[0].att.W_query.weight.detach().clone()
    idx = torch.randint(0, SMALL_GPT["vocab_size"], (2, 17), device=DEVICE)
    loss = nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
    loss.backward()
    opt.step()
    assert not torch.equal(model.trf_blocks[0].att.W_query.weight, before)


def test_training_loss_follows_the_reference(backend):
    # Dropout 0: a few AdamW steps of the swapped model track the chapter's model step for step.
    reference_model = small_gpt()
    swapped = attention.swap_attention(copy.deepcopy(reference_model))
    idx = torch.randint(0, SMALL_GPT["vocab_size"], (4, 33), device=DEVICE)
    target = torch.randint(0, SMALL_GPT["vocab_size"], (4, 33), device=DEVICE)
    curves = []
    for model in (reference_model, swapped):
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
        losses = []
        for _ in range(4):
            loss = nn.functional.cross_entropy(model(idx).flatten(0, 1), target.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves.append(losses)
    assert curves[1] == pytest.approx(curves[0], rel=1e-4)
    assert curves[0][-1] < curves[0][0]


def test_train_mode_and_dropout_survive_the_swap():
    model = small_gpt(drop_rate=0.2).train()
    attention.swap_attention(model)
    assert model.training and model.trf_blocks[0].att.training
    idx = torch.randint(0, SMALL_GPT["vocab_size"], (1, 20), device=DEVICE)
    assert not torch.equal(model(idx), model(idx))


@pytest.mark.parametrize("backend_name", ["triton", "sdpa"])
def test_attention_dropout_itself_survives_the_swap(backend_name):
    # The GPT's other dropouts off and the attention's at 0.5: only attention dropout can move the output, so a
    # swap that lost it (or kept it on in eval) shows; and its average over many draws is the eval output.
    model = small_gpt(drop_rate=0.0)
    for block in model.trf_blocks:
        block.att.dropout.p = 0.5
    attention.swap_attention(model)
    idx = torch.randint(0, SMALL_GPT["vocab_size"], (1, 9), device=DEVICE)
    with attention.use_backend(backend_name):
        model.eval()
        clean = model(idx)
        assert torch.equal(clean, model(idx))
        model.train()
        draws = torch.stack([model(idx) for _ in range(40)])
    assert not torch.equal(draws[0], draws[1]), "attention dropout was lost in the swap"
    assert (draws[0] - clean).abs().max() > 1e-3
    assert (draws.mean(0) - clean).abs().mean() < (draws[0] - clean).abs().mean() / 3, "dropout is not unbiased"


def test_every_chapter_class_and_nested_wrapper():
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {
            "v1": ref.SelfAttention_v1(4, 6),
            "v2": ref.SelfAttention_v2(4, 6, qkv_bias=True),
            "causal": ref.CausalAttention(4, 6, 10, 0.0),
            "wrapper": ref.MultiHeadAttentionWrapper(4, 6, 10, 0.0, 2),
            "mha": ref.MultiHeadAttention(4, 6, 10, 0.0, 2),
        }
    ).to(DEVICE)
    x2, x3 = torch.randn(9, 4, device=DEVICE), torch.randn(2, 9, 4, device=DEVICE)
    inputs = {"v1": x2, "v2": x2, "causal": x3, "wrapper": x3, "mha": x3}
    expected = {k: m(inputs[k]) for k, m in model.items()}
    attention.swap_attention(model)
    for k, m in model.items():
        assert type(m) is getattr(attention, type(m).__name__)
        torch.testing.assert_close(m(inputs[k]), expected[k], atol=2e-5, rtol=1e-4)
    assert all(type(h) is attention.CausalAttention for h in model["wrapper"].heads)


def test_root_layer_is_swapped_in_place():
    layer = ref.MultiHeadAttention(8, 8, 16, 0.0, 2)
    assert attention.swap_attention(layer) is layer
    assert type(layer) is attention.MultiHeadAttention


def test_fused_model_is_left_alone():
    layer = attention.MultiHeadAttention(8, 8, 16, 0.0, 2)
    attention.swap_attention(layer)
    assert type(layer) is attention.MultiHeadAttention


# A reader's own copy of the book's class, defined elsewhere: same name, same layout.
class MultiHeadAttention(nn.Module):
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
        return ref.MultiHeadAttention.forward(self, x)


class CachedLookAlike(MultiHeadAttention):
    """Cache buffers like ch04/03's KV-cache class, but not its forward or its ptr_current_pos."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("cache_k", None, persistent=False)
        self.register_buffer("cache_v", None, persistent=False)


CachedLookAlike.__name__ = "MultiHeadAttention"


def test_readers_copy_is_swapped():
    torch.manual_seed(0)
    model = nn.Sequential(MultiHeadAttention(8, 8, 16, 0.0, 2)).to(DEVICE)
    x = torch.randn(2, 11, 8, device=DEVICE)
    expected = model(x)
    attention.swap_attention(model)
    assert type(model[0]) is attention.MultiHeadAttention
    torch.testing.assert_close(model(x), expected, atol=2e-5, rtol=1e-4)


def test_unfaithful_look_alikes_are_refused_untouched():
    ok = MultiHeadAttention(8, 8, 16, 0.0, 2)
    cached = CachedLookAlike(8, 8, 16, 0.0, 2)
    model = nn.Sequential(ok, cached)
    with pytest.raises(ValueError, match="ch04/03_kv-cache"):
        attention.swap_attention(model)
    assert type(model[0]) is MultiHeadAttention, "a refused swap must leave the model as it was"

    not_causal = MultiHeadAttention(8, 8, 16, 0.0, 2)
    not_causal.mask.zero_()
    with pytest.raises(ValueError, match="causal"):
        attention.swap_attention(nn.Sequential(not_causal))

    odd = MultiHeadAttention(8, 8, 16, 0.0, 2)
    odd.out_proj = nn.Linear(8, 5)  # a projection of another width
    with pytest.raises(ValueError, match="out_proj"):
        attention.swap_attention(nn.Sequential(odd))

    extra = MultiHeadAttention(8, 8, 16, 0.0, 2)
    extra.rotary = nn.Identity()  # a submodule the book's class does not have
    with pytest.raises(ValueError, match="layout"):
        attention.swap_attention(nn.Sequential(extra))

    with pytest.raises(TypeError):
        attention.swap_attention("not a model")


def test_a_swap_that_converts_nothing_warns_and_names_what_it_left():
    class SelfAttentionOfMyOwn(nn.Module):
        def forward(self, x):
            return x

    model = nn.Sequential(nn.Linear(4, 4), SelfAttentionOfMyOwn())
    with pytest.warns(UserWarning, match="converted no layer.*SelfAttentionOfMyOwn"):
        assert attention.swap_attention(model) is model
    assert attention.fused_layers(model) == []
    gpt = small_gpt()
    attention.swap_attention(gpt)
    assert attention.fused_layers(gpt) == ["trf_blocks.0.att", "trf_blocks.1.att"]


def test_isinstance_of_the_book_class_is_false_after_a_swap():
    layer = MultiHeadAttention(8, 8, 16, 0.0, 2)
    attention.swap_attention(layer)
    assert not isinstance(layer, MultiHeadAttention) and isinstance(layer, ref.MultiHeadAttention)


@requires_gpu
def test_gpt2_small_logits_after_swap_on_gpu():
    torch.manual_seed(123)
    model = GPTModel(GPT_CONFIG_124M).cuda().eval()
    idx = torch.randint(0, GPT_CONFIG_124M["vocab_size"], (2, 1024), device="cuda")
    with torch.no_grad():
        expected = model(idx)
        attention.swap_attention(model)
        got = model(idx)
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=1e-3)
