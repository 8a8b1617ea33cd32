"""The front door: every check a public entry point makes before any work and any write.

``flash_attention``, ``flash_attention_with_kvcache`` and the functions built on them call these first, so a
refused call raises a ``TypeError`` / ``ValueError`` naming the values and leaves every tensor as it was. What is
checked, and why:

- types, ranks, dtypes (``DTYPES``), devices and shapes of the tensors;
- the options (``causal``, ``softmax_scale``, ``window_size``, ``dropout_p``, ``deterministic``, ``backend`` from
  ``BACKENDS``); integers must fit the kernels' int32 arithmetic (``MAX_INT``), so ``window_size=(2**70, -1)`` is a
  ``ValueError`` and not an ``OverflowError`` from deep inside a launch;
- a KV cache the call writes: no stride-0 (expanded) dimension, no overlap between the two caches or between a
  cache and the call's q, k, v (the append would read what it writes, or write one row twice), and no inference
  tensor outside inference mode (PyTorch forbids that in-place write; the Triton path would do it silently);
- the cache lengths against the cache (one device-to-host read for a tensor, skipped during CUDA graph capture).

Under autocast the tensors are checked as given, before the cast to autocast's dtype (``autocast_dtype``).
"""

from __future__ import annotations

import math

import torch

BACKENDS = ("auto", "triton", "sdpa", "torch")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_INT = 2**31 - 1  # the kernels' sizes, lengths and window bounds are int32
MAX_GRID_YZ = 65535  # CUDA's limit on launch grid dims y and z
_DTYPE_NAMES = "float16, bfloat16, float32"
# Coefficient choices tried by tensors_overlap before it calls a layout too irregular to decide an overlap.
_OVERLAP_BUDGET = 4096


# ----------------------------------------------------------------------------------------------
# Scalars and options
# ----------------------------------------------------------------------------------------------


def check_int(name: str, value, *, low: int = 0, high: int = MAX_INT) -> int:
    """An int (not a bool) in [low, high]: a TypeError / ValueError naming it otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if value > high:
        raise ValueError(f"{name} must be at most {high} (the kernels' int32 range), got {value}")
    return int(value)


def check_options(causal, softmax_scale, window_size, backend) -> tuple[int, int]:
    """The options every attention function shares; returns the window as two ints."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if softmax_scale is not None:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
            raise TypeError(f"softmax_scale must be a float or None, got {softmax_scale!r}")
        if not math.isfinite(softmax_scale):
            raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"window_size must be a pair (left, right) of ints, got {window_size!r}")
    window = tuple(check_int(f"window_size {side}", w, low=-1) for side, w in zip(("left", "right"), window_size))
    check_backend(backend)
    return window


def check_backend(backend) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_dropout(dropout_p) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float, got {dropout_p!r}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    return float(dropout_p)


def check_deterministic(deterministic) -> bool:
    """None follows ``torch.are_deterministic_algorithms_enabled()``."""
    if deterministic is None:
        return torch.are_deterministic_algorithms_enabled()
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool or None, got {deterministic!r}")
    return deterministic


def autocast_dtype(t) -> torch.dtype | None:
    """The dtype autocast runs attention in on ``t``'s device, or None outside autocast (and on devices autocast
    does not know, such as meta)."""
    if not isinstance(t, torch.Tensor) or t.device.type == "meta":
        return None
    try:
        enabled = torch.is_autocast_enabled(t.device.type)
    except RuntimeError:  # a device type autocast has no state for
        return None
    return torch.get_autocast_dtype(t.device.type) if enabled else None


# ----------------------------------------------------------------------------------------------
# Tensors
# ----------------------------------------------------------------------------------------------


def check_tensor(name: str, t, *, rank: int | None = None, layout: str = "(B, H, N, D)") -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if rank is not None and t.dim() != rank:
        raise ValueError(f"{name} must have rank {rank} {layout}, got shape {tuple(t.shape)}")
    if t.dtype not in DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: {_DTYPE_NAMES}")


def check_same(named: dict) -> None:
    """One dtype and one device for all the given tensors (None entries skipped)."""
    (first, ref), *rest = ((n, t) for n, t in named.items() if t is not None)
    for name, t in rest:
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} is {t.dtype} and {first} is {ref.dtype}: one dtype for all of {', '.join(named)}")
    for name, t in rest:
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} and {first} on {ref.device}: one device for {', '.join(named)}")


def check_heads(hq: int, hkv: int) -> None:
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"query heads {hq} must be a multiple of key/value heads {hkv}")


def check_head_dims(q, k) -> None:
    """Head dims (the last dimension) equal and at least 1, head counts (dimension 1) grouped: (B, H, N, D) and
    packed (total, H, D) tensors alike."""
    D, Dk = q.shape[-1], k.shape[-1]
    if D != Dk:
        raise ValueError(f"head_dim {D} of q does not match {Dk} of k")
    if D == 0:
        raise ValueError(f"head_dim must be at least 1, got shapes q {tuple(q.shape)}, k {tuple(k.shape)}")
    check_heads(q.shape[1], k.shape[1])


def check_qkv(q, k, v) -> None:
    """Types, ranks, dtypes, devices and shapes of q, k, v: a TypeError / ValueError naming the values."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, rank=4)
    check_same({"q": q, "k": k, "v": v})
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"batch {q.shape[0]} of q does not match batch {k.shape[0]} of k and v")
    check_head_dims(q, k)


# ----------------------------------------------------------------------------------------------
# What a call writes: caches
# ----------------------------------------------------------------------------------------------


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last] element offsets ``t`` spans in its storage."""
    lo = hi = t.storage_offset()
    for n, stride in zip(t.shape, t.stride()):
        if n > 1:
            reach = (n - 1) * stride
            lo, hi = (lo + reach, hi) if reach < 0 else (lo, hi + reach)
    return lo, hi


def tensors_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether some element of ``a`` and some element of ``b`` share memory. Exact for the layouts tensors have in
    practice (views of one buffer interleaved by strides, such as a packed ``(B, T, 2, H, D)`` cache's k and v
    halves, do not overlap); a layout too irregular to decide within a small search counts as overlapping.

    Tensors of different storages (the usual case) do not overlap. In one storage, an element of ``a`` sits at
    ``sum_d i_d * s_d`` past a's first, one of ``b`` at ``delta + sum_e j_e * t_e``, ``0 <= i_d < n_d``: they
    meet when the terms solve ``sum_d i_d s_d - sum_e j_e t_e = delta``. Terms of one stride merge into one
    coefficient range (a's and b's same-strided dims: ``i - j``), and the bounded equation is searched largest
    stride first, each coefficient limited to what the smaller terms can still make up."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device or _storage(a) != _storage(b):
        return False
    return _elements_meet(a, b)


def _elements_meet(a: torch.Tensor, b: torch.Tensor) -> bool:
    """tensors_overlap's search, for two non-empty tensors of one storage."""
    if a.element_size() != b.element_size():  # one memory seen as two dtypes: compare byte spans
        (lo_a, hi_a), (lo_b, hi_b) = _span(a), _span(b)
        sa, sb = a.element_size(), b.element_size()
        return lo_a * sa <= hi_b * sb + sb - 1 and lo_b * sb <= hi_a * sa + sa - 1
    (lo_a, hi_a), (lo_b, hi_b) = _span(a), _span(b)
    if hi_a < lo_b or hi_b < lo_a:
        return False
    # Coefficient range per stride (in elements): a's dims add [0, n - 1], b's subtract them.
    ranges: dict[int, list[int]] = {}
    for sign, t in ((1, a), (-1, b)):
        for n, s in zip(t.shape, t.stride()):
            if n > 1 and s != 0:
                c_lo, c_hi = (0, n - 1) if (s > 0) == (sign > 0) else (-(n - 1), 0)
                cur = ranges.setdefault(abs(s), [0, 0])
                cur[0] += c_lo
                cur[1] += c_hi
    terms = sorted(((s, lo, hi) for s, (lo, hi) in ranges.items()), reverse=True)
    # reach[i]: (min, max) of what terms i.. can add.
    reach = [(0, 0)] * (len(terms) + 1)
    for i in range(len(terms) - 1, -1, -1):
        s, c_lo, c_hi = terms[i]
        lo, hi = reach[i + 1]
        reach[i] = (lo + c_lo * s, hi + c_hi * s)
    budget = [_OVERLAP_BUDGET]

    def search(i: int, target: int) -> bool:
        lo, hi = reach[i]
        if not lo <= target <= hi:
            return False
        if i == len(terms):
            return target == 0
        budget[0] -= 1
        if budget[0] < 0:
            return True  # undecided: treated as overlapping
        s, c_lo, c_hi = terms[i]
        rest_lo, rest_hi = reach[i + 1]
        # c * s within [target - rest_hi, target - rest_lo], s > 0
        first, last = max(c_lo, -((rest_hi - target) // s)), min(c_hi, (target - rest_lo) // s)
        return any(search(i + 1, target - c * s) for c in range(first, last + 1))

    return search(0, b.storage_offset() - a.storage_offset())


def _check_writable(name: str, t: torch.Tensor) -> None:
    strides = t.stride()
    for dim, (size, stride) in enumerate(zip(t.shape, strides) if 0 in strides else ()):
        if size > 1 and stride == 0:
            raise ValueError(
                f"{name} has stride 0 in dim {dim} (shape {tuple(t.shape)}, strides {t.stride()}): an expanded "
                f"tensor shares one row between {size} entries, so writing one entry's keys would write them all; "
                f"pass {name}.contiguous() or a cache of its own per entry"
            )
    if not t.is_contiguous() and torch._debug_has_internal_overlap(t) == 1:
        raise ValueError(f"{name} (shape {tuple(t.shape)}, strides {t.stride()}) has elements that share memory")
    if t.is_inference() and not torch.is_inference_mode_enabled():
        raise ValueError(
            f"{name} is an inference tensor (made under torch.inference_mode()) and cannot be written outside "
            "inference mode: call under torch.inference_mode(), or allocate the cache outside it"
        )


def check_cache_writes(caches: dict, others: dict) -> None:
    """The caches a call writes: each writable (no stride 0, no internal overlap, no inference tensor outside
    inference mode), no two overlapping, and none overlapping the call's other tensors (q, k, v)."""
    for name, t in caches.items():
        _check_writable(name, t)
    # Each tensor's storage once: separate allocations (the usual case) are told apart by these alone.
    storages = {name: _storage(t) for name, t in {**caches, **others}.items() if t is not None and t.numel()}

    def overlap(x: str, y: str, tensors: dict) -> bool:
        if x not in storages or y not in storages or storages[x] != storages[y]:
            return False
        return caches[x].device == tensors[y].device and _elements_meet(caches[x], tensors[y])

    names = list(caches)
    for i, name in enumerate(names):
        for other in names[i + 1 :]:
            if overlap(name, other, caches):
                raise ValueError(
                    f"{name} and {other} share memory: the keys and values would be written over each other; "
                    "pass two separate caches (or two non-overlapping views of one buffer)"
                )
        for other, t in others.items():
            if t is not None and overlap(name, other, others):
                raise ValueError(
                    f"{other} shares memory with {name}, which this call writes: {other} would change while it "
                    f"is read; pass {other}.clone()"
                )


def check_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, num_splits, backend) -> None:
    """flash_attention_with_kvcache's arguments, the cache writes included."""
    check_tensor("q", q, rank=4)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, t, rank=4)
    if (k is None) != (v is None):
        raise ValueError("pass both k and v (the step's new keys and values) or neither")
    for name, t in (("k", k), ("v", v)):
        if t is not None:
            check_tensor(name, t, rank=4)
    check_same({"q": q, "k_cache": k_cache, "v_cache": v_cache, "k": k, "v": v})
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ in shape")
    B, H, _, D = q.shape
    Bc, H_KV, _, Dc = k_cache.shape
    if B != Bc or D != Dc:
        raise ValueError(f"q {tuple(q.shape)} and k_cache {tuple(k_cache.shape)} differ in batch or head_dim")
    if D == 0:
        raise ValueError("head_dim must be at least 1")
    check_heads(H, H_KV)
    if k is not None and (k.shape != v.shape or k.shape[0] != B or k.shape[1] != H_KV or k.shape[3] != D):
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must both be (B={B}, Hkv={H_KV}, N_new, D={D})")
    if isinstance(cache_seqlens, bool) or not isinstance(cache_seqlens, (int, torch.Tensor)):
        raise TypeError(f"cache_seqlens must be an int or an int32/int64 tensor of shape (B,), got {cache_seqlens!r}")
    if isinstance(cache_seqlens, torch.Tensor):
        _check_per_sequence("cache_seqlens", cache_seqlens, q)
    else:
        check_int("cache_seqlens", cache_seqlens)
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0 (0: choose), got {num_splits!r}")
    check_backend(backend)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k_cache, v_cache, k, v)):
        raise ValueError(
            "flash_attention_with_kvcache is forward only (generation): call it under torch.no_grad() or "
            "torch.inference_mode(), or use flash_attention for training"
        )
    if k is not None and k.shape[2] > 0 and B > 0:
        check_cache_writes({"k_cache": k_cache, "v_cache": v_cache}, {"q": q, "k": k, "v": v})


def _check_per_sequence(name: str, t: torch.Tensor, q) -> None:
    """A ``(B,)`` int32/int64 tensor of one value per sequence, on q's device."""
    B = q.shape[0]
    if t.dtype not in (torch.int32, torch.int64) or t.shape != (B,):
        raise TypeError(f"{name} must be an int32/int64 tensor of shape ({B},), got {t.dtype} {tuple(t.shape)}")
    if t.device != q.device:
        raise ValueError(f"{name} is on {t.device}, q on {q.device}")


def check_cache_lengths(cache_seqlens, n_new: int, t_max: int) -> int:
    """The longest sequence after the step; raises if any would run past the cache. A tensor costs one
    device-to-host read, skipped while a CUDA graph is being captured (the caller vouches for the lengths)."""
    if isinstance(cache_seqlens, int):
        lengths_min = lengths_max = cache_seqlens
    elif cache_seqlens.is_cuda and torch.cuda.is_current_stream_capturing():
        return t_max
    elif cache_seqlens.device.type == "meta":
        return t_max
    else:
        lengths_min, lengths_max = (int(x) for x in torch.aminmax(cache_seqlens)) if cache_seqlens.numel() else (0, 0)
    if lengths_min < 0:
        raise ValueError(f"cache_seqlens must be >= 0, got a minimum of {lengths_min}")
    if lengths_max + n_new > t_max:
        raise ValueError(
            f"writing {n_new} new key(s) after cache_seqlens {lengths_max} runs past the cache's {t_max} positions"
        )
    return lengths_max + n_new


# ----------------------------------------------------------------------------------------------
# Softcap, sinks, the lse flag; packed (varlen) batches; left-padded caches (issue 26)
# ----------------------------------------------------------------------------------------------


def check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def check_softcap(softcap) -> float:
    """softcap: a finite float >= 0 (0: no cap); returns it as a float."""
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap must be a float (0.0: no cap), got {softcap!r}")
    if not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap must be a finite float >= 0 (0.0: no cap), got {softcap}")
    return float(softcap)


def check_sinks(sinks, q_heads: int, device) -> None:
    """sinks: None or a floating tensor (Hq,) on the inputs' device, one logit per query head."""
    if sinks is None:
        return
    if not isinstance(sinks, torch.Tensor):
        raise TypeError(f"sinks must be a torch.Tensor of shape ({q_heads},) or None, got {type(sinks).__name__}")
    if sinks.dtype not in DTYPES:
        raise TypeError(f"sinks has dtype {sinks.dtype}; supported: {_DTYPE_NAMES}")
    if sinks.shape != (q_heads,):
        raise ValueError(
            f"sinks must have shape (Hq,) = ({q_heads},), one logit per query head, got {tuple(sinks.shape)}"
        )
    if sinks.device != device:
        raise ValueError(f"sinks is on {sinks.device}, q on {device}")


def check_varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, check_values: bool
) -> tuple[list[int], list[int]] | None:
    """flash_attention_varlen's tensors: everything that costs no device sync (kernels/varlen.py says what is
    trusted), and the values of ``cu_seqlens`` when ``check_values`` (on the host: free for CPU tensors), which
    it then returns, read: ``(starts_q, starts_k)``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must have rank 3 (total_tokens, heads, head_dim), got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    # The dense checks' dtypes, devices, head dims and head counts, in the same words.
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
    check_same({"q": q, "k": k, "v": v})
    check_head_dims(q, k)
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor):
            raise TypeError(f"{name} must be an int32 torch.Tensor of shape (B + 1,), got {type(cu).__name__}")
        if cu.dtype != torch.int32:
            raise TypeError(f"{name} must have dtype torch.int32 (FlashAttention's), got {cu.dtype}")
        if cu.dim() != 1 or cu.numel() < 1:
            raise ValueError(f"{name} must have shape (B + 1,) with B >= 0, got {tuple(cu.shape)}")
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device}, q on {q.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"cu_seqlens_q {tuple(cu_seqlens_q.shape)} and cu_seqlens_k {tuple(cu_seqlens_k.shape)} must describe "
            "the same number of sequences"
        )
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(m, bool) or not isinstance(m, int):
            raise TypeError(f"{name} must be an int, got {m!r}")
        if not 0 <= m <= MAX_INT:
            raise ValueError(f"{name} must be >= 0 (and at most {MAX_INT}), got {m}")
    if not check_values:
        return None
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    check_cu_seqlens_values("cu_seqlens_q", starts_q, q.shape[0], max_seqlen_q)
    check_cu_seqlens_values("cu_seqlens_k", starts_k, k.shape[0], max_seqlen_k)
    return starts_q, starts_k


def check_cu_seqlens_values(name: str, values: list[int], total: int, max_seqlen: int) -> None:
    """A ValueError naming the values unless ``values`` (a ``cu_seqlens`` read on the host) starts at 0, never
    decreases, ends at ``total`` and holds no sequence longer than ``max_seqlen``."""
    if values[0] != 0:
        raise ValueError(f"{name} must start at 0, got {values[0]} ({name} = {values})")
    lengths = [b - a for a, b in zip(values, values[1:])]
    if any(n < 0 for n in lengths):
        i = next(i for i, n in enumerate(lengths) if n < 0)
        raise ValueError(f"{name} must not decrease: {values[i]} then {values[i + 1]} at sequence {i}")
    if values[-1] != total:
        raise ValueError(f"{name} must end at the token count {total}, got {values[-1]}")
    longest = max(lengths, default=0)
    if longest > max_seqlen:
        raise ValueError(f"{name} holds a sequence of {longest} tokens, longer than max_seqlen {max_seqlen}")


def check_leftpad(cache_leftpad, cache_seqlens, n_new: int, q) -> None:
    """flash_attention_with_kvcache's ``cache_leftpad``: type, shape and device; its values against the lengths
    where both are on the host (on CUDA they are trusted, as FlashAttention-2 trusts them)."""
    if cache_leftpad is None:
        return
    B = q.shape[0]
    if not isinstance(cache_leftpad, torch.Tensor):
        raise TypeError(f"cache_leftpad must be an int32/int64 tensor of shape ({B},) or None, got {cache_leftpad!r}")
    _check_per_sequence("cache_leftpad", cache_leftpad, q)
    if cache_leftpad.device.type == "cpu" and (isinstance(cache_seqlens, int) or cache_seqlens.device.type == "cpu"):
        pads = cache_leftpad.tolist()
        lengths = [cache_seqlens] * B if isinstance(cache_seqlens, int) else cache_seqlens.tolist()
        for b, (pad, n) in enumerate(zip(pads, lengths)):
            if not 0 <= pad <= n + n_new:
                raise ValueError(f"cache_leftpad[{b}] = {pad} must be in [0, cache_seqlens[{b}] + N_new = {n + n_new}]")
