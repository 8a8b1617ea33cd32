"""Experiments that inform the kernels' config table (GPU): alternative tiles timed against the table's rows.

Each experiment is one shape and one attention (causal, or a sliding window); each variant replaces one
kernel's row (``kernels.flash_attn.forward(tile=...)`` / ``backward(tiles=...)``) and is timed against
the table's row in the same run, so a ratio above 1 is a faster tile on this card. In order: the sliding
window (its loops are a few blocks long, unlike the shapes the table was tuned on), the forward at head
dims 64 and 128, the backward's kernels, then the dK/dV kernels' two ways of making dropout bits. Prints a
table and writes JSON after every row; changes nothing.

    python -m bench.tune --deadline 60 --json tune.json
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from chapter3_flash.kernels import configs
from chapter3_flash.kernels import flash_attn as fa

from bench.common import measure, metadata, save_json, smoke_mode

T = dict  # BLOCK_M, BLOCK_N, num_warps, num_stages

# (title, (B, H, N, D), window (left, right), [(kernel, tile), ...]). "fwd" the forward; "dq" / "dkdv" the
# two-kernel backward (the default); "bwd" the one-pass backward (with dropout on short sequences).
EXPERIMENTS = [
    (
        "window 512",
        (2, 16, 16384, 128),
        (511, 0),
        [
            ("fwd", T(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)),  # the table's row before run 5
            ("fwd", T(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)),
            ("fwd", T(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3)),
            ("dq", T(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)),
            ("dq", T(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3)),
            ("dkdv", T(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)),
            ("dkdv", T(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=3)),
            ("bwd", T(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=3)),  # the one pass at its table tile
        ],
    ),
    (
        "window 2048",
        (2, 16, 16384, 128),
        (2047, 0),
        [("fwd", T(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3))],
    ),
    (
        "window 512 D64",
        (2, 16, 16384, 64),
        (511, 0),
        [
            ("fwd", T(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)),
            ("fwd", T(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3)),
            ("fwd", T(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)),
        ],
    ),
    (
        "window 512 D256",
        (2, 16, 16384, 256),
        (511, 0),
        [
            ("fwd", T(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)),
            ("fwd", T(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2)),
            ("fwd", T(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)),
        ],
    ),
    (
        # Gemma 3's head dim: every backward tile spills (bench/NOTES.md, static). The table runs the one pass
        # here; "dq" / "dkdv" variants run the two kernels, "bwd" variants the one pass.
        "backward D256 window 512",
        (2, 16, 4096, 256),
        (511, 0),
        [
            ("bwd", T(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=2)),
            ("dkdv", T(BLOCK_M=16, BLOCK_N=64, num_warps=8, num_stages=2)),  # the two kernels at the table's tiles
            ("dq", T(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2)),
            ("dkdv", T(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2)),
            ("dkdv", T(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=2)),
        ],
    ),
    (
        "forward D64",
        (8, 12, 4096, 64),
        (-1, 0),
        [
            ("fwd", T(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)),
            ("fwd", T(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4)),
            ("fwd", T(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)),
            ("fwd", T(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2)),
        ],
    ),
    (
        "forward D128",
        (8, 16, 4096, 128),
        (-1, 0),
        [
            ("fwd", T(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2)),
            ("fwd", T(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4)),
            ("fwd", T(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)),
            ("fwd", T(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=4)),
        ],
    ),
    (
        "backward D64",
        (8, 12, 4096, 64),
        (-1, 0),
        [
            ("dq", T(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2)),
            ("dq", T(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)),
            ("dkdv", T(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=3)),
            ("dkdv", T(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=3)),
        ],
    ),
    (
        "backward D128",
        (8, 16, 4096, 128),
        (-1, 0),
        [
            ("dq", T(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3)),
            ("dq", T(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=3)),
            ("dkdv", T(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=3)),
            ("dkdv", T(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=3)),
        ],
    ),
]
SMOKE_EXPERIMENTS = [
    ("smoke", (1, 2, 64, 16), (-1, 0), [("fwd", T(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1))]),
    (
        "smoke window",
        (1, 2, 64, 16),
        (20, 0),
        [
            ("dq", T(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)),
            ("dkdv", T(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1)),
        ],
    ),
]


def run_launchers(q, k, v, spec, *, tile=None, tiles=None, per_lane_bits=None, one_pass=None):
    """The forward launcher's output and the backward launcher's gradients for a fixed dO (seeded)."""
    o, lse, seed = fa.forward(q, k, v, spec, tile=tile)
    do = torch.randn(o.shape, generator=torch.Generator(o.device).manual_seed(0), device=o.device, dtype=o.dtype)
    grads = fa.backward(do, q, k, v, o, lse, seed, spec, tiles=tiles, per_lane_bits=per_lane_bits, one_pass=one_pass)
    return (o, *grads), (o, lse, seed, do)


def time_launchers(q, k, v, spec, device, *, tile=None, tiles=None, per_lane_bits=None, one_pass=None):
    """Median ms of the forward launcher and of the backward launcher alone (on the forward's outputs), and
    the results (out, dq, dk, dv) to compare between tiles."""
    fwd = measure(lambda: fa.forward(q, k, v, spec, tile=tile), device).ms
    results, (o, lse, seed, do) = run_launchers(
        q, k, v, spec, tile=tile, tiles=tiles, per_lane_bits=per_lane_bits, one_pass=one_pass
    )

    def bwd():
        fa.backward(do, q, k, v, o, lse, seed, spec, tiles=tiles, per_lane_bits=per_lane_bits, one_pass=one_pass)

    return fwd, measure(bwd, device).ms, results


def max_diff(a, b) -> float:
    """Largest difference of (out, dq, dk, dv) between two tiles, relative to the largest magnitude."""
    return max(
        ((x.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-30)).item() for x, y in zip(a, b)
    )


def configs_experiment(device: str, experiments, deadline: float, on_row) -> list[dict]:
    """Each experiment's table row, then each variant; stops at the deadline (rows so far are kept)."""
    rows = []
    for title, (B, H, N, D), (left, right), variants in experiments:
        if time.perf_counter() > deadline:
            print(f"(deadline reached before {title})")
            break
        q, k, v = (torch.randn(B, H, N, D, device=device, dtype=torch.bfloat16) for _ in range(3))
        spec = fa.Spec(True, 0.0, D**-0.5, left, right)
        where = dict(experiment=title, B=B, H=H, N=N, D=D, window=[left, right])
        base_fwd, base_bwd, reference = time_launchers(q, k, v, spec, device)
        shape = f"bf16 B{B} H{H} N{N} D{D} window {left, right}"
        print(f"\n{title}: {shape}: table fwd {base_fwd:.3f} ms, bwd {base_bwd:.3f} ms")
        rows.append(dict(where, variant="table", fwd_ms=base_fwd, bwd_ms=base_bwd))
        on_row(rows)
        for kernel, tile in variants:
            if time.perf_counter() > deadline:
                print("  (deadline reached)")
                return rows
            chosen = dict(tile=tile) if kernel == "fwd" else dict(tiles={kernel: tile}, one_pass=kernel == "bwd")
            try:
                f, b, results = time_launchers(q, k, v, spec, device, **chosen)
                diff = max_diff(results, reference)
            except Exception as err:  # a tile that does not compile (shared memory) is a result too
                print(f"  {kernel:<5} {tile}: {type(err).__name__}: {str(err).splitlines()[0][:100]}")
                rows.append(dict(where, kernel=kernel, variant=tile, error=str(err)[:200]))
                continue
            # The ratio that matters: the forward's for a forward tile, the backward's for a backward one.
            gain = base_fwd / f if kernel == "fwd" else base_bwd / b
            print(f"  {kernel:<5} {tile}: fwd {f:.3f} ms, bwd {b:.3f} ms: {gain:.2f}x the table's (diff {diff:.1e})")
            rows.append(dict(where, kernel=kernel, variant=tile, fwd_ms=f, bwd_ms=b, speedup=gain, max_rel_diff=diff))
            on_row(rows)
    return rows


def dropout_bits_experiment(device: str, shapes) -> list[dict]:
    """The dK/dV kernels' dropout bits per lane (twice the Philox work, no exchange) or exchanged, by head dim."""
    rows = []
    for B, H, N, D in shapes:
        q, k, v = (torch.randn(B, H, N, D, device=device, dtype=torch.bfloat16) for _ in range(3))
        spec = fa.Spec(True, 0.1, D**-0.5)
        table = configs.block_d(D) <= configs.PER_LANE_BITS_MAX_BLOCK_D
        for one_pass in (False, True):
            for per_lane in (True, False):
                _, b, _ = time_launchers(q, k, v, spec, device, per_lane_bits=per_lane, one_pass=one_pass)
                path = "one-pass" if one_pass else "two-kernel"
                mark = " (table)" if per_lane == table else ""
                print(f"dropout 0.1 D{D} N{N} {path}: bits per lane {per_lane}{mark}: bwd {b:.3f} ms")
                rows.append(dict(D=D, N=N, path=path, per_lane_bits=per_lane, table=per_lane == table, bwd_ms=b))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.tune")
    ap.add_argument("--deadline", type=float, default=120.0, help="seconds for the config experiments")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on whatever device is here (a code check)")
    ap.add_argument("--only", help="experiments whose title starts with this (e.g. 'window')")
    ap.add_argument("--no-bits", action="store_true", help="skip the dropout bits experiment")
    args = ap.parse_args(argv)
    if args.smoke:
        smoke_mode()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = {"meta": metadata(device), "configs": [], "dropout_bits": []}

    def on_row(rows):
        result["configs"] = list(rows)
        save_json(args.json, result)

    experiments = SMOKE_EXPERIMENTS if args.smoke else EXPERIMENTS
    if args.only:
        experiments = [e for e in experiments if e[0].startswith(args.only)]
    result["configs"] = configs_experiment(device, experiments, time.perf_counter() + args.deadline, on_row)
    save_json(args.json, result)
    if not args.no_bits:
        bits_shapes = [(1, 2, 64, 16)] if args.smoke else [(8, 12, 4096, 64), (8, 16, 4096, 128)]
        result["dropout_bits"] = dropout_bits_experiment(device, bits_shapes)
        save_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
