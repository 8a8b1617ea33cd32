"""The CPU report: the chapter's MultiHeadAttention against ours and against the same layer calling PyTorch's
``scaled_dot_product_attention``, side by side in one process (the laptop issue's goals).

MultiHeadAttention d 768, 12 heads, batch 2: forward and forward+backward at N 256 and 1024, in eval (no
dropout) and in training with dropout 0.1; median of at least 10 calls each, the ratios against the
chapter and against SDPA, and each layer's peak memory over one forward+backward in a fresh process
(``bench.cpu_memory``). Also which of PyTorch's kernels our path ran: its fused flash kernel without
dropout; with dropout (no fused CPU kernel takes it) our query-chunked exact path, or for a small problem
SDPA's math path with its own dropout.
"""

from __future__ import annotations

import torch
from chapter3_flash.attention import reference as ref
from chapter3_flash.kernels import eager

from bench import cpu_memory
from bench.common import measure
from bench.gpt import SDPAMultiHeadAttention
from chapter3_flash import attention

WIDTH, HEADS, BATCH = 768, 12, 2
VARIANTS = {"chapter": ref.MultiHeadAttention, "ours": attention.MultiHeadAttention, "sdpa": SDPAMultiHeadAttention}


def sdpa_kernel_used(tokens: int) -> str:
    """The kernel PyTorch's dispatcher picks for our causal no-dropout call at this shape (its own choice)."""
    q = torch.randn(BATCH, HEADS, tokens, WIDTH // HEADS)
    choice = torch._fused_sdp_choice(q, q, q, None, 0.0, True)
    from torch.nn.attention import SDPBackend

    return SDPBackend(choice).name


def run(tokens_list=(256, 1024), dropouts=(0.0, 0.1), with_memory: bool = True) -> list[dict]:
    rows = []
    for tokens in tokens_list:
        x = torch.randn(BATCH, tokens, WIDTH)
        for p in dropouts:
            row = {"tokens": tokens, "dropout": p, "batch": BATCH, "width": WIDTH, "heads": HEADS, "mode": {}}
            for name, cls in VARIANTS.items():
                torch.manual_seed(123)
                layer = cls(WIDTH, WIDTH, tokens, p, HEADS).train(p > 0)
                xg = x.clone().requires_grad_()

                def fwd(layer=layer):
                    with torch.no_grad():
                        layer(x)

                def fwd_bwd(layer=layer, xg=xg):
                    xg.grad = None
                    layer.zero_grad(set_to_none=True)
                    layer(xg).sum().backward()

                f, fb = measure(fwd, "cpu", rep_ms=2000), measure(fwd_bwd, "cpu", rep_ms=2000)
                row["mode"][name] = {"fwd_ms": f.ms, "fwd_p20": f.p20, "fwd_p80": f.p80, "fwd_reps": f.reps}
                row["mode"][name].update(fwd_bwd_ms=fb.ms, fwd_bwd_p20=fb.p20, fwd_bwd_p80=fb.p80, fwd_bwd_reps=fb.reps)
                if with_memory and tokens == max(tokens_list):
                    row["mode"][name]["peak_bytes"] = cpu_memory.peak_bytes(name, tokens, p, BATCH, WIDTH, HEADS)
            row["our_path"] = f"SDPA {sdpa_kernel_used(tokens)}"
            if p > 0:
                small = BATCH * HEADS * tokens * tokens <= eager.SMALL_DROPOUT_ELEMENTS
                row["our_path"] = "SDPA math (dropout, small)" if small else "chunked exact (dropout)"
            rows.append(row)
    return rows


def table(rows: list[dict]) -> list[str]:
    lines = [
        f"{'N':>5} {'dropout':>7} {'mode':>8} {'chapter ms':>11} {'ours ms':>9} {'SDPA ms':>9} "
        f"{'ours/chapter':>13} {'ours/SDPA':>10} {'peak MiB chapter/ours/SDPA':>27}  our path"
    ]
    for r in rows:
        m = r["mode"]
        for mode in ("fwd", "fwd_bwd"):
            c, o, s = (m[n][f"{mode}_ms"] for n in ("chapter", "ours", "sdpa"))
            mem = ""
            if mode == "fwd_bwd" and "peak_bytes" in m["ours"]:
                mem = "/".join(f"{m[n]['peak_bytes'] / 2**20:.0f}" for n in ("chapter", "ours", "sdpa"))
            lines.append(
                f"{r['tokens']:>5} {r['dropout']:>7} {mode:>8} {c:>11.1f} {o:>9.1f} {s:>9.1f} "
                f"{c / o:>12.2f}x {s / o:>9.2f}x {mem:>27}  {r['our_path']}"
            )
    return lines
