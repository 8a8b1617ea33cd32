"""The attention-core sweep: our kernel against PyTorch's fused and eager attentions, over sequence length.

Each row times one provider on causal ``(B, H, N, D)`` inputs, forward or forward+backward, and
records TFLOP/s, peak memory and (dropout 0) the max error of the forward against float64 on a slice.
Rows are visited in priority order (the headline shapes first) so a time budget cuts the least
important ones; an out-of-memory is a row with ``"error"``, not a crash.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.common import is_oom, measure, peak_memory
from kernels import flash_attention

# fp32: TF32 matmuls allowed, as most PyTorch users run float32 on tensor cores; fp32-ieee: PyTorch's
# default (torch.backends.cuda.matmul.allow_tf32 = False), exact float32 products for everyone.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp32-ieee": torch.float32}
ALL_PROVIDERS = (
    "ours",
    "sdpa_flash",
    "sdpa_cudnn",
    "sdpa_efficient",
    "sdpa_math",
    "flex",
    "chapter",
    "nn_mha",
)
SEQ_LENS = (128, 256, 512, 1024, 2048, 4096, 8192, 16384)
HEAD_CONFIGS = ((12, 64), (16, 128))  # (heads, head_dim): GPT-2 small, and a wider head
MATH_MAX_N = 4096  # the math backend materializes (B, H, N, N) in several copies; past this it only burns time
ERR_ROWS = 128  # max_err compares the last ERR_ROWS query rows of head (0, 0) against float64


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


def ours(q, k, v, p):
    """Our kernel as every provider is called: causal, (B, H, N, D), dropout p."""
    return flash_attention(q, k, v, causal=True, dropout_p=p)


def _sdpa(backend_name: str) -> Callable:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def run(q, k, v, p):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)

    return run


def _chapter_core(q, k, v, p, _masks={}):
    """The chapter's MultiHeadAttention core, line for line (its mask is a buffer: built once)."""
    n = q.shape[2]
    key = (n, q.device)
    if key not in _masks:
        _masks.clear()
        _masks[key] = torch.triu(torch.ones(n, n, device=q.device), diagonal=1).bool()
    attn_scores = q @ k.transpose(2, 3)  # (B, H, N, N)
    attn_scores.masked_fill_(_masks[key], -torch.inf)
    attn_weights = torch.softmax(attn_scores / k.shape[-1] ** 0.5, dim=-1)
    attn_weights = F.dropout(attn_weights, p, training=p > 0)
    return attn_weights @ v


def _flex() -> Callable:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    masks = {}

    def run(q, k, v, p):
        if p > 0:
            raise NotImplementedError("FlexAttention has no dropout")
        n = q.shape[2]
        if n not in masks:
            masks[n] = create_block_mask(lambda b, h, qi, kv: qi >= kv, None, None, n, n, device=q.device)
        return compiled(q, k, v, block_mask=masks[n])

    return run


def _nn_mha(cache={}):
    """nn.MultiheadAttention on (B, N, H*D): includes its input and output projections."""

    def run(q, k, v, p):
        B, H, N, D = q.shape
        key = (H, D, q.dtype, p)
        if key not in cache:
            cache.clear()
            mha = torch.nn.MultiheadAttention(H * D, H, dropout=p, bias=False, batch_first=True)
            cache[key] = mha.to(q.device, q.dtype).train(p > 0)
        x = q.transpose(1, 2).reshape(B, N, H * D)  # (B, N, H*D): a view of q's storage where possible
        mask = torch.ones(N, N, device=q.device, dtype=torch.bool).triu(1)
        return cache[key](x, x, x, attn_mask=mask, is_causal=True, need_weights=False)[0]

    return run


def providers(names: list[str]) -> dict[str, Callable]:
    table = {
        "ours": ours,
        "sdpa_flash": _sdpa("FLASH_ATTENTION"),
        "sdpa_cudnn": _sdpa("CUDNN_ATTENTION"),
        "sdpa_efficient": _sdpa("EFFICIENT_ATTENTION"),
        "sdpa_math": _sdpa("MATH"),
        "chapter": _chapter_core,
        "nn_mha": _nn_mha(),
    }
    out = {}
    for name in names:
        if name == "flex":
            with contextlib.suppress(ImportError, AttributeError):
                out[name] = _flex()
        elif name in table:
            out[name] = table[name]
    return out


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


def _priority(dtype: str, head_dim: int, dropout_p: float, provider: str) -> tuple:
    """Headline rows first: bf16 at GPT-2's head dim, then fp32 (the book's dtype), dropout, the rest."""
    tier = {
        ("bf16", 64, 0.0): 0,
        ("fp32", 64, 0.0): 1,
        ("bf16", 128, 0.0): 2,
        ("bf16", 64, 0.1): 3,
        ("fp16", 64, 0.0): 4,
        ("fp16", 128, 0.0): 5,
        ("fp32-ieee", 64, 0.0): 6,
    }.get((dtype, head_dim, dropout_p), 7)
    return (provider == "flex", tier)


def plan(dtypes, head_configs, seq_lens, dropouts, names) -> list[Case]:
    cases = []
    for dtype, (heads, head_dim), p, n, name in itertools.product(dtypes, head_configs, dropouts, seq_lens, names):
        if name == "sdpa_math" and n > MATH_MAX_N:
            continue
        if name == "flex" and p > 0:
            continue
        cases.append(Case(dtype, heads, head_dim, p, n, name))
    return sorted(cases, key=lambda c: _priority(c.dtype, c.head_dim, c.dropout_p, c.provider))


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
    """Run the sweep; returns the rows and the notes (skipped providers, budget cut)."""
    fns = providers(names)
    notes = [f"provider {name} unavailable here" for name in names if name not in fns]
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
            notes.append(f"time budget {budget_s:.0f}s reached: {len(cases) - idx} of {len(cases)} cases not run")
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
            rows.append(_measure_case(case, mode, fns[case.provider], inputs[key], batch, device, peak_tflops))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return rows, notes


def _measure_case(case: Case, mode: str, fn: Callable, tensors, batch: int, device: str, peak: float | None) -> dict:
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
    if case.dtype == "fp32":
        torch.backends.cuda.matmul.allow_tf32 = True  # as PyTorch users run float32 on tensor cores
    if case.dtype == "fp32-ieee":
        torch.backends.cuda.matmul.allow_tf32 = False  # exact float32 products, for us and for SDPA
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
        ms, p20, p80 = measure(call, device)
        row.update(ms=ms, ms_p20=p20, ms_p80=p80)
        flops = attention_flops(batch, case.heads, case.seq_len, case.head_dim, True, mode)
        row["tflops"] = flops / (ms * 1e-3) / 1e12
        if peak:
            row["pct_peak_matmul"] = 100.0 * row["tflops"] / peak
    except (RuntimeError, NotImplementedError) as err:
        if is_oom(err):
            row["error"] = "out of memory"
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
    ms = measure(lambda: a @ b, device, warmup_ms=50, rep_ms=200)[0]
    return 2 * n**3 / (ms * 1e-3) / 1e12


def summarize(rows: list[dict]) -> list[str]:
    """Table lines: per (dtype, head_dim, dropout, mode, N), each provider's ms and TFLOP/s."""
    lines = []
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["dtype"], r["head_dim"], r["dropout_p"], r["mode"]), []).append(r)
    for (dtype, d, p, mode), group in groups.items():
        names = sorted({r["provider"] for r in group}, key=ALL_PROVIDERS.index)
        lines.append(f"\n{dtype} head_dim {d} dropout {p} {mode}: ms (TFLOP/s)")
        lines.append(f"{'N':>6} " + " ".join(f"{n:>18}" for n in names))
        for n in sorted({r["seq_len"] for r in group}):
            cells = []
            for name in names:
                r = next((r for r in group if r["seq_len"] == n and r["provider"] == name), None)
                if r is None:
                    cells.append(f"{'-':>18}")
                elif r["ms"] is None:
                    cells.append(f"{'OOM' if 'memory' in r.get('error', '') else 'n/a':>18}")
                else:
                    cells.append(f"{r['ms']:>9.3f} ({r['tflops']:>5.0f})")
            lines.append(f"{n:>6} " + " ".join(cells))
    return lines


def headline(rows: list[dict]) -> list[str]:
    """Ours vs the best SDPA backend vs the chapter, at N 1024 and 8192."""
    lines = [
        f"{'dtype':>5} {'D':>4} {'N':>6} {'mode':>8} {'ours ms':>9} {'best SDPA':>22} {'chapter ms':>11} {'speedup':>8}"
    ]
    for r in rows:
        if r["provider"] != "ours" or r["seq_len"] not in (1024, 8192) or r["dropout_p"] != 0 or r["ms"] is None:
            continue
        same = [
            o
            for o in rows
            if o["ms"] is not None
            and all(o[k] == r[k] for k in ("mode", "dtype", "seq_len", "head_dim", "dropout_p"))
            and o["provider"].startswith("sdpa_")
        ]
        best = min(same, key=lambda o: o["ms"], default=None)
        chapter = next(
            (
                o
                for o in rows
                if o["provider"] == "chapter"
                and all(o[k] == r[k] for k in ("mode", "dtype", "seq_len", "head_dim", "dropout_p"))
            ),
            None,
        )
        best_s = f"{best['provider']} {best['ms']:.3f}" if best else "n/a"
        chap_s = f"{chapter['ms']:.3f}" if chapter and chapter["ms"] else ("OOM" if chapter else "n/a")
        speed = f"{best['ms'] / r['ms']:.2f}x" if best else "n/a"
        where = f"{r['dtype']:>5} {r['head_dim']:>4} {r['seq_len']:>6} {r['mode']:>8}"
        lines.append(f"{where} {r['ms']:>9.3f} {best_s:>22} {chap_s:>11} {speed:>8}")
    return lines


def dropout_overhead(rows: list[dict]) -> list[str]:
    """fwd+bwd time with dropout 0.1 over dropout 0, for ours and each SDPA backend, per shape."""
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
                and all(o[k] == r[k] for k in ("provider", "mode", "dtype", "seq_len", "head_dim"))
            ),
            None,
        )
        if base:
            pct = 100 * (r["ms"] / base["ms"] - 1)
            lines.append(
                f"{r['provider']:>15} {r['dtype']} D{r['head_dim']} N{r['seq_len']}: dropout 0.1 costs {pct:+.1f}%"
            )
    return lines
