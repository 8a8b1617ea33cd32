"""A few kernel launches for compute-sanitizer (GPU only; not collected by pytest):

    compute-sanitizer --tool memcheck python tests/kernels/sanitize_cases.py

Ragged sizes, head dims that need padding, grouped heads, Nq != Nk, dropout: the launches most likely
to read or write out of bounds.
"""

import torch

from kernels import flash_attention

CASES = [
    # (B, Hq, Hkv, Nq, Nk, D, dtype, dropout_p)
    (2, 4, 2, 97, 131, 40, torch.float16, 0.0),
    (1, 3, 1, 200, 70, 80, torch.bfloat16, 0.1),
    (1, 2, 2, 1, 300, 256, torch.float32, 0.0),
    (2, 2, 2, 333, 333, 1, torch.bfloat16, 0.2),
]

if __name__ == "__main__":
    for B, Hq, Hkv, Nq, Nk, D, dtype, p in CASES:
        q = torch.randn(B, Hq, Nq, D, device="cuda", dtype=dtype, requires_grad=True)
        k = torch.randn(B, Hkv, Nk, D, device="cuda", dtype=dtype, requires_grad=True)
        v = torch.randn(B, Hkv, Nk, D, device="cuda", dtype=dtype, requires_grad=True)
        out = flash_attention(q, k, v, causal=True, dropout_p=p)
        out.backward(torch.randn_like(out))
        torch.cuda.synchronize()
        print(f"ok {(B, Hq, Hkv, Nq, Nk, D, str(dtype), p)}")
