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
from typing import NamedTuple

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


class Timing(NamedTuple):
    """Median and spread (20th, 80th percentile) of ``reps`` timed calls, in ms."""

    ms: float
    p20: float
    p80: float
    reps: int


MIN_REPS = 10  # every reported time is the median of at least this many timed calls
SMOKE_REPS = 2  # a --smoke run checks the benchmarks' code (tiny shapes, the interpreter), its times mean nothing
_smoke = False


def smoke_mode() -> None:
    """Time every call SMOKE_REPS times from now on: for --smoke runs only, whose times are not reported."""
    global _smoke
    _smoke = True


def smoke_mode_on() -> bool:
    return _smoke


_clocks_raised = False


def _raise_clocks(seconds: float = 0.3) -> None:
    """Once per process, before the first timing: keep the GPU busy for ``seconds`` so that it leaves its idle
    clock (345 MHz on the H100 of run 5, where the first row of every benchmark read up to 1.8x slow)."""
    global _clocks_raised
    if _clocks_raised or _smoke:
        return
    _clocks_raised = True
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for _ in range(8):
            a @ a
        torch.cuda.synchronize()


def measure(
    fn: Callable[[], object],
    device: str,
    *,
    warmup_ms: float = 25,
    rep_ms: float = 100,
    min_reps: int = MIN_REPS,
    max_reps: int = 2000,
    flush_l2: bool = True,
) -> Timing:
    """Time fn: at least ``min_reps`` calls, more while they fit in ``rep_ms``.

    In a --smoke run (``smoke_mode``) two calls only. On a GPU: CUDA events around each call after a warm-up,
    the L2 cache flushed before each one (a
    256 MB write outside the timed region), as triton.testing.do_bench does but never fewer than
    ``min_reps`` calls (do_bench times a 24 ms call once at rep=40). On a CPU: perf_counter around
    each call after one warm-up call.
    """
    if _smoke:
        min_reps, max_reps, rep_ms, warmup_ms = SMOKE_REPS, SMOKE_REPS, 0.0, 0.0
    if device == "cuda":
        _raise_clocks()
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            fn()
        end.record()
        torch.cuda.synchronize()
        estimate = max(start.elapsed_time(end) / 3, 1e-3)
        for _ in range(min(max_reps, int(warmup_ms / estimate))):
            fn()
        reps = max(min_reps, min(max_reps, int(rep_ms / estimate)))
        cache = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda") if flush_l2 else None
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for s, e in events:
            if cache is not None:
                cache.zero_()
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in events]
    else:
        fn()
        times = []
        deadline = time.perf_counter() + rep_ms / 1000
        while len(times) < min_reps or (time.perf_counter() < deadline and len(times) < max_reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return Timing(statistics.median(times), q[1], q[7], len(times))


def graphed(fn: Callable[[], object], device: str) -> Callable[[], object]:
    """fn captured in a CUDA graph (after a warm-up on a side stream); returns its replay. On a CPU, fn."""
    if device != "cuda":
        return fn
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


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

    return measure(fwd, device).ms, measure(fwd_bwd, device).ms


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


def save_json(path: str | None, payload: dict) -> None:
    """A benchmark's ``--json`` file, when one was asked for: rewritten whole after every row, so a run cut short
    keeps what it measured."""
    if path:
        write_json(Path(path), payload)
