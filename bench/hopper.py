"""Forward variants for Hopper: TMA loads and a persistent grid.

The pointer forward of ``kernels/flash_attn.py`` is the reference and the fallback. These variants load
q, k, v tiles with the tensor memory accelerator through device-side descriptors
(``tl.make_tensor_descriptor``: the hardware zero-fills past ``N`` and past the head dim, so ragged
tiles and padded head dims need no load masks, and clips the output's store the same way) and differ
in how the work is scheduled:

- ``"tma"``: the pointer kernel's grid, causal query tiles longest first;
- ``"tma_persistent"``: one program per SM walks all tiles in decreasing work, round-robin (a greedy
  longest-first schedule that evens out the causal tail and saves a block launch per tile).

Both walk the visible keys in one loop with the mask on every block (the pointer kernel masks the edge
blocks only). A third variant, automatic warp specialization (``tl.range(..., warp_specialize=True)``,
which Triton 3.6 did apply: 12 warps, setmaxnreg), measured 0.66-0.93x the pointer kernel (H100, run 3)
and gave wrong results on an H200 (run 4; bench/NOTES.md): removed.

None runs by default: the pointer kernel was faster at every shape measured (H100, run 3; ``bench/NOTES.md``).
``forward(..., variant=...)`` runs either for the benchmarks and tests. No dropout here (the pointer kernel
has it), and only tensors TMA can address (``supports``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from chapter3_flash.kernels import configs
from chapter3_flash.kernels.dropout import new_seed
from chapter3_flash.kernels.flash_attn import _LOG2E, INTERPRET, _cast, _flags, _precision, _tf32
from chapter3_flash.kernels.masks import _key_range, _visible

VARIANTS = ("pointer", "tma", "tma_persistent")


@triton.jit
def _fwd_tile(
    Q,
    K,
    V,
    Out,
    LSE,
    start_m,
    off_h,
    off_z,
    qk_scale,
    stride_qz,
    stride_qh,
    stride_qm,
    stride_kz,
    stride_kh,
    stride_kn,
    stride_vz,
    stride_vh,
    stride_vn,
    stride_oz,
    stride_oh,
    stride_om,
    H,
    GROUP,
    N_Q,
    N_K,
    left,
    right,
    head_dim,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_LEFT: tl.constexpr,
    MASK_RIGHT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    ROUND_TF32: tl.constexpr,
):
    """Query rows start_m * BLOCK_M + [0, BLOCK_M) of head off_h, batch off_z: one key/value loop."""
    z = off_z.to(tl.int64)
    h = off_h.to(tl.int64)
    hk = (off_h // GROUP).to(tl.int64)
    # Descriptors of this (batch, head)'s (N, D) planes; rows past N and columns past head_dim read as 0.
    q_desc = tl.make_tensor_descriptor(
        Q + z * stride_qz + h * stride_qh, shape=[N_Q, head_dim], strides=[stride_qm, 1], block_shape=[BLOCK_M, BLOCK_D]
    )
    k_desc = tl.make_tensor_descriptor(
        K + z * stride_kz + hk * stride_kh,
        shape=[N_K, head_dim],
        strides=[stride_kn, 1],
        block_shape=[BLOCK_N, BLOCK_D],
    )
    v_desc = tl.make_tensor_descriptor(
        V + z * stride_vz + hk * stride_vh,
        shape=[N_K, head_dim],
        strides=[stride_vn, 1],
        block_shape=[BLOCK_N, BLOCK_D],
    )
    o_desc = tl.make_tensor_descriptor(
        Out + z * stride_oz + h * stride_oh,
        shape=[N_Q, head_dim],
        strides=[stride_om, 1],
        block_shape=[BLOCK_M, BLOCK_D],
    )
    first_row = start_m * BLOCK_M
    q = q_desc.load([first_row, 0])
    if UPCAST:
        q = q.to(tl.float32)
    q = _tf32(q, ROUND_TF32)
    offs_m = first_row + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    diag, lo, full_lo, full_hi, hi = _key_range(
        first_row, N_Q, N_K, left, right, BLOCK_M, BLOCK_N, MASK_LEFT, MASK_RIGHT
    )
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        k = k_desc.load([start_n, 0])
        if UPCAST:
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
        cols = start_n + offs_n
        seen = _visible(offs_m[:, None], cols[None, :], N_K, diag, left, right, MASK_LEFT, MASK_RIGHT, True)
        qk = tl.where(seen, qk * qk_scale, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        m_sub = tl.where(m_ij == float("-inf"), 0.0, m_ij)  # a row with no key yet: exp2(-inf - 0) = 0
        p = tl.math.exp2(qk - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = v_desc.load([start_n, 0])
        if UPCAST:
            v = v.to(tl.float32)
        acc = tl.dot(_tf32(p.to(v.dtype), ROUND_TF32), v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
        m_i = m_ij
    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    tl.store(LSE + (off_z * H + off_h).to(tl.int64) * N_Q + offs_m, lse, mask=offs_m < N_Q)
    o_desc.store([first_row, 0], _cast(acc, Out.dtype.element_ty, UPCAST))


@triton.jit
def _attn_fwd_tma(
    Q,
    K,
    V,
    Out,
    LSE,
    qk_scale,
    stride_qz,
    stride_qh,
    stride_qm,
    stride_kz,
    stride_kh,
    stride_kn,
    stride_vz,
    stride_vh,
    stride_vn,
    stride_oz,
    stride_oh,
    stride_om,
    B,
    H,
    GROUP,
    N_Q,
    N_K,
    left,
    right,
    head_dim,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_LEFT: tl.constexpr,
    MASK_RIGHT: tl.constexpr,
    PERSISTENT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    ROUND_TF32: tl.constexpr,
):
    num_m = tl.cdiv(N_Q, BLOCK_M)
    if PERSISTENT:
        # Tile t: query tile num_m - 1 - t // (B * H) (the causal rows that see the most keys come first),
        # then (batch, head); program p takes t = p, p + P, p + 2P, ...
        for t in tl.range(tl.program_id(0), num_m * B * H, tl.num_programs(0)):
            bh = t % (B * H)
            _fwd_tile(
                Q, K, V, Out, LSE, num_m - 1 - t // (B * H), bh % H, bh // H, qk_scale,
                stride_qz, stride_qh, stride_qm, stride_kz, stride_kh, stride_kn, stride_vz, stride_vh, stride_vn,
                stride_oz, stride_oh, stride_om, H, GROUP, N_Q, N_K, left, right, head_dim,
                BLOCK_D, BLOCK_M, BLOCK_N, MASK_LEFT, MASK_RIGHT, INPUT_PRECISION, UPCAST, ROUND_TF32,
            )  # fmt: skip
    else:
        start_m = tl.program_id(0)
        if MASK_RIGHT:
            start_m = num_m - 1 - start_m
        _fwd_tile(
            Q, K, V, Out, LSE, start_m, tl.program_id(1), tl.program_id(2), qk_scale,
            stride_qz, stride_qh, stride_qm, stride_kz, stride_kh, stride_kn, stride_vz, stride_vh, stride_vn,
            stride_oz, stride_oh, stride_om, H, GROUP, N_Q, N_K, left, right, head_dim,
            BLOCK_D, BLOCK_M, BLOCK_N, MASK_LEFT, MASK_RIGHT, INPUT_PRECISION, UPCAST, ROUND_TF32,
        )  # fmt: skip


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec, variant: str) -> bool:
    """Whether TMA can address these tensors: rows contiguous, every other stride and every (batch, head)
    plane 16-byte aligned; no dropout."""
    if spec.dropout_p > 0 or q.shape[-1] > 256:
        return False
    o_like = q  # the output is allocated in q's layout
    for t in (q, k, v, o_like):
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(s * size % 16 for s in t.stride()[:-1]):
            return False
    return True


def _ensure_allocator() -> None:
    """Device-side descriptors need a little global scratch per program; PyTorch's allocator provides it.
    Set only where none is (Triton's allocator is a context variable: per thread)."""
    from triton.runtime import _allocation

    if _allocation._allocator.get() is _allocation._NULL_ALLOCATOR:
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


def _interpreter_allocator(size, alignment, stream):
    return torch.empty(size, dtype=torch.int8)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec, variant: str, tile: dict | None = None):
    """One of the TMA forwards (see the module docstring); returns ``(out, lse, seed)`` as flash_attn.forward."""
    if variant not in VARIANTS[1:]:
        raise ValueError(f"variant must be one of {VARIANTS[1:]}, got {variant!r}")
    B, H, N_Q, D = q.shape
    N_K = k.shape[2]
    o = torch.empty_like(q)
    lse = torch.empty((B, H, N_Q), dtype=torch.float32, device=q.device)
    flags = _flags(q, spec)
    flags.pop("DROPOUT")
    left, right = flags.pop("left"), flags.pop("right")
    cfg = tile or configs.select("fwd_tma", D, _precision(q), dropout=False, interpret=INTERPRET)
    if INTERPRET:
        triton.set_allocator(_interpreter_allocator)
    else:
        _ensure_allocator()
    num_m = configs.cdiv(N_Q, cfg["BLOCK_M"])
    persistent = variant == "tma_persistent"
    if persistent:
        # The interpreter's 4 make tests cross programs; an offline compile (bench/sm90.py) has no GPU: an H100's.
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4 if INTERPRET else 132
        grid = (min(num_m * H * B, sms),)
    else:
        grid = (num_m, H, B)
    _attn_fwd_tma[grid](
        q, k, v, o, lse, spec.softmax_scale * _LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        B, H, H // k.shape[1], N_Q, N_K, left, right,
        **flags, **cfg, PERSISTENT=persistent,
    )  # fmt: skip
    return o, lse, new_seed(q.device, 0.0)
