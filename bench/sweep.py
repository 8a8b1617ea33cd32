"""The attention-core sweep: our kernel against PyTorch's fused and eager attentions, over sequence length.

Each row times one provider on causal ``(B, H, N, D)`` inputs, forward or forward+backward: the median
of at least ``common.MIN_REPS`` calls with its 20th/80th percentiles, TFLOP/s, peak memory and (dropout 0)
the max error of the forward against float64 on a slice. Rows are visited in priority order (the
headline shapes first) so a time budget cuts the least important ones, and the notes then name every
case that was not run. A peer without a kernel for a case is "n/a"; an out-of-memory is a row with
``"error"``; any failure of ours stops the sweep (raised, never a quiet "n/a").
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bench import providers
from bench.common import is_oom, measure, peak_memory

# fp32: TF32 matmuls allowed, as most PyTorch users run float32 on tensor cores; fp32-ieee: PyTorch's
# default (torch.backends.cuda.matmul.allow_tf32 = False), exact float32 products for everyone.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp32-ieee": torch.float32}
ALL_PROVIDERS = tuple(providers.table())
SEQ_LENS = (128, 256, 512, 1024, 2048, 4096, 8192, 16384)
HEAD_CONFIGS = ((12, 64), (16, 128))  # (heads, head_dim): GPT-2 small, and a wider head
MATH_MAX_N = 4096  # the math backend materializes (B, H, N, N) in several copies; past this it only burns time
ERR_ROWS = 128  # max_err compares the last ERR_ROWS query rows of head (0, 0) against float64
# Who computes in the same precision as whom: the peers a row of ours is compared with in the headline.
# Float32 with TF32 allowed: only the eager attentions use TF32 (SDPA's efficient kernel stays exact
# float32, its flash and cuDNN kernels take no float32); exact float32: SDPA's efficient and math.
LIKE_FOR_LIKE = {
    "bf16": ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_math", "flex"),
    "fp16": ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_math", "flex"),
    "fp32": ("chapter", "sdpa_math"),
    "fp32-ieee": ("sdpa_efficient", "sdpa_math"),
}


def attention_flops(batch: int, heads: int, seq_len: int, head_dim: int, causal: bool, mode: str) -> float:
    """4*B*H*N^2*D for QK^T and PV, halved when causal; the backward does 2.5x the forward's work."""
    flops = 4.0 * batch * heads * seq_len**2 * head_dim * (0.5 if causal else 1.0)
    return flops * (3.5 if mode == "fwd_bwd" else 1.0)


@dataclass(frozen=True)
class Case:
    dtype: str
    heads: int
    head_dim: int
    dropout_p: float
    seq_len: int
    provider: str

    def name(self) -> str:
        return f"{self.provider} {self.dtype} D{self.head_dim} N{self.seq_len} p{self.dropout_p}"


def _reference_slice(q, k, v) -> torch.Tensor:
    """float64 causal attention for the last ERR_ROWS query rows of batch 0, head 0."""
    n = q.shape[2]
    rows = min(ERR_ROWS, n)
    qs = q[0, 0, n - rows :].double()
    ks, vs = k[0, 0].double(), v[0, 0].double()
    s = qs @ ks.T * q.shape[-1] ** -0.5  # (rows, N)
    i = torch.arange(n - rows, n, device=q.device)[:, None]
    s = s.masked_fill(torch.arange(n, device=q.device)[None, :] > i, float("-inf"))
    return torch.softmax(s, dim=-1) @ vs


def _priority(case: Case) -> tuple:
    """Headline rows first: bf16 at GPT-2's head dim, then fp32 (the book's dtype), dropout, the rest."""
    tier = {
        ("bf16", 64, 0.0): 0,
        ("bf16", 128, 0.0): 1,
        ("fp16", 64, 0.0): 2,
        ("fp16", 128, 0.0): 3,
        ("bf16", 64, 0.1): 4,
        ("fp32", 64, 0.0): 5,
        ("fp32-ieee", 64, 0.0): 6,
        ("bf16", 128, 0.1): 7,
    }.get((case.dtype, case.head_dim, case.dropout_p), 8)
    return (case.provider in ("nn_mha", "flex"), tier)


def plan(dtypes, head_configs, seq_lens, dropouts, names) -> list[Case]:
    cases = []
    for dtype, (heads, head_dim), p, n, name in itertools.product(dtypes, head_configs, dropouts, seq_lens, names):
        if name == "sdpa_math" and n > MATH_MAX_N:
            continue
        if name == "flex" and p > 0:
            continue
        cases.append(Case(dtype, heads, head_dim, p, n, name))
    return sorted(cases, key=_priority)


def run(
    *,
    batch: int,
    dtypes: list[str],
    head_configs: list[tuple[int, int]],
    seq_lens: list[int],
    dropouts: list[float],
    modes: list[str],
    names: list[str],
    device: str,
    peak_tflops: float | None,
    budget_s: float | None = None,
    progress: bool = True,
) -> tuple[list[dict], list[str]]:
    """Run the sweep; returns the rows and the notes (unavailable providers, what a budget cut left out)."""
    fns: dict[str, Callable] = {}
    notes = []
    for name in names:
        try:
            fns[name] = providers.table()[name]()
        except providers.Unavailable as err:
            notes.append(f"provider {name} unavailable here: {err}")
    cases = plan(dtypes, head_configs, seq_lens, dropouts, list(fns))
    start = time.perf_counter()
    rows: list[dict] = []
    inputs: dict = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(cases) * len(modes), desc="sweep", unit="row")
    for idx, case in enumerate(cases):
        if budget_s is not None and time.perf_counter() - start > budget_s:
            left = cases[idx:]
            notes.append(
                f"time budget {budget_s:.0f}s reached: {len(left)} of {len(cases)} cases not run "
                f"(x {len(modes)} modes): " + "; ".join(c.name() for c in left)
            )
            break
        key = (case.dtype, case.heads, case.head_dim, case.seq_len)
        if key not in inputs:
            inputs.clear()
            if device == "cuda":
                torch.cuda.empty_cache()
            shape = (batch, case.heads, case.seq_len, case.head_dim)
            try:
                inputs[key] = [torch.randn(shape, device=device, dtype=DTYPES[case.dtype]) for _ in range(4)]
            except RuntimeError as err:
                if not is_oom(err):
                    raise
                inputs[key] = None
        for mode in modes:
            rows.append(measure_case(case, mode, fns[case.provider], inputs[key], batch, device, peak_tflops))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return rows, notes


def measure_case(case: Case, mode: str, fn: Callable, tensors, batch: int, device: str, peak: float | None) -> dict:
    row = {
        "provider": case.provider,
        "mode": mode,
        "dtype": case.dtype,
        "causal": True,
        "dropout_p": case.dropout_p,
        "batch": batch,
        "heads": case.heads,
        "seq_len": case.seq_len,
        "head_dim": case.head_dim,
        "ms": None,
        "ms_p20": None,
        "ms_p80": None,
        "reps": None,
        "tflops": None,
        "pct_peak_matmul": None,
        "peak_mem_bytes": None,
        "max_err": None,
    }
    if tensors is None:
        row["error"] = "out of memory allocating inputs"
        return row
    q, k, v, do = tensors
    p = case.dropout_p
    # fp32: TF32 allowed, as PyTorch users run float32 on tensor cores; fp32-ieee: exact products for all.
    torch.backends.cuda.matmul.allow_tf32 = case.dtype == "fp32"
    try:
        if mode == "fwd":
            with torch.no_grad():
                call = lambda: fn(q, k, v, p)
                if p == 0 and case.provider != "nn_mha":
                    out = call()
                    rows_ = min(ERR_ROWS, case.seq_len)
                    got = out[0, 0, case.seq_len - rows_ :].double()
                    row["max_err"] = (got - _reference_slice(q, k, v)).abs().max().item()
                    del out
        else:
            qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

            def call():
                qg.grad = kg.grad = vg.grad = None
                out = fn(qg, kg, vg, p)
                out.backward(do if out.shape == do.shape else torch.ones_like(out))

        row["peak_mem_bytes"] = peak_memory(call, device)
        timing = measure(call, device)
        row.update(ms=timing.ms, ms_p20=timing.p20, ms_p80=timing.p80, reps=timing.reps)
        flops = attention_flops(batch, case.heads, case.seq_len, case.head_dim, True, mode)
        row["tflops"] = flops / (timing.ms * 1e-3) / 1e12
        if peak:
            row["pct_peak_matmul"] = 100.0 * row["tflops"] / peak
    except providers.Unavailable as err:
        row["error"] = f"n/a: {err}"
    except (RuntimeError, NotImplementedError) as err:
        if is_oom(err) and case.provider != "ours":
            row["error"] = "out of memory"
        elif case.provider == "ours":
            raise RuntimeError(f"our kernel failed at {case.name()} {mode}") from err
        else:
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
        if device == "cuda" and "error" in row:
            torch.cuda.empty_cache()
    return row


def matmul_peak_tflops(device: str) -> float | None:
    """Dense bf16 matmul rate of this card, measured now (8192^3 on random data)."""
    if device != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = measure(lambda: a @ b, device, warmup_ms=50, rep_ms=200).ms
    return 2 * n**3 / (ms * 1e-3) / 1e12


def summarize(rows: list[dict]) -> list[str]:
    """Table lines: per (dtype, head_dim, dropout, mode, N), each provider's ms and TFLOP/s."""
    lines = []
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["dtype"], r["head_dim"], r["dropout_p"], r["mode"]), []).append(r)
    for (dtype, d, p, mode), group in groups.items():
        names = sorted({r["provider"] for r in group}, key=ALL_PROVIDERS.index)
        lines.append(f"\n{dtype} head_dim {d} dropout {p} {mode}: median ms (TFLOP/s) [p20-p80 spread]")
        lines.append(f"{'N':>6} " + " ".join(f"{n:>24}" for n in names))
        for n in sorted({r["seq_len"] for r in group}):
            cells = []
            for name in names:
                r = next((r for r in group if r["seq_len"] == n and r["provider"] == name), None)
                if r is None:
                    cells.append(f"{'-':>24}")
                elif r["ms"] is None:
                    cells.append(f"{'OOM' if 'memory' in r.get('error', '') else 'n/a':>24}")
                else:
                    spread = 100 * (r["ms_p80"] - r["ms_p20"]) / r["ms"]
                    cells.append(f"{r['ms']:>9.3f} ({r['tflops']:>5.0f}) [{spread:>4.1f}%]")
            lines.append(f"{n:>6} " + " ".join(cells))
    return lines


def _same_setting(a: dict, b: dict) -> bool:
    return all(a[k] == b[k] for k in ("mode", "dtype", "seq_len", "head_dim", "dropout_p"))


def headline(rows: list[dict]) -> list[str]:
    """Ours against the fastest peer of the same precision (LIKE_FOR_LIKE), at every measured N."""
    lines = [
        f"{'dtype':>9} {'D':>4} {'N':>6} {'mode':>8} {'ours ms':>9} {'fastest like-for-like peer':>30} {'ratio':>7}"
    ]
    for r in rows:
        if r["provider"] != "ours" or r["dropout_p"] != 0 or r["ms"] is None:
            continue
        peers = [
            o
            for o in rows
            if o["ms"] is not None and o["provider"] in LIKE_FOR_LIKE[r["dtype"]] and _same_setting(o, r)
        ]
        best = min(peers, key=lambda o: o["ms"], default=None)
        best_s = f"{best['provider']} {best['ms']:.3f}" if best else "n/a"
        ratio = f"{best['ms'] / r['ms']:.2f}x" if best else "n/a"
        where = f"{r['dtype']:>9} {r['head_dim']:>4} {r['seq_len']:>6} {r['mode']:>8}"
        lines.append(f"{where} {r['ms']:>9.3f} {best_s:>30} {ratio:>7}")
    return lines


def dropout_overhead(rows: list[dict]) -> list[str]:
    """fwd+bwd time with dropout over dropout 0, for ours and each SDPA backend, per shape."""
    lines = []
    for r in rows:
        if r["dropout_p"] == 0 or r["mode"] != "fwd_bwd" or r["ms"] is None:
            continue
        base = next(
            (
                o
                for o in rows
                if o["dropout_p"] == 0
                and o["ms"] is not None
                and o["provider"] == r["provider"]
                and all(o[k] == r[k] for k in ("mode", "dtype", "seq_len", "head_dim"))
            ),
            None,
        )
        if base:
            pct = 100 * (r["ms"] / base["ms"] - 1)
            lines.append(
                f"{r['provider']:>15} {r['dtype']} D{r['head_dim']} N{r['seq_len']}: dropout {r['dropout_p']} "
                f"costs {pct:+.1f}%"
            )
    return lines
