"""What every benchmark shares: timing, peak memory, the run's metadata, results on disk."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine() or "cpu"


def device_slug(device: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'; 'cpu' on a CPU."""
    if device != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def git_commit() -> str:
    if os.environ.get("GIT_COMMIT"):  # the device machine gets the tree without .git
        return os.environ["GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def metadata(device: str) -> dict:
    import triton

    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(fn: Callable[[], object], device: str, *, warmup_ms: float = 10, rep_ms: float = 40) -> tuple[float, ...]:
    """Median, 20th and 80th percentile time of fn in ms.

    On a GPU: CUDA events through triton.testing.do_bench (warm-up, L2 flushed before each run).
    On a CPU: perf_counter around each call after one warm-up call.
    """
    if device == "cuda":
        import triton.testing

        return tuple(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8]))
    fn()
    times = []
    deadline = time.perf_counter() + max(rep_ms / 1000, 0.2)
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    q = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
    return statistics.median(times), q[1], q[7]


def fwd_and_fwd_bwd_ms(attend: Callable, q, k, v, dropout_p: float, device: str = "cuda") -> tuple[float, float]:
    """Median ms of ``attend(q, k, v, dropout_p)`` without grad, and of it with its backward."""
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    do = torch.randn_like(q)

    def fwd():
        with torch.no_grad():
            attend(q, k, v, dropout_p)

    def fwd_bwd():
        qg.grad = kg.grad = vg.grad = None
        attend(qg, kg, vg, dropout_p).backward(do)

    return measure(fwd, device)[0], measure(fwd_bwd, device)[0]


def peak_memory(fn: Callable[[], object], device: str) -> int | None:
    """Bytes allocated at the peak of one call of fn, above what was allocated before it (GPU only)."""
    if device != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated() - base


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def write_json(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path
