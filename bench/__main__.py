"""The main job: ``python -m bench`` reports agreement, speed and memory on whatever device is present.

Parts (``--parts``), each saved into ``report.json`` as soon as it is measured:

- ``layers``: each chapter layer, the chapter's eager version against ours, on real text (errors against
  float64, time, peak memory); on a GPU also MultiHeadAttention at 4096 tokens;
- ``cpu`` (CPU): MultiHeadAttention at the laptop issue's shape, chapter / ours / the same layer calling
  SDPA, with and without dropout, time ratios and peak memory (``bench/cpu.py``);
- ``sweep`` (GPU): the attention core against every SDPA backend, FlexAttention, ``nn.MultiheadAttention``
  and the chapter's core, over sequence length, with plots (``bench/sweep.py``);
- ``e2e``: a chapter-4 GPT training step (GPT-2 124M on a GPU; its width and depth at context 128 on a CPU);
- ``generate``: greedy generation, the book's uncached and KV-cache models against ours (``bench/generate.py``);
- ``decode`` (GPU): the KV-cache decode kernel's GB/s against PyTorch's (``bench/decode.py``);
- ``window`` (GPU): sliding windows and the bonus models' blocks (``bench/window.py``);
- ``varlen``: packed batches of mixed lengths, ``flash_attention_varlen`` against the padded batch (ours and SDPA
  with its mask), each sequence alone, FlexAttention's document mask (GPU), softcap and lse costs; on a CPU a
  scaled-down workload (``bench/varlen.py``);
- ``host`` (GPU): the host path per call, the Hopper forward variants, the two backward paths (``bench/host.py``);
- ``hf``: a Llama-3.2-1B-shaped Hugging Face model on ``attention.hf`` against HF's sdpa and eager: a packed
  training step, generation, a padded batch's peak memory on a CPU (``bench/hf.py``; scaled down on a CPU;
  skipped with a note where transformers is not installed).

Writes a table to stdout, ``report.json`` and PNG plots under ``bench/results/<device-slug>/``. Exits
non-zero if any measurement of ours failed (a peer's missing kernel is "n/a", not a failure).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Set before anything imports kernels: the Triton interpreter checks agreement on a CPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench import cpu, decode, e2e, generate, hf, host, layers, sweep, varlen, window  # noqa: E402
from bench.common import RESULTS, device_slug, metadata, write_json  # noqa: E402
from bench.plots import plot_sweep  # noqa: E402
from chapter3_flash import attention  # noqa: E402

PARTS = ("layers", "cpu", "sweep", "e2e", "generate", "decode", "window", "varlen", "host", "hf")
GPU_PARTS = ("layers", "sweep", "e2e", "generate", "decode", "window", "varlen", "host", "hf")
CPU_PARTS = ("layers", "cpu", "e2e", "generate", "varlen", "hf")


def _csv(kind):
    return lambda s: [kind(x) for x in s.split(",") if x]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", type=_csv(str), default=None, help=f"any of {','.join(PARTS)} (default: by device)")
    ap.add_argument("--seq-lens", type=_csv(int), default=list(sweep.SEQ_LENS), help="sweep sequence lengths")
    ap.add_argument(
        "--dtypes", type=_csv(str), default=["bf16", "fp16", "fp32", "fp32-ieee"], help="sweep dtypes (fp32: TF32 on)"
    )
    ap.add_argument("--head-dims", type=_csv(int), default=[64, 128], help="64 (12 heads) and/or 128 (16 heads)")
    ap.add_argument("--modes", type=_csv(str), default=["fwd", "fwd_bwd"], help="fwd and/or fwd_bwd")
    ap.add_argument("--dropouts", type=_csv(float), default=[0.0, 0.1], help="sweep dropout probabilities")
    ap.add_argument("--providers", type=_csv(str), default=list(sweep.ALL_PROVIDERS), help="sweep providers")
    ap.add_argument("--batch", type=int, default=8, help="sweep and GPT batch size")
    ap.add_argument("--budget", type=float, default=None, help="stop the sweep after this many seconds")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default bench/results/<device>)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    for name, allowed in (
        ("parts", PARTS),
        ("dtypes", tuple(sweep.DTYPES)),
        ("modes", ("fwd", "fwd_bwd")),
        ("providers", sweep.ALL_PROVIDERS),
        ("head_dims", (64, 128)),
    ):
        bad = [x for x in (getattr(args, name) or []) if x not in allowed]
        if bad:
            ap.error(f"--{name.replace('_', '-')}: {bad} not among {list(allowed)}")
    if any(not 0 <= p < 1 for p in args.dropouts):
        ap.error(f"--dropouts must lie in [0, 1), got {args.dropouts}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with contextlib.ExitStack() as stack:
        if device == "cpu":
            # The interpreter is on (for the agreement check) but a CPU user's "auto" is PyTorch's fused path:
            # every timing below runs that; the agreement check asks for Triton by name.
            stack.enter_context(attention.use_backend("sdpa"))
        return _main(args, device)


def _main(args: argparse.Namespace, device: str) -> int:
    parts = args.parts or (GPU_PARTS if device == "cuda" else CPU_PARTS)
    meta = metadata(device)
    out_dir = args.out or RESULTS / device_slug(device)
    print(f"device {meta['device']} | torch {meta['torch']} | triton {meta['triton']} | commit {meta['commit']}")
    report: dict = {**meta, "parts": parts, "peak_matmul_tflops": None, "rows": [], "notes": []}
    path = out_dir / "report.json"
    save = lambda: write_json(path, report)  # after every part: a run cut short keeps what it measured
    failures: list[str] = []
    gpu_only = [p for p in parts if p in ("sweep", "decode", "window", "host")]
    if device == "cpu":
        report["notes"].append(
            "No GPU: Triton timings need one. On a CPU the fused layers run PyTorch's fused kernels (SDPA) with "
            "our semantics; the Triton kernel is checked for agreement through its interpreter."
            + (f" Skipped here (GPU only): {', '.join(gpu_only)}." if gpu_only else "")
        )
        print(report["notes"][-1])
    else:
        report["peak_matmul_tflops"] = sweep.matmul_peak_tflops(device)
        report["copy_gbs"] = decode.copy_bandwidth_gbs(device)
        peak, copy = report["peak_matmul_tflops"], report["copy_gbs"]
        print(f"dense bf16 matmul {peak:.0f} TFLOP/s, copy {copy:.0f} GB/s (measured)")

    if "layers" in parts:
        batch, tokens = (8, 1024) if device == "cuda" else (2, 256)
        dtypes = [torch.float32, torch.bfloat16] if device == "cuda" else [torch.float32]
        report["layers"] = []
        for dtype in dtypes:
            rows = layers.run(batch=batch, num_tokens=tokens, device=device, dtype=dtype)
            report["layers"] += rows
            tf32 = " (TF32 matmuls)" if device == "cuda" and dtype == torch.float32 else ""
            print(f"\nChapter layers on real text, {str(dtype).removeprefix('torch.')}{tf32}, errors vs float64:")
            print("\n".join(layers.table(rows)))
        if device == "cuda":
            # The chapter's MultiHeadAttention at 4096 tokens. Batch 2: its (b, 12, T, T) score matrix is
            # 1.5 GiB per copy in float32 (and the float64 check's twice).
            rows = layers.run(batch=2, num_tokens=4096, device=device, only=("MultiHeadAttention",))
            report["layers"] += rows
            print("\nMultiHeadAttention, batch 2 at 4096 tokens, float32 (TF32 matmuls):")
            print("\n".join(layers.table(rows)))
        else:
            agreement = layers.interpreter_agreement()
            report["interpreter_agreement"] = agreement
            print(f"\nTriton kernel through the interpreter, fused MultiHeadAttention {agreement['shape']}: "
                  f"max error vs float64 {agreement['max_err']:.2e}")  # fmt: skip
        save()

    if "cpu" in parts and device == "cpu":
        report["cpu"] = cpu.run()
        print("\nMultiHeadAttention d 768, 12 heads, batch 2 on this CPU: chapter / ours / the layer calling SDPA")
        print("\n".join(cpu.table(report["cpu"])))
        save()

    if "sweep" in parts and device == "cuda":
        heads = [h for h in sweep.HEAD_CONFIGS if h[1] in args.head_dims]
        rows, notes = sweep.run(
            batch=args.batch, dtypes=args.dtypes, head_configs=heads, seq_lens=args.seq_lens, dropouts=args.dropouts,
            modes=args.modes, names=args.providers, device=device, peak_tflops=report["peak_matmul_tflops"],
            budget_s=args.budget, progress=not args.no_progress,
        )  # fmt: skip
        report["rows"], report["notes"] = rows, report["notes"] + notes
        save()
        print("\n".join(sweep.summarize(rows)))
        print("\nHeadline (dropout 0): ours against the fastest peer computing at the same precision")
        print("\n".join(sweep.headline(rows)))
        print("\nDropout cost, forward+backward:")
        print("\n".join(sweep.dropout_overhead(rows)) or "(no dropout rows)")

    if "e2e" in parts:
        if device == "cuda":
            cfg, batch, precisions = e2e.GPT_CONFIG_124M, args.batch, ["fp32", "bf16"]
        else:
            cfg, batch, precisions = e2e.small_config(), 2, ["fp32"]
        train = [r for p in precisions for r in e2e.train_step_rows(batch=batch, cfg=cfg, device=device, precision=p)]
        report["e2e"] = {"config": cfg, "train_step": train}
        print(f"\nChapter-4 GPT ({cfg['n_layers']} layers, width {cfg['emb_dim']}, context {cfg['context_length']}), "
              f"batch {batch}: one AdamW training step")  # fmt: skip
        print("\n".join(e2e.table(train)))
        save()

    if "generate" in parts:
        if device == "cuda":
            rows = generate.run(device, generate.GPT_CONFIG_124M, batches=(1, 8), new_tokens=1000, uncached_tokens=100)
        else:
            rows = generate.run(device, generate.GPT_CONFIG_124M, batches=(1,), new_tokens=100, uncached_tokens=20)
        report["generate"] = rows
        print("\nGreedy generation, GPT-2 124M (random weights), 24-token prompt:")
        print("\n".join(generate.table(rows)))
        failures += [f"generate {r['variant']}" for r in rows if not r.get("same_tokens_as_uncached")]
        save()

    if "decode" in parts and device == "cuda":
        shapes = sorted(decode.SHAPES, key=decode.goal_first)
        rows, bandwidth = decode.run(device, shapes, decode.FLEX_SHAPES)
        report["decode"] = {"copy_gbs": bandwidth, "rows": rows}
        print("\n" + "\n".join(decode.table(rows, bandwidth)))
        failures += [f"decode {r}" for r in rows if r.get("ours_failed")]
        save()

    if "window" in parts and device == "cuda":
        kernel = window.kernel_rows(device, 2, 16, 16384, 128, 512, flex="flex" in args.providers)
        models = window.model_rows(device, n=4096, batch=2, smoke=False)
        report["window"] = {"kernel": kernel, "models": models}
        print("\n" + "\n".join(window.table(kernel, models)))
        failures += [f"window {r}" for r in kernel + models if r.get("ours_failed")]
        save()

    if "varlen" in parts:
        rows = varlen.run(device, flex="flex" in args.providers)
        report["varlen"] = rows
        print("\n" + "\n".join(varlen.table(rows)))
        failures += [f"varlen {r['provider']}" for r in rows if r.get("ours_failed")]
        save()

    if "host" in parts and device == "cuda":
        host_rows, profile = host.host_rows(device)
        variant_rows = host.variant_rows(device, host.VARIANT_SHAPES)
        report["host"] = {"host": host_rows, "variants": variant_rows, "profile": profile}
        print("\n" + "\n".join(host.table(host_rows, variant_rows)))
        failures += [f"host {r}" for r in host_rows + variant_rows if r.get("ours_failed")]
        save()

    if "hf" in parts:
        if hf.transformers_available():
            print("\nA Llama-3.2-1B-shaped Hugging Face model (random weights): attention.hf against HF's sdpa, eager")
            hf_path = out_dir / "hf.json"
            result = hf.run(device, hf.PARTS, smoke=False, on_rows=lambda r: write_json(hf_path, {**meta, **r}))
            print("\n".join(hf.table(result["rows"])))
            report["hf"] = result
            report["notes"] += result["notes"]
            failures += hf.failures(result)
        else:
            report["notes"].append("hf: transformers is not installed (pip install -e .[hf]); not measured")
        save()

    for note in report["notes"]:
        print(f"note: {note}")
    written = [save()]
    if report["rows"]:
        written += plot_sweep(report["rows"], out_dir, f"{meta['device']}, batch {args.batch}, causal, {meta['date']}")
    print("wrote " + ", ".join(str(p) for p in written))
    for failure in failures:
        print(f"ERROR: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
