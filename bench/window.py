"""Sliding windows and the bonus models' blocks (GPU; ``--smoke`` checks the code on any device).

1. The kernel: causal attention with a window of 512 keys at N 16384 against our full causal attention
   (the goal: at least 8x faster, forward and forward+backward), FlexAttention's sliding window and
   SDPA with the window as an explicit mask, all in this run. bf16, B 2, H 16, D 128.
2. The models: a Qwen3-0.6B-shaped and a Gemma-3-270M-shaped block (the book's shapes, random weights,
   bf16, sliding-window 512 on Gemma's local layer) trained one step (forward, backward, AdamW) with the
   book's attention and with ours after ``swap_attention``: time and peak memory.

    python -m bench.window --json window.json
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
from chapter3_flash.kernels import flash_attention
from chapter3_flash.kernels.masks import visible_mask

from bench import providers
from bench.book import gemma3, qwen3
from bench.book.rope import compute_rope_params
from bench.common import measure, metadata, peak_memory, save_json, smoke_mode
from chapter3_flash import attention


def window_providers(window: int, n: int, device: str, flex: bool) -> dict:
    """Each called as fn(q, k, v): causal, keys i - window < j <= i (the book's and Gemma's rule)."""
    table = {
        "ours full causal": lambda q, k, v: flash_attention(q, k, v, causal=True),
        "ours window": lambda q, k, v: flash_attention(q, k, v, causal=True, window_size=(window - 1, -1)),
    }
    keep = visible_mask(n, n, causal=True, window=(window - 1, -1), device=device)  # (n, n) bool: True attends
    for name in ("EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "FLASH_ATTENTION"):
        run = providers.sdpa(name, attn_mask=keep)

        def masked(q, k, v, run=run):
            return run(q, k, v, 0.0)

        table[f"sdpa_{name.split('_')[0].lower()} mask"] = masked
    if flex:
        try:
            fn = providers.flex(window=window)
            table["flex window"] = lambda q, k, v: fn(q, k, v, 0.0)
        except providers.Unavailable:
            pass
    return table


def kernel_rows(device: str, B: int, H: int, N: int, D: int, window: int, flex: bool, only=None) -> list[dict]:
    rows = []
    q, k, v = (torch.randn(B, H, N, D, device=device, dtype=torch.bfloat16) for _ in range(3))
    do = torch.randn_like(q)
    for name, fn in window_providers(window, N, device, flex).items():
        if only is not None and name not in only:
            continue
        row = dict(provider=name, batch=B, heads=H, seq_len=N, head_dim=D, window=window, dtype="bf16")
        try:
            with torch.no_grad():
                f = measure(lambda fn=fn: fn(q, k, v), device)
            qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

            def fwd_bwd(fn=fn):
                qg.grad = kg.grad = vg.grad = None
                fn(qg, kg, vg).backward(do)

            fb = measure(fwd_bwd, device)
            row.update(
                fwd_ms=f.ms, fwd_p20=f.p20, fwd_p80=f.p80, fwd_bwd_ms=fb.ms, fwd_bwd_p20=fb.p20, fwd_bwd_p80=fb.p80
            )
        except providers.Unavailable as err:
            row["error"] = f"n/a: {err}"
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
            row["ours_failed"] = name.startswith("ours")
            if device == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
    return rows


def _block_step(block, inputs, device: str):
    opt = torch.optim.AdamW(block.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        block(*inputs).float().pow(2).mean().backward()
        opt.step()

    return step


def model_rows(device: str, n: int, batch: int, smoke: bool) -> list[dict]:
    rows = []
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shrink = (lambda c: {**c, "emb_dim": 64, "hidden_dim": 96, "head_dim": 32}) if smoke else (lambda c: c)
    qcfg = shrink({**qwen3.QWEN3_06B_SHAPE, "qk_norm": True, "dtype": dtype})
    gcfg = shrink({**gemma3.GEMMA3_270M_SHAPE, "dtype": dtype})
    window = min(gcfg["sliding_window"], n // 4)
    x = lambda c: torch.randn(batch, n, c["emb_dim"], device=device, dtype=dtype)
    cases = []
    torch.manual_seed(0)
    cos, sin = (t.to(device) for t in compute_rope_params(qcfg["head_dim"], theta_base=1e6, context_length=n))
    cases.append(("Qwen3-0.6B block", qwen3.TransformerBlock(qcfg), (x(qcfg), qwen3.causal_mask(n, device), cos, sin)))
    cos, sin = (t.to(device) for t in compute_rope_params(gcfg["head_dim"], context_length=n))
    global_mask, local_mask = gemma3.masks(n, window, device)
    cases.append(
        (
            f"Gemma-3-270M local block (window {window})",
            gemma3.TransformerBlock(gcfg, "sliding_attention"),
            (x(gcfg), global_mask, local_mask, cos, sin),
        )
    )
    for name, block, inputs in cases:
        block = block.to(device)
        for variant, layer in (("book", block), ("ours", attention.swap_attention(copy.deepcopy(block)))):
            row = dict(model=name, variant=variant, batch=batch, seq_len=n, dtype=str(dtype).removeprefix("torch."))
            try:
                step = _block_step(layer, inputs, device)
                row["peak_mem_bytes"] = peak_memory(step, device)
                t = measure(step, device, rep_ms=300)
                row.update(step_ms=t.ms, step_p20=t.p20, step_p80=t.p80, reps=t.reps)
            except Exception as err:
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
                row["ours_failed"] = variant == "ours"
            rows.append(row)
    return rows


def table(kernel: list[dict], models: list[dict]) -> list[str]:
    lines = []
    if kernel:
        r0 = kernel[0]
        lines.append(
            f"window {r0['window']} at N {r0['seq_len']}, B {r0['batch']} H {r0['heads']} D {r0['head_dim']} bf16: ms"
        )
        full = next((r for r in kernel if r["provider"] == "ours full causal" and "fwd_ms" in r), None)
        for r in kernel:
            if "fwd_ms" not in r:
                lines.append(f"  {r['provider']:<22} {r['error']}")
                continue
            gain = (
                f"  ({full['fwd_ms'] / r['fwd_ms']:.1f}x / {full['fwd_bwd_ms'] / r['fwd_bwd_ms']:.1f}x vs full)"
                if full
                else ""
            )
            lines.append(f"  {r['provider']:<22} fwd {r['fwd_ms']:8.3f}  fwd+bwd {r['fwd_bwd_ms']:8.3f}{gain}")
    for r in models:
        if "step_ms" not in r:
            lines.append(f"{r['model']:<38} {r['variant']:<5} ERROR {r['error']}")
            continue
        mem = f"{r['peak_mem_bytes'] / 2**30:.2f} GiB" if r["peak_mem_bytes"] is not None else "n/a"
        lines.append(f"{r['model']:<38} {r['variant']:<5} step {r['step_ms']:8.2f} ms  peak {mem}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.window")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on whatever device is here (a code check)")
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile takes tens of seconds)")
    args = ap.parse_args(argv)
    if args.smoke:
        smoke_mode()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = {"meta": metadata(device)}

    def save():
        save_json(args.json, result)

    shape = (1, 2, 64, 16, 16) if args.smoke else (2, 16, 16384, 128, 512)  # B, H, N, D, window
    result["kernel"] = kernel_rows(device, *shape, flex=False)
    save()
    result["models"] = model_rows(device, n=64 if args.smoke else 4096, batch=1 if args.smoke else 2, smoke=args.smoke)
    save()
    if not args.smoke and not args.no_flex:  # last: FlexAttention compiles for tens of seconds
        result["kernel"] += kernel_rows(device, *shape, flex=True, only=("flex window",))
        save()
    print("\n".join(table(result["kernel"], result["models"])))
    return 1 if any(r.get("ours_failed") for r in result["kernel"] + result["models"]) else 0


if __name__ == "__main__":
    sys.exit(main())
