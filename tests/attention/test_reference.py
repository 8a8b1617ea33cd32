"""attention.reference reproduces the chapter: printed values, parameters, state_dict, dropout, errors."""

import pytest
import torch
from chapter3_flash.attention import reference as ref
from helpers import BAD_INPUTS, CAUSAL_OUT, INPUTS, V1_OUT, assert_refuses


def test_simplified_attention_printed_values():
    weights = torch.softmax(INPUTS @ INPUTS.T, dim=-1)
    torch.testing.assert_close(
        weights[1], torch.tensor([0.1385, 0.2379, 0.2333, 0.1240, 0.1082, 0.1581]), atol=1e-4, rtol=0
    )
    out = ref.simplified_self_attention(INPUTS)
    torch.testing.assert_close(out[1], torch.tensor([0.4419, 0.6515, 0.5683]), atol=1e-4, rtol=0)


def test_self_attention_v1_printed_values():
    torch.manual_seed(123)
    out = ref.SelfAttention_v1(3, 2)(INPUTS)
    torch.testing.assert_close(out, torch.tensor(V1_OUT), atol=1e-4, rtol=0)


def test_v2_with_v1_weights_matches_v1():
    # The chapter's exercise: copy v2's Linear weights (transposed) into v1 and get the same output.
    torch.manual_seed(789)
    v2 = ref.SelfAttention_v2(3, 2)
    v1 = ref.SelfAttention_v1(3, 2)
    with torch.no_grad():
        v1.W_query.copy_(v2.W_query.weight.T)
        v1.W_key.copy_(v2.W_key.weight.T)
        v1.W_value.copy_(v2.W_value.weight.T)
    torch.testing.assert_close(v1(INPUTS), v2(INPUTS))


def test_causal_attention_printed_values():
    batch = torch.stack((INPUTS, INPUTS))
    torch.manual_seed(123)
    out = ref.CausalAttention(3, 2, 6, 0.0)(batch)
    assert out.shape == (2, 6, 2)
    for b in range(2):
        torch.testing.assert_close(out[b], torch.tensor(CAUSAL_OUT), atol=1e-4, rtol=0)


def test_wrapper_concatenates_heads():
    batch = torch.stack((INPUTS, INPUTS))
    torch.manual_seed(123)
    mha = ref.MultiHeadAttentionWrapper(3, 2, 6, 0.0, num_heads=2)
    out = mha(batch)
    assert out.shape == (2, 6, 4)
    # The first head was built first, from the same seed: it is CausalAttention's printed output.
    torch.testing.assert_close(out[0, :, :2], torch.tensor(CAUSAL_OUT), atol=1e-4, rtol=0)
    torch.testing.assert_close(out[..., 2:], mha.heads[1](batch))


def test_gpt2_small_parameter_count():
    mha = ref.MultiHeadAttention(768, 768, 1024, 0.0, 12)
    assert sum(p.numel() for p in mha.parameters()) == 2_360_064


def test_state_dict_keys_in_order():
    mha = ref.MultiHeadAttention(4, 6, 5, 0.0, 2)
    assert list(mha.state_dict()) == [
        "mask", "W_query.weight", "W_key.weight", "W_value.weight", "out_proj.weight", "out_proj.bias",
    ]  # fmt: skip
    mha_bias = ref.MultiHeadAttention(4, 6, 5, 0.0, 2, qkv_bias=True)
    assert list(mha_bias.state_dict()) == [
        "mask", "W_query.weight", "W_query.bias", "W_key.weight", "W_key.bias", "W_value.weight", "W_value.bias",
        "out_proj.weight", "out_proj.bias",
    ]  # fmt: skip
    wrapper = ref.MultiHeadAttentionWrapper(3, 2, 6, 0.0, num_heads=2)
    assert list(wrapper.state_dict())[:4] == [
        "heads.0.mask",
        "heads.0.W_query.weight",
        "heads.0.W_key.weight",
        "heads.0.W_value.weight",
    ]
    ca = ref.CausalAttention(3, 2, 6, 0.0)
    mask = ca.state_dict()["mask"]
    assert mask.dtype == torch.float32 and torch.equal(mask, torch.triu(torch.ones(6, 6), diagonal=1))


def test_dropout_only_in_training():
    torch.manual_seed(1)
    mha = ref.MultiHeadAttention(8, 8, 16, 0.5, 2)
    x = torch.randn(2, 16, 8)
    mha.eval()
    assert torch.equal(mha(x), mha(x))
    mha.train()
    assert not torch.equal(mha(x), mha(x))


@pytest.mark.parametrize("name, args, shape, words", BAD_INPUTS)
def test_bad_input_raises_value_error(name, args, shape, words):
    assert_refuses(ref, name, args, shape, words)


def test_simplified_attention_rank():
    with pytest.raises(ValueError, match="num_tokens, d"):
        ref.simplified_self_attention(torch.randn(1, 6, 3))
