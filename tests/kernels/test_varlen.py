"""flash_attention_varlen and the padding helpers against tests/helpers.varlen_ref (float64, sequence by sequence).

Packed batches with sequences of 0 and 1 tokens, Nq != Nk per sequence, grouped heads, windows, softcap,
sinks, the log-sum-exp; forward and the gradients of q, k, v and the sinks; dropout's independence of what a
sequence is packed with; the bad inputs of issue 26 item 5.
"""

from __future__ import annotations

import pytest
import torch
from chapter3_flash.kernels import (
    eager,
    flash_attention,
    flash_attention_varlen,
    pad_input,
    settings,
    unpad_input,
    varlen,
)
from chapter3_flash.kernels import flash_attn as fa
from chapter3_flash.kernels.flash_attn import _varlen_tile
from helpers import DEVICE, INTERPRETED, ON_GPU, assert_close_to_reference, backward_path, cu_seqlens, varlen_ref

BACKENDS = ["triton", "sdpa", "torch"]
# Per sequence (queries, keys): empty, one token, Nq < Nk (newest queries), Nq > Nk, equal, keys but no query.
LENGTHS = [(5, 5), (0, 3), (1, 1), (7, 19), (12, 4), (1, 9), (0, 0), (20, 20), (3, 0)]


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    monkeypatch.setattr(eager, "CHUNK_ROWS", 16)


def packed(lengths, Hq, Hkv, D, dtype=torch.float32, scale=1.5):
    nq, nk = [a for a, _ in lengths], [b for _, b in lengths]
    q = torch.randn(sum(nq), Hq, D, device=DEVICE, dtype=dtype) * scale
    k = torch.randn(sum(nk), Hkv, D, device=DEVICE, dtype=dtype) * scale
    v = torch.randn(sum(nk), Hkv, D, device=DEVICE, dtype=dtype)
    return q, k, v, cu_seqlens(nq), cu_seqlens(nk), max(nq), max(nk)


def check_varlen(lengths, Hq, Hkv, D, *, backend, dtype=torch.float32, sinks=False, window=(-1, -1), **kw):
    q, k, v, cu_q, cu_k, mq, mk = packed(lengths, Hq, Hkv, D, dtype)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    s = (torch.randn(Hq, device=DEVICE) * 2).requires_grad_() if sinks else None
    out, lse = flash_attention_varlen(
        q, k, v, cu_q, cu_k, mq, mk, window_size=window, sinks=s, return_lse=True, backend=backend, **kw
    )
    assert out.shape == q.shape and lse.shape == (Hq, q.shape[0]) and lse.dtype == torch.float32
    dout = torch.randn_like(out)
    out.backward(dout)
    ours = {"out": out, "dq": q.grad, "dk": k.grad, "dv": v.grad}
    if s is not None:
        ours["dsinks"] = s.grad
    refs = {}
    for label, dt in (("ref64", torch.float64), ("lowp", dtype)):
        qq, kk, vv = (t.detach().to(dt).requires_grad_() for t in (q, k, v))
        ss = s.detach().to(torch.float64 if dt == torch.float64 else s.dtype).requires_grad_() if sinks else None
        o, lse_ref = varlen_ref(qq, kk, vv, cu_q, cu_k, window=window, sinks=ss, **kw)
        o.backward(dout.to(dt))
        refs[label] = {"out": o, "dq": qq.grad, "dk": kk.grad, "dv": vv.grad, "lse": lse_ref}
        if sinks:
            refs[label]["dsinks"] = ss.grad
    for name, value in ours.items():
        assert_close_to_reference(name, value, refs["ref64"][name], refs["lowp"][name])
    empty = torch.isneginf(refs["ref64"]["lse"])
    assert torch.equal(torch.isneginf(lse), empty), "lse: -inf pattern differs from the reference"
    assert_close_to_reference("lse", lse[~empty], refs["ref64"]["lse"][~empty].double(), refs["lowp"]["lse"][~empty])
    return out, lse


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_matches_reference(causal, backend):
    check_varlen(LENGTHS, 4, 2, 16, causal=causal, backend=backend)


@pytest.mark.parametrize("backward", ["one-pass", "two-kernel"])
@pytest.mark.parametrize("features", [dict(), dict(softcap=2.0, sinks=True)], ids=["plain", "softcap+sinks"])
def test_triton_backward_paths(backward, features):
    """Both Triton backwards on a packed batch (the one pass zeroes and adds dQ over all packed rows; the two
    kernels write delta per sequence), with dropout off; GQA with Nq != Nk per sequence."""
    with backward_path(backward):
        check_varlen(LENGTHS, 4, 2, 16, causal=True, backend="triton", **features)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kw",
    [
        pytest.param(dict(causal=True, softcap=2.0), id="softcap"),
        pytest.param(dict(causal=True, sinks=True), id="sinks"),
        pytest.param(dict(causal=False, window=(4, 2), softcap=3.0, sinks=True), id="window+softcap+sinks"),
        pytest.param(dict(causal=True, window=(6, -1)), id="causal-window"),
    ],
)
def test_features(kw, backend):
    check_varlen(LENGTHS, 4, 1, 16, backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype, backend):
    check_varlen(LENGTHS, 4, 2, 32, causal=True, backend=backend, dtype=dtype, sinks=True, softcap=2.0)


@pytest.mark.skipif(not (ON_GPU or INTERPRETED), reason="Triton runs on a GPU or the interpreter")
def test_triton_runs_a_large_batch_over_the_longest_sequences_grid(monkeypatch):
    """Above fa.TILE_LIST_MAX_SEQS sequences the kernels run over (tiles of the longest, heads, sequences), tiles
    past a sequence exiting at once: the same answers, forward and backward, both backward paths."""
    monkeypatch.setattr(fa, "TILE_LIST_MAX_SEQS", 3)
    for backward in ("one-pass", "two-kernel"):
        with backward_path(backward):
            check_varlen(LENGTHS, 4, 2, 16, causal=True, backend="triton", window=(6, 0))


@pytest.mark.parametrize("block", [16, 64])
@pytest.mark.parametrize("seed", [*range(4), "tight"])
def test_tile_list_visits_every_real_tile_once_and_nothing_else(block, seed):
    """The varlen kernels' program i is the packed batch's tile i (kernels.flash_attn._varlen_tile): every tile of
    every sequence exactly once, in sequence order, no tile past a sequence's own rows, and the grid
    (fa._tiles) has fewer than n_seq idle slots after the last tile ("tight": lengths one past a multiple of the
    tile, where the grid's bound is exact, so a grid one slot short loses a tile)."""
    if seed == "tight":
        lengths = [block * i + 1 for i in range(6)]
        n_seq = len(lengths)
    else:
        gen = torch.Generator().manual_seed(seed)
        n_seq = int(torch.randint(1, 40, (1,), generator=gen))
        lengths = [int(x) for x in torch.randint(0, 200, (n_seq,), generator=gen)]
        lengths[int(torch.randint(0, n_seq, (1,), generator=gen))] = 0  # an empty sequence somewhere
    cu = cu_seqlens(lengths)
    expected = [(b, t) for b, n in enumerate(lengths) for t in range(-(-n // block))]
    varlen_spec = fa.Varlen(cu, cu, max(lengths), max(lengths))
    slots, batch, n, seq_block = fa._tiles(n_seq, max(lengths), block, sum(lengths), varlen_spec)
    assert (batch, n) == (1, n_seq) and seq_block >= n_seq
    assert len(expected) <= slots <= len(expected) + n_seq - 1
    if seed == "tight":
        assert slots == len(expected)
    got = _tile_map(cu, n_seq, slots, block, seq_block)
    assert got[: len(expected)] == expected
    assert all(seq >= n_seq for seq, _ in got[len(expected) :])


def _tile_map(cu, n_seq, slots, block, seq_block) -> list[tuple[int, int]]:
    """(seq, tile) of each program of a grid of ``slots``, from _varlen_tile itself (a GPU, or the interpreter)."""
    if not (ON_GPU or INTERPRETED):
        pytest.skip("Triton runs on a GPU or the interpreter")
    import triton
    import triton.language as tl

    @triton.jit
    def tile_map(CU, OUT, n_seq, BLOCK: tl.constexpr, SEQ_BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        seq, tile = _varlen_tile(CU, n_seq, pid, BLOCK, SEQ_BLOCK)
        tl.store(OUT + 2 * pid, seq)
        tl.store(OUT + 2 * pid + 1, tile)

    out = torch.full((max(slots, 1), 2), -1, dtype=torch.int32, device=cu.device)
    if slots:
        tile_map[(slots,)](cu, out, n_seq, BLOCK=block, SEQ_BLOCK=seq_block)
    return [tuple(row) for row in out[:slots].tolist()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_flash_attention_on_each_sequence(backend):
    """Each sequence of the packed call is flash_attention on that sequence alone, bit for bit on the PyTorch path
    (it runs exactly that) and to rounding on the Triton one."""
    q, k, v, cu_q, cu_k, mq, mk = packed(LENGTHS, 4, 2, 16)
    out = flash_attention_varlen(q, k, v, cu_q, cu_k, mq, mk, causal=True, backend=backend)
    for rows, alone in each_alone(q, k, v, cu_q, cu_k, backend):
        torch.testing.assert_close(out[rows], alone, atol=2e-6, rtol=2e-6)


def each_alone(q, k, v, cu_q, cu_k, backend):
    """(rows of the packed output, flash_attention on that sequence alone as (n, Hq, D)) for each sequence."""
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(cq) - 1):
        qb, kb, vb = (
            t[a:z].transpose(0, 1)[None]
            for t, a, z in ((q, cq[b], cq[b + 1]), (k, ck[b], ck[b + 1]), (v, ck[b], ck[b + 1]))
        )
        yield slice(cq[b], cq[b + 1]), flash_attention(qb, kb, vb, causal=True, backend=backend)[0].transpose(0, 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["q-nan", "q-inf", "first-key-nan", "later-key-inf", "v-nan"])
def test_nonfinite_input_gives_each_sequence_what_it_gives_alone(where, backend):
    """A NaN or Inf in one sequence's rows: every sequence's output is flash_attention's on it alone (the
    chapter's NaN rows, never zeros in their place), and the other sequences stay finite. The PyTorch path screens
    the packed batch once instead of each sequence; this is what that screen must not miss."""
    # Sequence 1 is short: PyTorch's CPU kernel takes a row's max without vector lanes below 8 keys, and there a
    # row of NaN scores comes back as zeros unless the screen sends it the exact way.
    lengths = [(6, 6), (5, 5), (4, 11), (1, 1), (9, 9)]
    q, k, v, cu_q, cu_k, mq, mk = packed(lengths, 4, 2, 16)
    row, value = {"q-nan": (8, "nan"), "q-inf": (7, "inf"), "first-key-nan": (6, "nan"), "later-key-inf": (9, "inf"),
                  "v-nan": (10, "nan")}[where]  # fmt: skip
    target = {"q": q, "f": k, "l": k, "v": v}[where[0]]
    target[row, 1, 3] = float(value)  # sequence 1 (rows 6..10); query heads 2, 3 read key/value head 1
    out = flash_attention_varlen(q, k, v, cu_q, cu_k, mq, mk, causal=True, backend=backend)
    for b, (rows, alone) in enumerate(each_alone(q, k, v, cu_q, cu_k, backend)):
        torch.testing.assert_close(out[rows], alone, atol=2e-6, rtol=2e-6, equal_nan=True)
        if b != 1:
            assert torch.isfinite(out[rows]).all(), f"sequence {b} was reached by another's {where}"
    if where == "first-key-nan":  # the first query sees only that key: the chapter's softmax gives NaN, not 0
        assert out[6, 2:].isnan().all() and torch.isfinite(out[6, :2]).all()
    if where == "q-nan":  # the whole row of that query head
        assert out[8, 1].isnan().all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_head_vectors(backend):
    """Packed tensors whose last dimension is strided (every other element of a wider one) give what their
    contiguous copies give, forward and backward (PyTorch's CPU flash kernel would read them wrong)."""
    q, k, v, cu_q, cu_k, mq, mk = packed(LENGTHS, 4, 2, 16)
    wide = [torch.zeros(*t.shape[:2], 32, device=DEVICE) for t in (q, k, v)]
    for w, t in zip(wide, (q, k, v)):
        w[..., ::2] = t
    strided = [w[..., ::2].requires_grad_() for w in (x.requires_grad_() for x in wide)]
    assert strided[0].stride(-1) == 2
    dense = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    outs = []
    for args in (strided, dense):
        out = flash_attention_varlen(*args, cu_q, cu_k, mq, mk, causal=True, backend=backend)
        out.backward(torch.ones_like(out))
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-6)
    for w, d in zip(wide, dense):
        torch.testing.assert_close(w.grad[..., ::2], d.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_mask_does_not_depend_on_the_other_sequences(backend):
    """Sequence X's output under dropout, packed after A or after B (other lengths, other offsets), is the same,
    and is what flash_attention gives on X alone from the same seed."""
    H, D = 2, 16
    x = [torch.randn(n, H, D, device=DEVICE) for n in (20, 20, 20)]  # X's q, k, v
    outs = []
    for before in (3, 11):
        a = [torch.randn(before, H, D, device=DEVICE) for _ in range(3)]
        q, k, v = (torch.cat([ai, xi]) for ai, xi in zip(a, x))
        cu = cu_seqlens([before, 20])
        torch.manual_seed(7)
        out = flash_attention_varlen(q, k, v, cu, cu, 20, 20, causal=True, dropout_p=0.3, backend=backend)
        outs.append(out[before:])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-6)
    torch.manual_seed(7)
    alone = flash_attention(*(t.transpose(0, 1)[None] for t in x), causal=True, dropout_p=0.3, backend=backend)
    torch.testing.assert_close(outs[0], alone[0].transpose(0, 1), atol=1e-6, rtol=1e-6)
    no_drop = flash_attention(*(t.transpose(0, 1)[None] for t in x), causal=True, backend=backend)
    assert not torch.allclose(alone, no_drop)  # dropout did act


def test_empty_batch_and_all_empty_sequences():
    q = torch.randn(0, 2, 16, device=DEVICE, requires_grad=True)
    s = torch.zeros(2, device=DEVICE, requires_grad=True)
    for cu in (torch.zeros(1, dtype=torch.int32, device=DEVICE), torch.zeros(4, dtype=torch.int32, device=DEVICE)):
        out, lse = flash_attention_varlen(q, q, q, cu, cu, 0, 0, causal=True, sinks=s, return_lse=True)
        assert out.shape == (0, 2, 16) and lse.shape == (2, 0)


def test_meta_tensors_give_shapes():
    """Meta tensors: the output (and lse, and gradients) of the right shape, as flash_attention gives, for every
    backend's request, without reading cu_seqlens (a meta tensor has no values)."""
    q = torch.empty(8, 4, 16, device="meta", requires_grad=True)
    kv = torch.empty(11, 2, 16, device="meta", requires_grad=True)
    cu_q = torch.empty(3, dtype=torch.int32, device="meta")
    for backend in ("auto", "sdpa", "torch"):
        out, lse = flash_attention_varlen(q, kv, kv, cu_q, cu_q, 5, 6, causal=True, return_lse=True, backend=backend)
        assert out.device.type == "meta" and out.shape == (8, 4, 16) and lse.shape == (4, 8)
        assert lse.dtype == torch.float32
        (dq,) = torch.autograd.grad(out.sum(), q)
        assert dq.shape == q.shape and dq.device.type == "meta"


def test_no_total_by_total_matrix_on_the_pytorch_path(monkeypatch):
    """The PyTorch path works sequence by sequence: no matmul ever sees more rows than one sequence's."""
    seen = []
    real = eager._grouped

    def spy(a, kv, op):
        seen.append(max(a.shape[2], kv.shape[2]))
        return real(a, kv, op)

    monkeypatch.setattr(eager, "_grouped", spy)
    lengths = [(30, 30), (25, 25), (40, 40)]
    q, k, v, cu_q, cu_k, mq, mk = packed(lengths, 2, 2, 16)
    flash_attention_varlen(q, k, v, cu_q, cu_k, mq, mk, causal=True, softcap=1.0, backend="sdpa")
    assert seen and max(seen) <= 40


# ---------------------------------------------------------------------------------------------
# Padding helpers
# ---------------------------------------------------------------------------------------------


def test_unpad_pad_round_trip_and_varlen_equals_dense_with_a_key_mask():
    B, N, H, D = 3, 10, 2, 16
    mask = torch.tensor([[1] * 10, [0] * 4 + [1] * 6, [1] * 3 + [0] * 7], device=DEVICE)  # full, left-, right-padded
    x = torch.randn(B, N, H, D, device=DEVICE, requires_grad=True)
    packed_x, indices, cu, max_len, used = unpad_input(x, mask)
    assert packed_x.shape == (19, H, D) and max_len == 10 and cu.tolist() == [0, 10, 16, 19]
    assert cu.dtype == torch.int32 and used.tolist() == [10, 6, 3]
    back = pad_input(packed_x, indices, B, N)
    torch.testing.assert_close(back, x * mask[:, :, None, None])
    back.sum().backward()
    torch.testing.assert_close(x.grad, mask[:, :, None, None].float().expand_as(x))
    # Attention over the packed tokens (non-causal) = dense attention with the padding keys masked, at real rows.
    out = pad_input(
        flash_attention_varlen(packed_x, packed_x, packed_x, cu, cu, max_len, max_len, causal=False), indices, B, N
    )
    xt = x.detach().transpose(1, 2)  # (B, H, N, D)
    keymask = (mask != 0)[:, None, None, :]  # (B, 1, 1, N)
    dense = torch.nn.functional.scaled_dot_product_attention(xt, xt, xt, attn_mask=keymask).transpose(1, 2)
    real = mask.bool()
    torch.testing.assert_close(out[real], dense[real], atol=1e-5, rtol=1e-5)


def test_padding_bad_input():
    x = torch.randn(2, 5, 3, device=DEVICE)
    with pytest.raises(ValueError, match="must agree"):
        unpad_input(x, torch.ones(2, 4, dtype=torch.bool, device=DEVICE))
    with pytest.raises(TypeError, match="bool or integer"):
        unpad_input(x, torch.ones(2, 5, device=DEVICE))
    with pytest.raises(ValueError, match="indices must be"):
        pad_input(x[0], torch.arange(3, device=DEVICE), 1, 5)


# ---------------------------------------------------------------------------------------------
# Bad input (issue 26, item 5)
# ---------------------------------------------------------------------------------------------


def _call(cu_q=None, cu_k=None, mq=8, mk=8, q=None, k=None, **kw):
    q = torch.randn(8, 2, 16, device=DEVICE) if q is None else q
    k = torch.randn(8, 2, 16, device=DEVICE) if k is None else k
    ok = torch.tensor([0, 3, 8], dtype=torch.int32, device=DEVICE)
    return flash_attention_varlen(
        q, k, k, ok if cu_q is None else cu_q, ok if cu_k is None else cu_k, mq, mk, causal=True, **kw
    )


def _cu(*values, dtype=torch.int32):
    return torch.tensor(values, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(cu_q=_cu(0, 3, 8, dtype=torch.int64)), TypeError, "cu_seqlens_q must have dtype torch.int32"),
        (dict(cu_k=_cu(0, 3, 8, dtype=torch.float32)), TypeError, "cu_seqlens_k must have dtype torch.int32"),
        (dict(cu_q=[0, 3, 8]), TypeError, "cu_seqlens_q must be an int32 torch.Tensor"),
        (dict(cu_q=_cu(1, 3, 8)), ValueError, "cu_seqlens_q must start at 0, got 1"),
        (
            dict(cu_q=_cu(0, 5, 3, 8), cu_k=_cu(0, 2, 4, 8)),
            ValueError,
            "cu_seqlens_q must not decrease: 5 then 3 at sequence 1",
        ),
        (dict(cu_q=_cu(0, 3, 7)), ValueError, "cu_seqlens_q must end at the token count 8, got 7"),
        (dict(mq=4), ValueError, "cu_seqlens_q holds a sequence of 5 tokens, longer than max_seqlen 4"),
        (dict(mk=2), ValueError, "longer than max_seqlen 2"),
        (dict(cu_q=_cu(0, 8)), ValueError, "same number of sequences"),
        (dict(cu_q=_cu(0, 3, 8).reshape(1, 3)), ValueError, r"shape \(B \+ 1,\)"),
        (dict(mq=8.0), TypeError, "max_seqlen_q must be an int"),
        (dict(mk=-1), ValueError, "max_seqlen_k must be >= 0"),
        (dict(q=torch.randn(1, 8, 2, 16, device=DEVICE)), ValueError, "rank 3"),
        (dict(q=torch.randn(8, 3, 16, device=DEVICE)), ValueError, "multiple of key/value heads"),
        (dict(q=torch.randn(8, 2, 16, device=DEVICE, dtype=torch.float16)), TypeError, "one dtype"),
        (dict(softcap=-2.0), ValueError, "softcap"),
        (dict(sinks=torch.zeros(3, device=DEVICE)), ValueError, "sinks must have shape"),
        (dict(return_lse="yes"), TypeError, "return_lse"),
        (dict(backend="cuda"), ValueError, "backend"),
    ],
)
def test_bad_input(kwargs, error, words):
    with pytest.raises(error, match=words):
        _call(**kwargs)


def test_cuda_values_are_trusted_unless_the_debug_switch_is_on(monkeypatch):
    """The values are read (a sync on a device) on a CPU, or where the debug switch asks: the switch decides for
    CUDA (a meta tensor stands in for one here)."""
    seen = []

    class Stop(Exception):
        pass

    def spy(*args, check_values):
        seen.append(check_values)
        raise Stop

    monkeypatch.setattr(varlen, "check_varlen", spy)
    for device, switch in (("meta", False), ("meta", True), ("cpu", False)):
        monkeypatch.setattr(settings.current, "check_cu_seqlens", switch)
        q = torch.empty(8, 2, 16, device=device)
        cu = torch.tensor([0, 3, 8], dtype=torch.int32, device=device)
        with pytest.raises(Stop):
            flash_attention_varlen(q, q, q, cu, cu, 8, 8, causal=True)
    assert seen == [False, True, True]


@pytest.mark.parametrize("sinks", [True, False], ids=["sinks", "no-sinks"])
def test_compiles_without_graph_break(sinks):
    """Under torch.compile the Triton varlen path runs as two custom ops (fullgraph: no graph break), with the
    sinks' gradient and the lse."""
    q, k, v, cu_q, cu_k, mq, mk = packed([(5, 9), (0, 2), (11, 11)], 4, 2, 16)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    s = (torch.randn(4, device=DEVICE) * 2).requires_grad_() if sinks else None

    def f(q, k, v, s):
        out, lse = flash_attention_varlen(
            q, k, v, cu_q, cu_k, mq, mk, causal=True, softcap=2.0, sinks=s, return_lse=True, backend="triton"
        )
        return out.sin().sum() + lse.nan_to_num(0.0, 0.0, 0.0).sum().detach()

    compiled = torch.compile(f, fullgraph=True, backend="inductor" if DEVICE == "cuda" else "aot_eager")
    loss = compiled(q, k, v, s)
    loss.backward()
    leaves = [q, k, v] + ([s] if sinks else [])
    twins = [t.detach().clone().requires_grad_() for t in leaves]
    ref = f(*twins[:3], twins[3] if sinks else None)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for a, b in zip(leaves, twins):
        torch.testing.assert_close(a.grad, b.grad)
