"""A few kernel launches for compute-sanitizer (GPU only; not collected by pytest):

    compute-sanitizer --tool memcheck python tests/kernels/sanitize_cases.py

Ragged sizes, head dims that need padding, grouped heads, Nq != Nk, dropout, windows, both backward paths,
softcap and sinks, the varlen kernels (ragged packed sequences, zero- and one-token sequences, Nq != Nk per
sequence) and the KV-cache decode kernel (ragged and zero lengths, left padding, splits, appends): the launches
most likely to read or write out of bounds.
"""

import torch
from chapter3_flash.kernels import flash_attention, flash_attention_varlen, flash_attention_with_kvcache

CASES = [
    # (B, Hq, Hkv, Nq, Nk, D, dtype, dropout_p, window, deterministic)
    (2, 4, 2, 97, 131, 40, torch.float16, 0.0, (-1, -1), False),
    (1, 3, 1, 200, 70, 80, torch.bfloat16, 0.1, (-1, -1), True),
    (1, 2, 2, 1, 300, 256, torch.float32, 0.0, (-1, -1), False),
    (2, 2, 2, 333, 333, 1, torch.bfloat16, 0.2, (-1, -1), False),
    (1, 4, 2, 300, 300, 64, torch.bfloat16, 0.0, (37, -1), False),
]

if __name__ == "__main__":
    for B, Hq, Hkv, Nq, Nk, D, dtype, p, window, det in CASES:
        q = torch.randn(B, Hq, Nq, D, device="cuda", dtype=dtype, requires_grad=True)
        k = torch.randn(B, Hkv, Nk, D, device="cuda", dtype=dtype, requires_grad=True)
        v = torch.randn(B, Hkv, Nk, D, device="cuda", dtype=dtype, requires_grad=True)
        out = flash_attention(q, k, v, causal=True, dropout_p=p, window_size=window, deterministic=det)
        out.backward(torch.randn_like(out))
        torch.cuda.synchronize()
        print(f"ok {(B, Hq, Hkv, Nq, Nk, D, str(dtype), p, window, det)}")
    with torch.no_grad():
        for B, T, lengths, splits in ((3, 97, [0, 40, 95], 3), (2, 513, [500, 7], 0)):
            q = torch.randn(B, 8, 1, 64, device="cuda", dtype=torch.bfloat16)
            k_cache = torch.randn(B, 2, T, 64, device="cuda", dtype=torch.bfloat16)
            v_cache = torch.randn_like(k_cache)
            new = torch.randn(B, 2, 1, 64, device="cuda", dtype=torch.bfloat16)
            seqlens = torch.tensor(lengths, device="cuda", dtype=torch.int32)
            flash_attention_with_kvcache(q, k_cache, v_cache, new, new, cache_seqlens=seqlens, num_splits=splits)
            torch.cuda.synchronize()
            print(f"ok decode {(B, T, lengths, splits)}")
        # Left-padded batches: keys leftpad[b] <= j < length[b]; a sequence whose padding fills its cache.
        for lengths, leftpad, splits in (([40, 95, 7], [0, 60, 7], 3), ([500, 3], [490, 0], 0)):
            B, T = len(lengths), max(lengths) + 2
            q = torch.randn(B, 8, 1, 64, device="cuda", dtype=torch.bfloat16)
            k_cache = torch.randn(B, 2, T, 64, device="cuda", dtype=torch.bfloat16)
            v_cache = torch.randn_like(k_cache)
            new = torch.randn(B, 2, 1, 64, device="cuda", dtype=torch.bfloat16)
            seqlens = torch.tensor(lengths, device="cuda", dtype=torch.int32)
            pad = torch.tensor(leftpad, device="cuda", dtype=torch.int32)
            flash_attention_with_kvcache(
                q, k_cache, v_cache, new, new, cache_seqlens=seqlens, cache_leftpad=pad, num_splits=splits, softcap=30.0
            )
            torch.cuda.synchronize()
            print(f"ok decode leftpad {(lengths, leftpad, splits)}")
    # Packed sequences, forward and backward: zero- and one-token sequences, more keys than queries in some.
    for lens_q, lens_k, D, window in (([0, 1, 130, 77, 0, 300], [0, 5, 130, 200, 3, 300], 64, (-1, -1)),
                                      ([513, 1, 64], [513, 1, 64], 128, (31, -1))):  # fmt: skip
        cu_q = torch.tensor([0] + lens_q, device="cuda").cumsum(0).to(torch.int32)
        cu_k = torch.tensor([0] + lens_k, device="cuda").cumsum(0).to(torch.int32)
        q = torch.randn(sum(lens_q), 4, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(sum(lens_k), 2, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn_like(k, requires_grad=True)
        sinks = torch.randn(4, device="cuda", requires_grad=True)
        out = flash_attention_varlen(
            q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=True, window_size=window, dropout_p=0.1, sinks=sinks
        )
        out.backward(torch.randn_like(out))
        torch.cuda.synchronize()
        print(f"ok varlen {(lens_q, lens_k, D, window)}")
