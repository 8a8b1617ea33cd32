"""Experiments that inform the kernels' config table (GPU): alternative tiles timed against the table's rows.

Each variant replaces one kernel's row (``kernels.flash_attn.forward(tile=...)`` / ``backward(tiles=...)``)
at one long causal shape and is timed against the current row in the same run; also the dropout bits'
two ways in the backward (``per_lane_bits``). Prints a table and writes JSON; changes nothing.

    python -m bench.tune --deadline 60 --json tune.json
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import measure, metadata, save_json
from kernels import configs
from kernels import flash_attn as fa

# (kernel, tile) pairs tried against the current row; BLOCK_M/BLOCK_N/warps/stages. "bwd" is the one-pass
# backward, "dq"/"dkdv" the deterministic one's two kernels.
VARIANTS = [
    ("fwd", dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)),
    ("fwd", dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)),
    ("fwd", dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=4)),
    ("bwd", dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=2)),
    ("bwd", dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=2)),
    ("bwd", dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=3)),
    ("bwd", dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=3)),
    ("dkdv", dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=3)),
    ("dq", dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3)),
]


def time_launchers(q, k, v, spec, *, tile=None, tiles=None, per_lane_bits=None) -> tuple[float, float]:
    """Median ms of the forward launcher, and of the backward launcher alone (on the forward's outputs)."""
    fwd = measure(lambda: fa.forward(q, k, v, spec, tile=tile), "cuda").ms
    o, lse, seed = fa.forward(q, k, v, spec, tile=tile)
    do = torch.randn_like(o)
    bwd = measure(
        lambda: fa.backward(do, q, k, v, o, lse, seed, spec, tiles=tiles, per_lane_bits=per_lane_bits), "cuda"
    )
    return fwd, bwd.ms


def configs_experiment(deadline: float, shapes) -> list[dict]:
    rows = []
    for B, H, N, D, p in shapes:
        q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        for one_pass in (False, True):
            spec = fa.Spec(True, p, D**-0.5)
            base_fwd, base_bwd = time_launchers(q, k, v, spec, one_pass=one_pass)
            path = "one-pass" if one_pass else "two-kernel"
            where = f"bf16 B{B} H{H} N{N} D{D} dropout {p}, {path} backward"
            print(f"\n{where}: table fwd {base_fwd:.3f} ms, bwd {base_bwd:.3f} ms")
            rows.append(dict(B=B, H=H, N=N, D=D, p=p, path=path, variant="table", fwd_ms=base_fwd, bwd_ms=base_bwd))
            for kernel, tile in VARIANTS:
                if time.perf_counter() > deadline:
                    print("  (deadline reached)")
                    return rows
                if kernel != "fwd" and (kernel in ("dq", "dkdv")) == one_pass:
                    continue  # a tile of the other backward path
                if kernel == "fwd" and one_pass:
                    continue  # the forward's tiles once, with the two-kernel path
                try:
                    f, b = time_launchers(
                        q, k, v, spec, one_pass=one_pass, tile=tile if kernel == "fwd" else None,
                        tiles={kernel: tile} if kernel != "fwd" else None,
                    )  # fmt: skip
                except Exception as err:  # a tile that does not compile (shared memory) is a result too
                    print(f"  {kernel:<5} {tile}: {type(err).__name__}: {str(err).splitlines()[0][:100]}")
                    rows.append(
                        dict(B=B, H=H, N=N, D=D, p=p, path=path, kernel=kernel, variant=tile, error=str(err)[:200])
                    )
                    continue
                gain = f"fwd {f:.3f} ms ({base_fwd / f:.2f}x), bwd {b:.3f} ms ({base_bwd / b:.2f}x)"
                print(f"  {kernel:<5} {tile}: {gain}")
                rows.append(dict(B=B, H=H, N=N, D=D, p=p, path=path, kernel=kernel, variant=tile, fwd_ms=f, bwd_ms=b))
    return rows


def dropout_bits_experiment() -> list[dict]:
    """The dK/dV kernels' dropout bits per lane (twice the Philox work, no exchange) or exchanged, by head dim."""
    rows = []
    for D, H in ((64, 12), (128, 16)):
        q, k, v = (torch.randn(8, H, 4096, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        for one_pass in (False, True):
            spec = fa.Spec(True, 0.1, D**-0.5)
            table = configs.block_d(D) <= configs.PER_LANE_BITS_MAX_BLOCK_D
            for per_lane in (True, False):
                _, b = time_launchers(q, k, v, spec, one_pass=one_pass, per_lane_bits=per_lane)
                path = "one-pass" if one_pass else "two-kernel"
                mark = " (table)" if per_lane == table else ""
                print(f"dropout 0.1 D{D} N4096 {path}: bits per lane {per_lane}{mark}: bwd {b:.3f} ms")
                rows.append(dict(D=D, N=4096, path=path, per_lane_bits=per_lane, table=per_lane == table, bwd_ms=b))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.tune")
    ap.add_argument("--deadline", type=float, default=120.0, help="seconds for the config experiments")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    shapes = [(8, 12, 4096, 64, 0.0), (8, 16, 4096, 128, 0.0)]
    meta = metadata("cuda")
    bits = dropout_bits_experiment()
    save_json(args.json, {"meta": meta, "dropout_bits": bits})
    tiles = configs_experiment(time.perf_counter() + args.deadline, shapes)
    save_json(args.json, {"meta": meta, "dropout_bits": bits, "configs": tiles})


if __name__ == "__main__":
    main()
