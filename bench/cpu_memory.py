"""Peak memory of one forward+backward of an attention layer on a CPU, in a fresh process.

PyTorch keeps no peak statistics for CPU memory, so each measurement runs in its own process with glibc
told to serve every allocation above 64 KiB by mmap (``MALLOC_MMAP_THRESHOLD_``), which returns freed
tensors to the system at once: the process's resident set then follows the live tensors, and its peak
(``ru_maxrss``) minus the resident set before the call is the call's peak. The layer, its weights and the
input exist before the first reading, so they are not counted.

    python -m bench.cpu_memory --layer ours --tokens 1024 --dropout 0.1      # prints JSON
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

LAYERS = ("chapter", "ours", "sdpa")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes(layer: str, tokens: int, dropout: float, batch: int = 2, width: int = 768, heads: int = 12) -> int:
    """Run the measurement in a subprocess and return the peak bytes above what existed before the call."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "bench.cpu_memory", "--layer", layer, "--tokens", str(tokens)]
    cmd += ["--dropout", str(dropout), "--batch", str(batch), "--width", str(width), "--heads", str(heads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.cpu_memory")
    ap.add_argument("--layer", choices=LAYERS, required=True)
    ap.add_argument("--tokens", type=int, required=True)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    args = ap.parse_args(argv)

    import torch

    import attention
    from attention import reference as ref
    from bench.gpt import SDPAMultiHeadAttention

    cls = {"chapter": ref.MultiHeadAttention, "ours": attention.MultiHeadAttention, "sdpa": SDPAMultiHeadAttention}
    torch.manual_seed(0)
    layer = cls[args.layer](args.width, args.width, args.tokens, args.dropout, args.heads).train(args.dropout > 0)
    x = torch.randn(args.batch, args.tokens, args.width, requires_grad=True)
    before = _rss_bytes()
    layer(x).sum().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    print(
        json.dumps({"layer": args.layer, "tokens": args.tokens, "dropout": args.dropout, "peak_bytes": peak - before})
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
