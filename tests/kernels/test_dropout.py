"""Dropout inside the kernel: reproducible, the right keep rate and scale, one mask for forward and backward."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from chapter3_flash.kernels import flash_attention
from chapter3_flash.kernels.dropout import keep_threshold
from helpers import DEVICE, assert_close_to_reference, attention_eager, backward_path, requires_gpu, visible
from hypothesis import given, settings
from hypothesis import strategies as st


def recover_keep_mask(B, Hq, Hkv, Nq, Nk, p, causal, seed, backend="triton", window=(-1, -1)):
    """The keep mask a call with this seed uses, read through the public function.

    With q = 0 every visible key gets the same weight 1/n_i, and with v = I (D = Nk) the output row
    is the weight row itself: out[i, j] = keep[i, j] / ((1 - p) * n_i).
    """
    q = torch.zeros(B, Hq, Nq, Nk, device=DEVICE)
    k = torch.randn(B, Hkv, Nk, Nk, device=DEVICE)
    v = torch.eye(Nk, device=DEVICE).expand(B, Hkv, Nk, Nk)
    torch.manual_seed(seed)
    out = flash_attention(q, k, v, causal=causal, dropout_p=p, backend=backend, window_size=window)
    seen = visible(Nq, Nk, causal, window, device=DEVICE)
    n_visible = seen.sum(-1, keepdim=True).clamp(min=1).float()
    scaled = out * (1 - p) * n_visible  # 1 where kept, 0 where dropped
    keep = scaled.round()
    # Kept weights are scaled by exactly 1/(1-p): the recovered values sit on 0 and 1 up to rounding.
    assert torch.allclose(scaled, keep, atol=1e-4), "kept weights are not scaled by 1/(1-p)"
    assert not keep[..., ~seen].any(), "a masked (future) key was kept"
    return keep.bool() & seen


# "sdpa": the chunked exact path off CUDA (kernels/eager.py), whose mask comes from PyTorch's generator.
@pytest.mark.parametrize("backend", ["triton", "sdpa"])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate(p, backend):
    keep = recover_keep_mask(2, 2, 2, 96, 96, p, causal=False, seed=1, backend=backend)
    n = keep.numel()
    rate = keep.float().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(rate - (1 - p)) < 5 * sigma, f"keep rate {rate:.4f}, expected {1 - p} +- {5 * sigma:.4f}"
    # Rows, heads and batches draw their own bits.
    assert not torch.equal(keep[0, 0], keep[0, 1])
    assert not torch.equal(keep[0, 0], keep[1, 0])
    assert not torch.equal(keep[0, 0, 0], keep[0, 0, 1])


def philox4x32(seed: int, c0, c1, c2, c3, rounds: int = 7):
    """Philox4x32 (Salmon et al., SC'11) in numpy, as tl.philox computes it: key = the seed's two halves."""
    mask = np.uint64(0xFFFFFFFF)
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    c = [np.asarray(x, dtype=np.uint64) for x in (c0, c1, c2, c3)]
    for _ in range(rounds):
        p0, p2 = np.uint64(0xD2511F53) * c[0], np.uint64(0xCD9E8D57) * c[2]
        c = [(p2 >> np.uint64(32)) ^ c[1] ^ k0, p2 & mask, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & mask]
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask, (k1 + np.uint64(0xBB67AE85)) & mask
    return c


def documented_keep_mask(seed: int, B: int, H: int, Nq: int, Nk: int, p: float) -> torch.Tensor:
    """The keep bits kernels/dropout.py's docstring promises for weight (b, h, i, j), computed without Triton:
    rows {i, i+8} x keys {j, j+1, j+8, j+9} per Philox call."""
    b, h, i, j = np.meshgrid(np.arange(B), np.arange(H), np.arange(Nq), np.arange(Nk), indexing="ij")
    counter = ((j // 16) * 4 + (j % 8) // 2, (i // 16) * 8 + i % 8, b * H + h, 0 * i)
    word, half = 2 * ((i // 8) % 2) + (j // 8) % 2, j % 2
    words = np.choose(word, philox4x32(seed, *counter))
    bits = (words >> (16 * half).astype(np.uint64)) & np.uint64(0xFFFF)
    return torch.from_numpy(bits >= keep_threshold(p))


@pytest.mark.parametrize("p", [0.1, 0.6])
def test_keep_bits_follow_the_documented_philox_counter(p):
    # Anyone can reproduce a mask: Philox4x32-7 on the documented counter, nothing tile-dependent.
    B, H, N, seed = 2, 2, 72, 5
    keep = recover_keep_mask(B, H, H, N, N, p, causal=False, seed=seed)
    torch.manual_seed(seed)
    philox_seed = int(torch.randint(0, 2**62, (1,), dtype=torch.int64, device=DEVICE))  # what the op draws
    assert torch.equal(keep.cpu(), documented_keep_mask(philox_seed, B, H, N, N, p))


def test_keep_bits_are_uncorrelated_with_their_neighbours():
    # Weights that share a Philox call (rows i, i + 8; keys j, j + 1, j + 8, j + 9) or sit next to
    # each other must not agree more often than chance.
    keep = recover_keep_mask(2, 2, 2, 128, 128, 0.5, causal=False, seed=3).float()
    for di, dj in [(0, 1), (1, 0), (8, 0), (0, 8), (8, 8), (8, 1), (0, 2), (16, 0), (0, 16)]:
        a = keep[..., : 128 - di, : 128 - dj].flatten()
        b = keep[..., di:, dj:].flatten()
        corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
        assert abs(corr) < 5 / math.sqrt(a.numel()), f"offset ({di}, {dj}): correlation {corr:.4f}"


def test_same_seed_same_result_different_seed_differs():
    shape = (2, 3, 50, 16)
    q, k, v = (torch.randn(*shape, device=DEVICE) for _ in range(3))
    results = []
    for seed in (7, 7, 8):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        torch.manual_seed(seed)
        out = flash_attention(qq, kk, vv, causal=True, dropout_p=0.2)
        out.backward(torch.ones_like(out))
        results.append((out, qq.grad, kk.grad, vv.grad))
    assert all(torch.equal(a, b) for a, b in zip(results[0], results[1])), "same seed gave different results"
    assert not torch.equal(results[0][0], results[2][0]), "different seeds gave the same output"


def test_consecutive_calls_differ():
    q, k, v = (torch.randn(1, 2, 40, 16, device=DEVICE) for _ in range(3))
    a = flash_attention(q, k, v, causal=True, dropout_p=0.3)
    b = flash_attention(q, k, v, causal=True, dropout_p=0.3)
    assert not torch.equal(a, b), "the generator did not advance between calls"


def test_p0_is_the_no_dropout_path():
    # p = 0 takes the kernel without dropout: no seed is drawn (the generator does not move) and the result is
    # attention itself. p = 2^-18 rounds to a threshold of 0: the dropout kernel runs, keeps every weight, and
    # must agree with it to the last rounding of the 1 / (1 - p) scale.
    q, k, v = (torch.randn(1, 2, 40, 16, device=DEVICE) for _ in range(3))
    rng_state = torch.cuda.get_rng_state if DEVICE == "cuda" else torch.get_rng_state  # the input device's generator
    state = rng_state()
    none = flash_attention(q, k, v, causal=True, dropout_p=0.0)
    assert torch.equal(rng_state(), state), "p = 0 drew a dropout seed"
    exact = attention_eager(q.double(), k.double(), v.double(), causal=True)
    assert (none.double() - exact).abs().max() < 1e-5
    tiny = flash_attention(q, k, v, causal=True, dropout_p=2**-18)
    assert not torch.equal(rng_state(), state), "p > 0 did not draw a seed"
    torch.testing.assert_close(tiny, none, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "B, Hq, Hkv, Nq, Nk, D",
    [
        (1, 2, 2, 64, 64, 32),  # plain causal self-attention
        (2, 4, 2, 37, 61, 24),  # grouped heads, Nq < Nk, ragged sizes
        (1, 3, 1, 48, 20, 16),  # multi-query, Nq > Nk: rows with no visible key
        (1, 2, 1, 40, 56, 80),  # padded head dim 128: dK/dV exchanges the bits between lanes (not per lane)
    ],
)
@pytest.mark.parametrize("backward", ["one-pass", "two-kernel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forward_and_backward_share_one_mask(B, Hq, Hkv, Nq, Nk, D, dtype, backward):
    check_one_mask(B, Hq, Hkv, Nq, Nk, D, dtype, p=0.25, causal=True, backward=backward)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal, window", [(True, (12, -1)), (False, (5, 9))])
def test_dropout_with_a_sliding_window(causal, window, dtype):
    check_one_mask(1, 4, 2, 70, 70, 32, dtype, p=0.3, causal=causal, window=window)


@pytest.mark.skipif(DEVICE != "cpu", reason="the chunked dropout path is the one off CUDA (on CUDA, SDPA's own)")
@pytest.mark.parametrize("path", ["chunked", "math"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_on_the_sdpa_path_shares_one_mask(dtype, path, monkeypatch):
    # Off CUDA with dropout: query chunks, each mask drawn from PyTorch's generator and drawn again in the
    # backward (rows past a chunk boundary, CHUNK_ROWS, and grouped heads); or, for a small problem, SDPA's
    # math path with its own dropout. Both with rows that see no key (Nq > Nk) and a window.
    from chapter3_flash.kernels import eager

    monkeypatch.setattr(eager, "SMALL_DROPOUT_ELEMENTS", 0 if path == "chunked" else 1 << 19)
    n = eager.CHUNK_ROWS
    check_one_mask(1, 4, 2, n + 37, n + 50, 16, dtype, p=0.2, causal=True, backend="sdpa")
    check_one_mask(1, 4, 2, 60, 41, 16, dtype, p=0.3, causal=True, backend="sdpa", window=(7, -1))


@settings(max_examples=8, deadline=None)
@given(
    Hkv=st.integers(1, 2),
    group=st.integers(1, 2),
    Nq=st.integers(1, 70),
    Nk=st.integers(1, 70),
    D=st.sampled_from([4, 16, 40, 64, 80]),
    p=st.sampled_from([0.1, 0.5, 0.9]),
    causal=st.booleans(),
)
def test_random_shapes_share_one_mask(Hkv, group, Nq, Nk, D, p, causal):
    check_one_mask(1, Hkv * group, Hkv, Nq, Nk, D, torch.float32, p=p, causal=causal)


def check_one_mask(
    B, Hq, Hkv, Nq, Nk, D, dtype, p, causal, seed=1234, window=(-1, -1), backward=None, backend="triton"
):
    """out, dq, dk, dv of a dropout call against float64 with the mask that call used, recovered first."""
    # The mask is recovered with head dim Nk; the real call uses D: on a GPU that means other tiles.
    keep = recover_keep_mask(B, Hq, Hkv, Nq, Nk, p, causal=causal, seed=seed, backend=backend, window=window)
    q = torch.randn(B, Hq, Nq, D, device=DEVICE, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, Nk, D, device=DEVICE, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, Nk, D, device=DEVICE, dtype=dtype, requires_grad=True)
    torch.manual_seed(seed)
    with backward_path(backward):
        out = flash_attention(q, k, v, causal=causal, dropout_p=p, window_size=window, backend=backend)
        dout = torch.randn_like(out)
        out.backward(dout)

    refs = {}
    for label, compute in (("ref64", torch.float64), ("lowp", dtype)):
        qq, kk, vv = (t.detach().to(compute).requires_grad_() for t in (q, k, v))
        o = attention_eager(qq, kk, vv, causal=causal, keep=keep, p=p, window=window)
        o.backward(dout.to(compute))
        refs[label] = [o, qq.grad, kk.grad, vv.grad]
    for name, ours, ref, low in zip(("out", "dq", "dk", "dv"), (out, q.grad, k.grad, v.grad), *refs.values()):
        assert_close_to_reference(name, ours, ref, low)


@pytest.mark.parametrize("backend", ["triton", "sdpa", "torch"])
def test_p1_drops_everything_like_nn_dropout(backend):
    q, k, v = (torch.randn(2, 2, 40, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    out = flash_attention(q, k, v, causal=True, dropout_p=1.0, backend=backend)
    out.backward(torch.randn_like(out))
    assert torch.equal(out, torch.zeros_like(out))
    for t in (q, k, v):
        assert t.grad is None or torch.equal(t.grad, torch.zeros_like(t)), "p = 1 leaked a gradient (or a NaN)"


def test_sdpa_path_is_reproducible_and_fresh_per_call():
    # The chunked dropout path draws its seed from PyTorch's generator: manual_seed reproduces it, the next
    # call draws new bits.
    q, k, v = (torch.randn(1, 2, 30, 8) for _ in range(3))
    torch.manual_seed(3)
    a = flash_attention(q, k, v, causal=True, dropout_p=0.4, backend="sdpa")
    torch.manual_seed(3)
    b = flash_attention(q, k, v, causal=True, dropout_p=0.4, backend="sdpa")
    assert torch.equal(a, b)
    assert not torch.equal(a, flash_attention(q, k, v, causal=True, dropout_p=0.4, backend="sdpa"))


def test_dropout_under_torch_compile_matches_eager():
    # The seed is drawn inside the custom op, so a compiled model draws the same bits as eager code.
    q, k, v = (torch.randn(1, 2, 40, 16, device=DEVICE) for _ in range(3))
    attend = lambda q, k, v: flash_attention(q, k, v, causal=True, dropout_p=0.3)
    compiled = torch.compile(attend, fullgraph=True, backend="inductor" if DEVICE == "cuda" else "aot_eager")
    results = []
    for fn in (compiled, compiled, attend):
        torch.manual_seed(11)
        results.append(fn(q, k, v))
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


@requires_gpu
def test_dropout_in_a_cuda_graph_draws_fresh_bits_per_replay():
    q, k, v = (torch.randn(1, 2, 128, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        flash_attention(q, k, v, causal=True, dropout_p=0.3)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = flash_attention(q, k, v, causal=True, dropout_p=0.3)
    graph.replay()
    first = out.clone()
    graph.replay()
    assert torch.isfinite(first).all()
    assert not torch.equal(first, out), "replays reused one dropout mask"
