"""Peak memory of one forward+backward of an attention layer on a CPU, in a fresh process.

PyTorch keeps no peak statistics for CPU memory, so each measurement runs in its own process with glibc
told to serve every allocation above 64 KiB by mmap (``MALLOC_MMAP_THRESHOLD_``), which returns freed
tensors to the system at once: the process's resident set then follows the live tensors. The peak is reset
right before the call (``/proc/self/clear_refs``: Linux carries ``ru_maxrss`` across fork and exec, so without
the reset a child of the main job reads its parent's peak), and the peak after the call (``VmHWM``) minus the
resident set before it is the call's peak. The layer, its weights and the
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
# For the measuring process: glibc serves every allocation above 64 KiB by mmap and returns it at once.
MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    """Reset the process's resident-set high-water mark (Linux: ``5`` to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def call_peak_bytes(fn) -> int:
    """Peak resident bytes of one call of fn above what was resident before it, in a process started with
    ``MMAP_ENV`` (so freed tensors leave the resident set at once)."""
    if not _reset_peak():
        raise OSError("cannot reset the peak resident set (/proc/self/clear_refs)")
    before = _rss_bytes()
    fn()
    return _peak_rss_bytes() - before


def peak_bytes(layer: str, tokens: int, dropout: float, batch: int = 2, width: int = 768, heads: int = 12) -> int:
    """Run the measurement in a subprocess and return the peak bytes above what existed before the call."""
    env = {**os.environ, **MMAP_ENV}
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
    from chapter3_flash.attention import reference as ref

    from bench.gpt import SDPAMultiHeadAttention
    from chapter3_flash import attention

    cls = {"chapter": ref.MultiHeadAttention, "ours": attention.MultiHeadAttention, "sdpa": SDPAMultiHeadAttention}
    torch.manual_seed(0)
    layer = cls[args.layer](args.width, args.width, args.tokens, args.dropout, args.heads).train(args.dropout > 0)
    x = torch.randn(args.batch, args.tokens, args.width, requires_grad=True)
    if not _reset_peak():
        print(json.dumps({"layer": args.layer, "error": "cannot reset the peak resident set (/proc/self/clear_refs)"}))
        return 1
    before = _rss_bytes()
    layer(x).sum().backward()
    peak = _peak_rss_bytes()
    print(
        json.dumps({"layer": args.layer, "tokens": args.tokens, "dropout": args.dropout, "peak_bytes": peak - before})
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
