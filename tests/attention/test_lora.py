"""Appendix E's LoRA (chapters 6 and 7 fine-tune with it) on the fused layers: a chapter-4 GPT whose
projections are wrapped in LinearWithLoRA gives the book's outputs, built either way (swap, then wrap;
or wrap, then swap), and a width mistake still gets a clear error."""

from __future__ import annotations

import copy

import pytest
import torch
from chapter3_flash.attention import reference as ref
from helpers import DEVICE

from bench.book.lora import LinearWithLoRA, replace_linear_with_lora
from bench.gpt import GPT_CONFIG_124M, GPTModel
from chapter3_flash import attention

CFG = {
    **GPT_CONFIG_124M,
    "vocab_size": 97,
    "context_length": 40,
    "emb_dim": 24,
    "n_heads": 3,
    "n_layers": 2,
    "drop_rate": 0.0,
}


def lora_gpt():
    torch.manual_seed(123)
    model = GPTModel(CFG).to(DEVICE)
    torch.manual_seed(7)
    replace_linear_with_lora(model, rank=4, alpha=8)
    for module in model.modules():  # B starts at zero; give the update a value, so it shows in the outputs
        if isinstance(module, LinearWithLoRA):
            torch.nn.init.normal_(module.lora.B, std=0.02)
    return model.to(DEVICE)


@pytest.mark.parametrize("order", ["wrap-then-swap", "swap-then-wrap"])
@pytest.mark.parametrize("backend", ["triton", "sdpa"])
def test_lora_wrapped_gpt_matches_the_book(order, backend):
    book = lora_gpt()
    att = book.trf_blocks[0].att
    assert all(type(getattr(att, p)) is LinearWithLoRA for p in ("W_query", "W_key", "W_value", "out_proj"))
    assert type(book.trf_blocks[0].ff.layers[0]) is LinearWithLoRA
    if order == "wrap-then-swap":
        ours = attention.swap_attention(copy.deepcopy(book))
    else:
        torch.manual_seed(123)
        ours = attention.swap_attention(GPTModel(CFG).to(DEVICE))
        torch.manual_seed(7)
        replace_linear_with_lora(ours, rank=4, alpha=8)  # the new A and B are made on the CPU, as in the book
        ours.to(DEVICE).load_state_dict(book.state_dict())
    assert len(attention.fused_layers(ours)) == CFG["n_layers"]
    idx = torch.randint(0, CFG["vocab_size"], (2, 33), device=DEVICE)
    with attention.use_backend(backend):
        logits = ours(idx)
        torch.testing.assert_close(logits, book(idx), atol=1e-5, rtol=1e-5)
        logits.logsumexp(-1).sum().backward()
    book(idx).logsumexp(-1).sum().backward()
    for (name, pa), (_, pb) in zip(ours.named_parameters(), book.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_lora_on_every_chapter_layer():
    torch.manual_seed(0)
    for name, args, shape in [
        ("SelfAttention_v2", (6, 4), (9, 6)),
        ("CausalAttention", (6, 4, 12, 0.0), (2, 9, 6)),
        ("MultiHeadAttentionWrapper", (6, 4, 12, 0.0, 2), (2, 9, 6)),
        ("MultiHeadAttention", (6, 6, 12, 0.0, 3), (2, 9, 6)),
    ]:
        torch.manual_seed(1)
        theirs = getattr(ref, name)(*args)
        replace_linear_with_lora(theirs, rank=2, alpha=4)
        theirs.to(DEVICE)
        ours = attention.swap_attention(copy.deepcopy(theirs))
        x = torch.randn(*shape, device=DEVICE)
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_width_errors_stay_clear_with_wrapped_projections():
    layer = attention.MultiHeadAttention(8, 8, 16, 0.0, 2)
    replace_linear_with_lora(layer, rank=2, alpha=1)
    layer.to(DEVICE)
    with pytest.raises(ValueError, match="d_in=8"):
        layer(torch.randn(1, 4, 5, device=DEVICE))
    layer.W_key = torch.nn.Linear(8, 6).to(DEVICE)  # a projection of the wrong width, found by what it returns
    with pytest.raises(ValueError, match="W_key returned width 6"):
        layer(torch.randn(1, 4, 8, device=DEVICE))
