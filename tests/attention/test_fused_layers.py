"""The fused layers against the chapter's: construction, state_dict, outputs, gradients, dropout, errors."""

from __future__ import annotations

import warnings

import pytest
import torch
from chapter3_flash.attention import reference as ref
from helpers import BAD_INPUTS, CAUSAL_OUT, DEVICE, INPUTS, ON_GPU, V1_OUT, assert_refuses, build, requires_gpu

from chapter3_flash import attention


@pytest.fixture(params=["triton", "sdpa", "torch"])
def backend(request):
    """Every layer test runs on each path: the Triton kernel (interpreter here), PyTorch's fused kernels
    with our semantics, and the readable eager one."""
    with attention.use_backend(request.param):
        yield request.param


# (class name, constructor args, input shape): odd sizes, not multiples of any block.
CASES = [
    ("SelfAttention_v1", (5, 7), (13, 5)),
    ("SelfAttention_v2", (5, 7), (13, 5)),
    ("CausalAttention", (6, 10, 40, 0.0), (3, 37, 6)),
    ("MultiHeadAttentionWrapper", (6, 10, 40, 0.0, 3), (2, 29, 6)),
    ("MultiHeadAttention", (12, 18, 40, 0.0, 3), (2, 33, 12)),  # head_dim 6
]


@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("name, args, shape", CASES, ids=[c[0] for c in CASES])
def test_same_seed_same_state_dict(name, args, shape, qkv_bias):
    kw = {} if name == "SelfAttention_v1" else {"qkv_bias": qkv_bias}
    ours, theirs = build(name, args, **kw)
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]


@pytest.mark.parametrize("name, args, shape", CASES, ids=[c[0] for c in CASES])
def test_outputs_and_all_gradients_match(name, args, shape, backend):
    ours, theirs = build(name, args, qkv_bias=True) if name != "SelfAttention_v1" else build(name, args)
    x = torch.randn(*shape, device=DEVICE)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_a, out_b = ours(xa), theirs(xb)
    torch.testing.assert_close(out_a, out_b, atol=2e-5, rtol=1e-4)
    dout = torch.randn_like(out_a)
    out_a.backward(dout)
    out_b.backward(dout)
    torch.testing.assert_close(xa.grad, xb.grad, atol=2e-5, rtol=1e-4)
    for (pname, pa), (_, pb) in zip(ours.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=2e-5, rtol=1e-4, msg=lambda m, p=pname: f"{p}: {m}")


def test_chapter_printed_values(backend):
    inputs = INPUTS.to(DEVICE)
    torch.manual_seed(123)
    v1 = attention.SelfAttention_v1(3, 2).to(DEVICE)
    torch.testing.assert_close(v1(inputs).cpu(), torch.tensor(V1_OUT), atol=1e-4, rtol=0)
    batch = torch.stack((inputs, inputs))
    torch.manual_seed(123)
    out = attention.CausalAttention(3, 2, 6, 0.0).to(DEVICE)(batch).cpu()
    for b in range(2):
        torch.testing.assert_close(out[b], torch.tensor(CAUSAL_OUT), atol=1e-4, rtol=0)
    simple = attention.simplified_self_attention(inputs).cpu()
    torch.testing.assert_close(simple[1], torch.tensor([0.4419, 0.6515, 0.5683]), atol=1e-4, rtol=0)
    torch.testing.assert_close(simple, ref.simplified_self_attention(INPUTS), atol=1e-6, rtol=1e-5)


def test_gpt2_small_parameter_count():
    mha = attention.MultiHeadAttention(768, 768, 1024, 0.0, 12)
    assert sum(p.numel() for p in mha.parameters()) == 2_360_064


def test_self_attention_takes_a_batch_too(backend):
    ours, theirs = build("SelfAttention_v2", (4, 6))
    x = torch.randn(3, 11, 4, device=DEVICE)
    out = ours(x)
    assert out.shape == (3, 11, 6)
    for b in range(3):
        torch.testing.assert_close(out[b], theirs(x[b]), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name, args, shape", CASES[2:], ids=[c[0] for c in CASES[2:]])
def test_load_state_dict_both_ways(name, args, shape):
    ours, _ = build(name, args, seed=1)
    _, theirs = build(name, args, seed=2)
    x = torch.randn(*shape, device=DEVICE)
    ours.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(ours(x), theirs(x), atol=2e-5, rtol=1e-4)
    ours2, _ = build(name, args, seed=3)
    theirs.load_state_dict(ours2.state_dict())
    torch.testing.assert_close(ours2(x), theirs(x), atol=2e-5, rtol=1e-4)


def test_weights_are_read_at_forward_time():
    # GPT-2 weight loading assigns new Parameters to the projections.
    ours, theirs = build("MultiHeadAttention", (8, 8, 16, 0.0, 2))
    for name in ("W_query", "W_key", "W_value", "out_proj"):
        new = torch.nn.Parameter(torch.randn_like(getattr(ours, name).weight))
        getattr(ours, name).weight = new
        getattr(theirs, name).weight = torch.nn.Parameter(new.detach().clone())
    x = torch.randn(2, 16, 8, device=DEVICE)
    torch.testing.assert_close(ours(x), theirs(x), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name, args, shape", CASES[2:], ids=[c[0] for c in CASES[2:]])
def test_dropout_only_in_training(name, args, shape, backend):
    args = tuple(0.3 if isinstance(a, float) else a for a in args)
    ours, theirs = build(name, args)
    x = torch.randn(*shape, device=DEVICE)
    ours.eval()
    theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x), atol=2e-5, rtol=1e-4)
    ours.train()
    a, b = ours(x), ours(x)
    assert not torch.equal(a, b), "dropout did nothing in training mode"
    torch.manual_seed(5)
    c = ours(x)
    torch.manual_seed(5)
    assert torch.equal(c, ours(x)), "dropout is not reproducible under manual_seed"


@pytest.mark.parametrize("name, args, shape", CASES[2:], ids=[c[0] for c in CASES[2:]])
def test_dropout_one_in_training_matches_the_chapter(name, args, shape, backend):
    # nn.Dropout(1.0) drops every attention weight: the context is zero, the output the projection's bias.
    args = tuple(1.0 if isinstance(a, float) else a for a in args)
    ours, theirs = build(name, args, qkv_bias=True)
    x = torch.randn(*shape, device=DEVICE)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_a, out_b = ours(xa), theirs(xb)
    torch.testing.assert_close(out_a, out_b, atol=0, rtol=0)
    out_a.sum().backward()
    out_b.sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, atol=0, rtol=0)


@pytest.mark.parametrize(
    "name, args", [("CausalAttention", (16, 8, 12, 0.3)), ("MultiHeadAttention", (16, 16, 12, 0.1, 4))]
)
def test_torch_backend_draws_the_chapters_dropout_mask(name, args):
    # README: with use_backend("torch") the mask comes from PyTorch's generator where the chapter's layer draws
    # it, so under one seed the book's numbers come back (the kernels draw their own Philox bits).
    ours, theirs = build(name, args)
    x = torch.randn(2, 10, 16, device=DEVICE)
    torch.manual_seed(5)
    expected = theirs(x)
    with attention.use_backend("torch"):
        torch.manual_seed(5)
        got = ours(x)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    torch.manual_seed(6)
    assert not torch.allclose(theirs(x), expected), "the seed did not change the mask"


def test_training_step_with_dropout(backend):
    torch.manual_seed(0)
    mha = attention.MultiHeadAttention(16, 16, 32, 0.1, 4).to(DEVICE)
    opt = torch.optim.AdamW(mha.parameters(), lr=1e-2)
    x = torch.randn(2, 32, 16, device=DEVICE)
    target = torch.randn(2, 32, 16, device=DEVICE)
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.mse_loss(mha(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_no_score_matrix_in_the_autograd_graph():
    # Saved tensors of the fused layer hold no (b, nh, T, T) tensor: memory is O(T), not O(T^2).
    mha = attention.MultiHeadAttention(16, 16, 64, 0.0, 2).to(DEVICE)
    x = torch.randn(1, 64, 16, device=DEVICE, requires_grad=True)
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mha(x)
    assert shapes and all(not (len(s) == 4 and s[-1] == s[-2] == 64) for s in shapes), shapes


def test_half_precision_and_to(backend):
    ours, theirs = build("MultiHeadAttention", (16, 16, 40, 0.0, 2))
    x = torch.randn(2, 37, 16, device=DEVICE)
    expected = theirs(x)
    out = ours.half()(x.half())
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), expected, atol=5e-3, rtol=5e-3)
    out = ours.to(torch.float32)(x)
    torch.testing.assert_close(out, expected, atol=5e-3, rtol=5e-3)


def test_autocast(backend):
    # bf16 autocast, as the GPT-2 training configuration in the README runs: outputs and every gradient
    # against the chapter's layer under the same autocast.
    ours, theirs = build("MultiHeadAttention", (16, 16, 40, 0.0, 2))
    x = torch.randn(2, 37, 16, device=DEVICE)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    device_type = "cuda" if ON_GPU else "cpu"
    with torch.autocast(device_type, dtype=torch.bfloat16):
        out, expected = ours(xa), theirs(xb)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), atol=3e-2, rtol=3e-2)
    dout = torch.randn_like(out)
    out.backward(dout)
    expected.backward(dout)
    torch.testing.assert_close(xa.grad, xb.grad, atol=3e-2, rtol=3e-2)
    for (name, pa), (_, pb) in zip(ours.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=3e-2, rtol=3e-2, msg=lambda m, n=name: f"{n}: {m}")


def test_compiled_layer_has_no_graph_break():
    ours, theirs = build("MultiHeadAttention", (16, 16, 40, 0.1, 2))
    ours.eval()
    theirs.eval()
    compiled = torch.compile(ours, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")
    x = torch.randn(2, 37, 16, device=DEVICE)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = compiled(xa)
    expected = theirs(xb)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
    dout = torch.randn_like(out)
    out.backward(dout)
    expected.backward(dout)
    torch.testing.assert_close(xa.grad, xb.grad, atol=2e-5, rtol=1e-4)
    for (name, pa), (_, pb) in zip(ours.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=2e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_wide_head_falls_back_with_one_warning():
    ours, theirs = build("CausalAttention", (4, 300, 16, 0.0))
    x = torch.randn(1, 9, 4, device=DEVICE)
    with pytest.warns(UserWarning, match="head_dim 300"):
        out = ours(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours(x)  # warned once only
    torch.testing.assert_close(out, theirs(x), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name, args, shape, words", BAD_INPUTS)
def test_bad_input(name, args, shape, words):
    assert_refuses(attention, name, args, shape, words)


@requires_gpu
def test_gpt2_small_layer_on_gpu():
    ours, theirs = build("MultiHeadAttention", (768, 768, 1024, 0.0, 12))
    x = torch.randn(4, 1024, 768, device="cuda")
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("name, args, shape", CASES[2:], ids=[c[0] for c in CASES[2:]])
def test_zero_tokens_like_the_chapter(name, args, shape, backend):
    ours, theirs = build(name, args)
    x = torch.randn(shape[0], 0, shape[2], device=DEVICE)
    out = ours(x)
    assert out.shape == theirs(x).shape
