"""The host path and the forward variants (GPU): what a call costs the CPU, and which forward Hopper runs best.

1. Host path, at the book's GPT-2 shape (B 8, H 12, N 1024, D 64, bf16, causal), forward and
   forward+backward, ours (one-pass and deterministic backward) and SDPA's flash and cuDNN:
   - ``measured``: the usual timing (events around each call, L2 flushed between calls);
   - ``host``: the CPU time per call while the GPU is kept busy by a long kernel queued first, so nothing
     waits for the device: the cost of Python, autograd, allocation and the launches themselves;
   - ``device``: the same call captured in a CUDA graph and replayed: the GPU's own time.
   A call is host-bound when ``host`` > ``device``. Ours also with every launch through Triton's JIT dispatch
   ("ours JIT dispatch": kernels/launch.py off), old against new. Plus a cProfile of our forward+backward,
   and one generation step's attention at batch 1 (ours, through the JIT's dispatch, the book's torch.cat).
2. Forward variants (bench/hopper.py): the pointer kernel, TMA loads, a persistent grid and warp
   specialization, bf16 causal at head dims 64 and 128, N 4096 to 16384, with SDPA's cuDNN beside them.
3. The backward at the same shapes: one pass (dQ by atomics) against the two kernels (dQ, then dK/dV).

    python -m bench.host --json host.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time

import torch
from chapter3_flash.kernels import flash_attention_with_kvcache, settings
from chapter3_flash.kernels import flash_attn as fa

from bench import hopper, providers
from bench.common import graphed, measure, metadata, save_json, smoke_mode
from bench.sweep import attention_flops

GPT2 = (8, 12, 1024, 64)
VARIANT_SHAPES = [(8, 16, 4096, 128), (8, 16, 16384, 128), (8, 12, 4096, 64), (8, 12, 16384, 64)]  # (B, H, N, D)


def host_us(fn, device: str, calls: int = 50, rounds: int = 5) -> float:
    """CPU microseconds per call of fn while the GPU is busy (no call waits for the device): the median of
    ``rounds`` rounds of ``calls`` calls, each round behind its own queued sleep (run 3 read one round, and
    two rows of the same forward differed by 1.8x)."""
    fn()
    per_call = []
    for _ in range(rounds):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda._sleep(500_000_000)  # ~0.25 s of GPU cycles queued ahead: the calls below only enqueue
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter() - start) / calls * 1e6)
    if device == "cuda":
        torch.cuda.synchronize()
    return statistics.median(per_call)


def device_us(fn, device: str) -> float | None:
    """The call's GPU time: captured in a CUDA graph, timed by its replays."""
    if device != "cuda":
        return None
    return measure(graphed(fn, device), device).ms * 1e3


def host_rows(device: str, shape=GPT2, calls: int = 50) -> tuple[list[dict], str]:
    B, H, N, D = shape
    dtype = torch.bfloat16
    q, k, v, do = (torch.randn(B, H, N, D, device=device, dtype=dtype) for _ in range(4))
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    impls = {
        "ours": lambda q, k, v: providers.ours(q, k, v, 0.0),
        "ours deterministic": lambda q, k, v: providers.ours(q, k, v, 0.0, deterministic=True),
        # The same call with every launch through Triton's JIT dispatch (kernels/launch.py off): old against new.
        "ours JIT dispatch": lambda q, k, v: providers.ours(q, k, v, 0.0),
        "sdpa_flash": lambda q, k, v: providers.sdpa("FLASH_ATTENTION")(q, k, v, 0.0),
        "sdpa_cudnn": lambda q, k, v: providers.sdpa("CUDNN_ATTENTION")(q, k, v, 0.0),
    }
    rows = []
    for name, fn in impls.items():

        def fwd(fn=fn):
            with torch.no_grad():
                fn(q, k, v)

        def fwd_bwd(fn=fn):
            fn(qg, kg, vg).backward(do)

        for mode, call in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
            row = dict(impl=name, mode=mode, batch=B, heads=H, seq_len=N, head_dim=D, dtype="bf16")
            # Under KERNELS_DIRECT_LAUNCH=0 (the default) every row goes through the JIT.
            with settings.override(direct_launch=settings.current.direct_launch and name != "ours JIT dispatch"):
                try:
                    row["measured_us"] = measure(call, device).ms * 1e3
                    row["host_us"] = host_us(call, device, calls)
                    row["device_us"] = device_us(call, device)
                except providers.Unavailable as err:
                    row["error"] = f"n/a: {err}"
                except Exception as err:
                    row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
                    row["ours_failed"] = name.startswith("ours")
            rows.append(row)
    prof = cProfile.Profile()
    fwd_bwd = lambda: providers.ours(qg, kg, vg, 0.0).backward(do)
    prof.enable()
    for _ in range(2 * calls):
        fwd_bwd()
    prof.disable()
    if device == "cuda":
        torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(16)
    return rows, "\n".join(line for line in out.getvalue().splitlines() if line.strip())


def decode_rows(device: str, calls: int = 50) -> list[dict]:
    """One generation step's attention at batch 1 (GPT-2: 12 heads, head dim 64, a 1,024-token cache, the token
    appended): ours with direct launches and through the JIT's dispatch, and the book's way (torch.cat of the
    cache, then SDPA). Decoding at batch 1 is host-bound, so the host-only column is the one that matters."""
    H, D, T = 12, 64, 1024
    dtype = torch.bfloat16
    q = torch.randn(1, H, 1, D, device=device, dtype=dtype)
    k_cache, v_cache = (torch.randn(1, T + 1, H, D, device=device, dtype=dtype).transpose(1, 2) for _ in range(2))
    k_new, v_new = (torch.randn(1, H, 1, D, device=device, dtype=dtype) for _ in range(2))
    past_k, past_v = k_cache[:, :, :T].contiguous(), v_cache[:, :, :T].contiguous()

    def ours():
        return flash_attention_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=T)

    def book():  # ch04/03's step: the cache grown by torch.cat, then attention over all of it
        keys, values = torch.cat([past_k, k_new], dim=2), torch.cat([past_v, v_new], dim=2)
        return torch.nn.functional.scaled_dot_product_attention(q, keys, values)

    rows = []
    for name, fn, direct in (
        ("ours", ours, True),
        ("ours JIT dispatch", ours, False),
        ("book torch.cat + SDPA", book, True),
    ):
        row = dict(impl=name, mode="decode", batch=1, heads=H, seq_len=T, head_dim=D, dtype="bf16")
        # Under KERNELS_DIRECT_LAUNCH=0 (the default) every row goes through the JIT.
        with settings.override(direct_launch=settings.current.direct_launch and direct), torch.no_grad():
            try:
                row["measured_us"] = measure(fn, device).ms * 1e3
                row["host_us"] = host_us(fn, device, calls)
                row["device_us"] = device_us(fn, device)
            except Exception as err:
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
                row["ours_failed"] = name.startswith("ours")
        rows.append(row)
    return rows


def variant_rows(device: str, shapes) -> list[dict]:
    rows = []
    for B, H, N, D in shapes:
        q, k, v = (torch.randn(B, H, N, D, device=device, dtype=torch.bfloat16) for _ in range(3))
        spec = fa.Spec(True, 0.0, D**-0.5)
        flops = attention_flops(B, H, N, D, True, "fwd")
        calls = {"pointer": lambda: fa.forward(q, k, v, spec)}
        for variant in hopper.VARIANTS[1:]:
            if hopper.supports(q, k, v, spec, variant):
                calls[variant] = lambda variant=variant: hopper.forward(q, k, v, spec, variant)
        calls["sdpa_cudnn"] = lambda: providers.sdpa("CUDNN_ATTENTION")(q, k, v, 0.0)
        calls["sdpa_flash"] = lambda: providers.sdpa("FLASH_ATTENTION")(q, k, v, 0.0)
        reference = fa.forward(q, k, v, spec)[0].float()
        for name, call in calls.items():
            row = dict(kind="forward", impl=name, batch=B, heads=H, seq_len=N, head_dim=D, dtype="bf16", causal=True)
            try:
                with torch.no_grad():
                    out = call()
                    out = out[0] if isinstance(out, tuple) else out
                    row["max_diff_vs_pointer"] = (out.float() - reference).abs().max().item()
                    t = measure(call, device)
                row.update(ms=t.ms, p20=t.p20, p80=t.p80, tflops=flops / (t.ms * 1e-3) / 1e12)
            except providers.Unavailable as err:
                row["error"] = f"n/a: {err}"
            except Exception as err:
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
                row["ours_failed"] = not name.startswith("sdpa")
            rows.append(row)
        o, lse, seed = fa.forward(q, k, v, spec)
        do = torch.randn_like(o)
        flops = attention_flops(B, H, N, D, True, "fwd_bwd") - attention_flops(B, H, N, D, True, "fwd")
        for name, one_pass in (("one-pass", True), ("two-kernel", False)):
            row = dict(kind="backward", impl=name, batch=B, heads=H, seq_len=N, head_dim=D, dtype="bf16", causal=True)
            try:
                t = measure(
                    lambda one_pass=one_pass: fa.backward(do, q, k, v, o, lse, seed, spec, one_pass=one_pass), device
                )
                row.update(ms=t.ms, p20=t.p20, p80=t.p80, tflops=flops / (t.ms * 1e-3) / 1e12)
            except Exception as err:
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
                row["ours_failed"] = True
            rows.append(row)
    return rows


def table(host: list[dict], variants: list[dict]) -> list[str]:
    lines = ["host path, B 8 H 12 N 1024 D 64 bf16 causal (us per call): measured / host-only / device (graph)"]
    for r in host:
        if "error" in r:
            lines.append(f"  {r['impl']:<20} {r['mode']:<8} {r['error']}")
            continue
        dev = f"{r['device_us']:8.1f}" if r["device_us"] is not None else "     n/a"
        lines.append(f"  {r['impl']:<20} {r['mode']:<8} {r['measured_us']:8.1f} {r['host_us']:8.1f} {dev}")
    lines.append("forward variants and backward paths: ms (TFLOP/s)")
    for r in variants:
        where = f"  {r['kind']:<8} D{r['head_dim']:<4} N{r['seq_len']:<6} {r['impl']:<16}"
        lines.append(f"{where} {r['error']}" if "error" in r else f"{where} {r['ms']:8.3f} ({r['tflops']:5.0f})")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.host")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on whatever device is here (a code check)")
    ap.add_argument("--parts", default="host,variants", help="host and/or variants")
    args = ap.parse_args(argv)
    if args.smoke:
        smoke_mode()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = {"meta": metadata(device), "host": [], "variants": []}

    def save():
        save_json(args.json, result)

    if "host" in args.parts:
        result["host"], result["profile"] = host_rows(device, *(((1, 2, 64, 16), 2) if args.smoke else (GPT2, 20)))
        result["host"] += decode_rows(device, 2 if args.smoke else 50)
        save()
        print(result["profile"][:2500])
    if "variants" in args.parts:
        if args.smoke:
            shapes = [(1, 2, 64, 16)]
        else:
            shapes = VARIANT_SHAPES
        result["variants"] = variant_rows(device, shapes)
        save()
    print("\n".join(table(result["host"], result["variants"])))
    return 1 if any(r.get("ours_failed") for r in result["host"] + result["variants"]) else 0


if __name__ == "__main__":
    sys.exit(main())
