"""``block_size=``, the book's 2024 text's name for ``context_length``, on every chapter-3 class that takes it (ours
fused and eager): the same layer as the positional call, weights included; both names, or neither, a TypeError."""

from __future__ import annotations

import pytest
import torch
from chapter3_flash.attention import reference as ref
from helpers import DEVICE

from chapter3_flash import attention

CLASSES = ["CausalAttention", "MultiHeadAttentionWrapper", "MultiHeadAttention"]


def kwargs(name: str) -> dict:
    return {"dropout": 0.0} if name == "CausalAttention" else {"dropout": 0.0, "num_heads": 2}


@pytest.mark.parametrize("module", [ref, attention], ids=["reference", "fused"])
@pytest.mark.parametrize("name", CLASSES)
def test_block_size_builds_the_same_layer_as_context_length(module, name):
    cls = getattr(module, name)
    torch.manual_seed(3)
    positional = cls(8, 6, 12, *kwargs(name).values()).to(DEVICE)
    torch.manual_seed(3)
    book_2024 = cls(8, 6, block_size=12, **kwargs(name), qkv_bias=False).to(DEVICE)
    assert book_2024.state_dict().keys() == positional.state_dict().keys()
    for key, value in positional.state_dict().items():
        assert torch.equal(book_2024.state_dict()[key], value), key  # the same weights from the same seed
    x = torch.randn(2, 12, 8, device=DEVICE)  # the whole block_size
    torch.testing.assert_close(book_2024(x), positional(x), atol=0, rtol=0)
    with pytest.raises(ValueError, match="exceeds context_length 12"):
        book_2024(torch.randn(1, 13, 8, device=DEVICE))


@pytest.mark.parametrize("module", [ref, attention], ids=["reference", "fused"])
@pytest.mark.parametrize("name", CLASSES)
def test_both_names_or_neither_is_a_type_error(module, name):
    cls = getattr(module, name)
    with pytest.raises(TypeError, match=rf"{name}\(\) got both context_length=12 and block_size=16"):
        cls(8, 6, 12, block_size=16, **kwargs(name))
    with pytest.raises(TypeError, match=r"got both context_length=12 and block_size=16"):
        cls(8, 6, context_length=12, block_size=16, **kwargs(name))
    with pytest.raises(TypeError, match=r"__init__\(\) missing 1 required positional argument: 'context_length'"):
        cls(8, 6, **kwargs(name))
