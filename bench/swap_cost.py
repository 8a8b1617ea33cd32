"""What ``swap_attention``'s verification costs: the swap of a 28-layer Qwen3-0.6B-sized model, with and without
the probe that checks each layer's fused forward against its own.

The model: 28 of the book's Qwen3 blocks (emb 1024, 16 heads, 8 KV groups, head dim 128, hidden 3072, QK-norm),
float32, on the CPU unless ``--device`` says otherwise; the vocabulary plays no part in the swap and is left out.
Each repeat swaps the same model (its layers' classes are put back between repeats); the median is printed.

    python -m bench.swap_cost [--repeats 5] [--layers 28] [--device cpu] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from bench.book import qwen3 as book_qwen3
from bench.common import metadata, save_json, sync
from chapter3_flash import attention

CFG = {**book_qwen3.QWEN3_06B_SHAPE, "n_layers": 28, "qk_norm": True, "dtype": torch.float32}


def build(device: str, n_layers: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.ModuleList([book_qwen3.TransformerBlock(CFG) for _ in range(n_layers)]).to(device)


def swap_ms(model: nn.Module, verify: bool, device: str) -> float:
    classes = {name: type(m) for name, m in model.named_modules()}
    sync(device)
    start = time.perf_counter()
    attention.swap_attention(model, verify=verify)
    sync(device)
    elapsed = (time.perf_counter() - start) * 1e3
    assert len(attention.fused_layers(model)) == len(model)
    for name, m in model.named_modules():  # back to the book's classes for the next repeat
        m.__class__ = classes[name]
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.swap_cost")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layers", type=int, default=CFG["n_layers"], help="fewer for a quick check of this script")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own choice)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args.device, args.layers)
    swap_ms(model, True, args.device)  # warm-up: first calls of the kernels and allocator
    rows = []
    for verify in (False, True):
        times = [swap_ms(model, verify, args.device) for _ in range(args.repeats)]
        ms = statistics.median(times)
        per_layer = ms / args.layers
        rows.append({"verify": verify, "layers": args.layers, "ms": ms, "ms_per_layer": per_layer, "all_ms": times})
        print(f"verify={verify!s:5}  swap {ms:8.1f} ms  ({per_layer:.2f} ms per layer), median of {args.repeats}")
    print(f"torch threads: {torch.get_num_threads()}")
    config = {k: str(v) for k, v in CFG.items()}
    meta = {**metadata(args.device), "threads": torch.get_num_threads()}
    save_json(args.json, {"meta": meta, "config": config, "rows": rows})


if __name__ == "__main__":
    main()
