"""What dropout 0.1 costs over dropout 0, ours against PyTorch SDPA's own, forward and forward+backward (GPU).

The dropout issue's benchmark: at the book's GPT-2 shape (B 8, H 12, N 1024, D 64, bf16, causal) our
forward+backward with dropout 0.1 may cost at most 15% over dropout 0, and less than SDPA's own dropout
overhead measured in the same run. A longer sequence and head dim 128 are printed beside it. The
Philox grouping is chosen at import (CHAPTER3_FLASH_DROPOUT_GROUPS=mma|key-runs, and
CHAPTER3_FLASH_DKDV_PER_LANE_MAX_D for how dK/dV computes them), so compare variants by running this
module once per setting (bench/gpu_check.sh's dropout stage does).

    python -m bench.dropout_cost --json out.json
"""

from __future__ import annotations

import argparse
import json

import torch

import kernels.flash_attn as fa
from bench.common import fwd_and_fwd_bwd_ms, metadata
from bench.sweep import _sdpa, ours

SHAPES = [(8, 12, 1024, 64), (8, 12, 4096, 64), (8, 16, 4096, 128)]


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.dropout_cost")
    ap.add_argument("--p", type=float, default=0.1)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    rows = []
    per_lane = int(fa._DKDV_PER_LANE_MAX_D)
    print(
        f"dropout {args.p} over 0, causal bf16; Philox grouping {fa._DROPOUT_GROUPING!r}, "
        f"dK/dV bits per lane up to head dim {per_lane}"
    )
    for B, H, N, D in SHAPES:
        q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        impls = (("ours", ours), ("sdpa_flash", _sdpa("FLASH_ATTENTION")), ("sdpa_cudnn", _sdpa("CUDNN_ATTENTION")))
        for name, fn in impls:
            try:
                f0, fb0 = fwd_and_fwd_bwd_ms(fn, q, k, v, 0.0)
                f1, fb1 = fwd_and_fwd_bwd_ms(fn, q, k, v, args.p)
            except RuntimeError as err:  # a backend without dropout support on this build
                print(f"  B{B} H{H} N{N} D{D} {name:<11} unavailable: {str(err).splitlines()[0][:90]}")
                continue
            row = dict(B=B, H=H, N=N, D=D, impl=name, p=args.p, grouping=fa._DROPOUT_GROUPING,
                       dkdv_per_lane_max_d=per_lane, fwd_ms=[f0, f1], fwd_bwd_ms=[fb0, fb1])  # fmt: skip
            rows.append(row)
            print(
                f"  B{B} H{H} N{N} D{D} {name:<11} fwd {f0:.3f} -> {f1:.3f} ms ({f1 / f0 - 1:+.0%})  "
                f"fwd+bwd {fb0:.3f} -> {fb1:.3f} ms ({fb1 / fb0 - 1:+.0%})"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": metadata("cuda"), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
