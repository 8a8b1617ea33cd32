"""Every refusal of swap_attention says what it found, what it expected, and why that matters, before any layer
is converted: Qwen3.5's gated query projection, a norm over the whole width (OLMo 3), another dropout module,
another mask, other heads, missing attributes."""

from __future__ import annotations

import pytest
import torch
from chapter3_flash.attention import reference as ref
from torch import nn

from bench.book import qwen3 as book_qwen3
from bench.book.rope import RMSNorm
from chapter3_flash import attention


class GatedQueryAttention(book_qwen3.GroupedQueryAttention):
    """Qwen3.5's full-attention layout (ch05/16): W_query produces the queries and an output gate, twice d_out."""

    def __init__(self, d_in, num_heads, num_kv_groups, head_dim):
        super().__init__(d_in, num_heads, num_kv_groups, head_dim, qk_norm=True)
        self.W_query = nn.Linear(d_in, 2 * self.d_out, bias=False)


GatedQueryAttention.__name__ = GatedQueryAttention.__qualname__ = "GroupedQueryAttention"


def refused(layer, *words):
    with pytest.raises(ValueError) as err:
        attention.swap_attention(nn.ModuleDict({"att": layer}))
    message = str(err.value)
    for word in words:
        assert word in message, f"{word!r} not in: {message}"
    return message


def test_a_gated_query_projection_says_the_query_projection_also_makes_the_gate():
    # Qwen3.5's GroupedQueryAttention is fused (attention.qwen3_5); another class whose W_query is twice as wide
    # is refused with the reason.
    layer = ref.MultiHeadAttention(8, 8, 10, 0.0, 2)
    layer.W_query = nn.Linear(8, 16)
    refused(
        layer,
        "cannot swap att (MultiHeadAttention)",
        "W_query maps 8 -> 16, twice the 8 of its heads (expected 8 -> 8)",
        "also produces an output gate, as Qwen3.5's gated attention (ch05/16) does",
        "would drop the gate",
    )
    assert type(layer) is ref.MultiHeadAttention
    # Laid out as Qwen3.5's (the gate's width) but with Qwen3's forward, which cannot split that projection: the
    # probe runs it and refuses, saying its own forward failed.
    layer = GatedQueryAttention(32, 4, 2, 8)
    refused(
        layer,
        "cannot swap att (GroupedQueryAttention)",
        "laid out as the Qwen3.5 gated attention (ch05/16) class",
        "its own forward failed on the probe",
    )
    assert type(layer) is GatedQueryAttention


def test_a_norm_over_the_whole_width_says_which_axis():
    layer = book_qwen3.GroupedQueryAttention(32, 4, 2, 8, qk_norm=True)
    layer.q_norm = RMSNorm(32)  # OLMo 3 normalises q over all heads at once
    refused(layer, "q_norm has weights of shape [(32,)], expected (8,)", "OLMo 3", "wrong axis")


def test_chapter_refusals_say_found_expected_and_why():
    layer = ref.MultiHeadAttention(8, 8, 10, 0.0, 2)
    layer.dropout = nn.Identity()
    refused(layer, "dropout is Identity, expected nn.Dropout", "would be lost")

    layer = ref.MultiHeadAttention(8, 8, 10, 0.0, 2)
    layer.mask.fill_(0.0)
    refused(layer, "mask buffer has other entries, expected the chapter's causal", "silently dropped")

    layer = ref.MultiHeadAttention(8, 8, 10, 0.0, 2)
    layer.mask = torch.ones(3)
    refused(layer, "mask buffer has shape (3,)")

    layer = ref.MultiHeadAttention(8, 8, 10, 0.0, 2)
    layer.W_key = nn.Linear(8, 6)
    refused(layer, "W_key maps 8 -> 6, expected 8 -> 8", "attention of another shape")

    layer = ref.MultiHeadAttention(8, 8, 10, 0.0, 2)
    del layer.head_dim
    refused(layer, "attributes ['head_dim'] of the chapter 3 class are missing", "could not run")

    layer = ref.MultiHeadAttention(8, 8, 10, 0.0, 2)
    layer.num_heads = 3
    refused(layer, "num_heads 3 x head_dim 4 = 12, expected d_out 8", "splits d_out into the heads")

    wrapper = ref.MultiHeadAttentionWrapper(8, 4, 10, 0.0, 2)
    wrapper.heads.append(nn.Linear(8, 4))
    refused(wrapper, "heads is ['CausalAttention', 'CausalAttention', 'Linear']", "causal heads in one kernel call")

    v1 = ref.SelfAttention_v1(8, 4)
    v1.W_key = nn.Parameter(torch.rand(8, 5))
    refused(v1, "shapes [(8, 4), (8, 5), (8, 4)]", "one head of width d_out")

    extra = ref.MultiHeadAttention(8, 8, 10, 0.0, 2)
    extra.rotary = nn.Identity()
    refused(extra, "found parameters [], submodules", "'rotary'", "expected the chapter 3 layout", "ignored")
