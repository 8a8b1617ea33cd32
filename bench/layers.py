"""Each chapter layer, the chapter's eager version against ours, on real text; then the ch03 bonus notebook's
variants (ch03/02_bonus_efficient-multihead-attention: the ways of computing the chapter's attention it charts),
a reader's copy of each against ours.

The input is the built-in English text as GPT-2 BPE tokens, embedded at GPT-2's width (768), so every
layer sees what chapter 4 feeds it. For each layer: the max error of both versions against the
reference layer run in float64, forward and forward+backward median time, peak memory, speedup.
"""

from __future__ import annotations

import copy
import functools

import torch
from chapter3_flash.attention import bonus
from chapter3_flash.attention import reference as ref
from chapter3_flash.attention.text import text_to_embeddings

from bench.book import mha_variants as book
from bench.common import is_oom, measure, peak_memory
from chapter3_flash import attention

WIDTH = 768  # GPT-2 small's embedding width
HEADS = 12
HEAD_DIM = WIDTH // HEADS


def layer_specs(context_length: int) -> list[tuple[str, tuple, int]]:
    """(class name, constructor args, input rank). Single heads use GPT-2's head size 64."""
    return [
        ("SelfAttention_v1", (WIDTH, HEAD_DIM), 2),
        ("SelfAttention_v2", (WIDTH, HEAD_DIM), 2),
        ("CausalAttention", (WIDTH, HEAD_DIM, context_length, 0.0), 3),
        ("MultiHeadAttentionWrapper", (WIDTH, HEAD_DIM, context_length, 0.0, HEADS), 3),
        ("MultiHeadAttention", (WIDTH, WIDTH, context_length, 0.0, HEADS), 3),
    ]


def variant_specs(context_length: int) -> list[tuple[str, type, type, tuple]]:
    """The ch03 bonus notebook's variants at GPT-2's width: (name, the reader's copy, ours, constructor args).
    MHAPyTorchSDPAWithoutFlash as the notebook writes it attends to later tokens (its mask read as "attend"); the
    row times the causal attention it means (the reader's copy with the mask's complement), which ours computes."""
    n = context_length
    return [
        ("MultiHeadAttentionCombinedQKV", book.MultiHeadAttentionCombinedQKV, bonus.MultiHeadAttentionCombinedQKV),
        ("MHAEinsum", book.MHAEinsum, bonus.MHAEinsum, (WIDTH, WIDTH, n, 0.0, HEADS)),
        ("MHAPyTorchScaledDotProduct", book.MHAPyTorchScaledDotProduct, bonus.MHAPyTorchScaledDotProduct),
        (
            "MHAPyTorchSDPAWithoutFlash",
            functools.partial(book.MHAPyTorchSDPAWithoutFlash, keep_below=True),
            bonus.MHAPyTorchSDPAWithoutFlash,
        ),
        ("MHAPyTorchClass", book.MHAPyTorchClass, bonus.MHAPyTorchClass),
        (
            "MHAPyTorchClass no weights",
            functools.partial(book.MHAPyTorchClass, need_weights=False),
            functools.partial(bonus.MHAPyTorchClass, need_weights=False),
        ),
    ]


def _all_specs(context_length: int) -> list[tuple[str, type, type, tuple, int]]:
    """(name, eager class, fused class, args, input rank): the chapter's layers, then the notebook's variants (whose
    constructors take (d_in, d_out, num_heads, context_length) unless their spec says otherwise)."""
    specs = [
        (name, getattr(ref, name), getattr(attention, name), args, rank)
        for name, args, rank in layer_specs(context_length)
    ]
    for name, theirs, ours, *args in variant_specs(context_length):
        specs.append((name, theirs, ours, args[0] if args else (WIDTH, WIDTH, HEADS, context_length), 3))
    return specs


def _time_layer(layer, x, device: str) -> dict:
    out: dict = {}
    try:
        with torch.no_grad():
            fwd = lambda: layer(x)
            out["fwd_mem"] = peak_memory(fwd, device)
            out["fwd_ms"] = measure(fwd, device).ms
        xg = x.detach().requires_grad_()

        def fwd_bwd():
            xg.grad = None
            layer.zero_grad(set_to_none=True)
            layer(xg).sum().backward()

        out["fwd_bwd_mem"] = peak_memory(fwd_bwd, device)
        out["fwd_bwd_ms"] = measure(fwd_bwd, device).ms
    except RuntimeError as err:
        if not is_oom(err):
            raise
        out["error"] = "out of memory"
        if device == "cuda":
            torch.cuda.empty_cache()
    return out


def run(
    *, batch: int, num_tokens: int, device: str, dtype: torch.dtype = torch.float32, only: tuple[str, ...] = ()
) -> list[dict]:
    """One row per chapter layer and notebook variant (or per layer named in ``only``): errors against float64,
    times and memory of reference and fused."""
    x3 = text_to_embeddings(width=WIDTH, num_tokens=num_tokens, batch=batch).to(device, dtype)  # (b, T, 768)
    x2 = x3[0]  # (T, 768): v1/v2 take the chapter's 2-D input
    rows = []
    if dtype == torch.float32 and device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    try:
        for name, theirs_cls, ours_cls, args, rank in _all_specs(context_length=num_tokens):
            if only and name not in only:
                continue
            x = x2 if rank == 2 else x3
            torch.manual_seed(123)
            theirs = theirs_cls(*args).to(device, dtype)
            torch.manual_seed(123)
            ours = ours_cls(*args).to(device, dtype)
            with torch.no_grad():
                exact = copy.deepcopy(theirs).double()(x.double())
                err_ref = (theirs(x).double() - exact).abs().max().item()
                err_ours = (ours(x).double() - exact).abs().max().item()
            row = {"layer": name, "shape": list(x.shape), "dtype": str(dtype).removeprefix("torch.")}
            row["max_err_reference"], row["max_err_fused"] = err_ref, err_ours
            row["reference"] = _time_layer(theirs, x, device)
            row["fused"] = _time_layer(ours, x, device)
            rows.append(row)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    return rows


def interpreter_agreement(num_tokens: int = 48) -> dict:
    """On a CPU: the fused MultiHeadAttention through Triton's interpreter, against float64."""
    x = text_to_embeddings(width=WIDTH, num_tokens=num_tokens)  # (1, T, 768)
    torch.manual_seed(123)
    theirs = ref.MultiHeadAttention(WIDTH, WIDTH, num_tokens, 0.0, HEADS)
    torch.manual_seed(123)
    ours = attention.MultiHeadAttention(WIDTH, WIDTH, num_tokens, 0.0, HEADS)
    with torch.no_grad(), attention.use_backend("triton"):
        exact = copy.deepcopy(theirs).double()(x.double())
        got = ours(x)
    return {"layer": "MultiHeadAttention", "shape": list(x.shape), "max_err": (got.double() - exact).abs().max().item()}


def table(rows: list[dict]) -> list[str]:
    head = (
        f"{'layer':<30} {'input':>15} {'err ref':>9} {'err ours':>9} "
        f"{'fwd ms ref/ours':>17} {'fwd+bwd ms ref/ours':>21} {'speedup':>8} {'peak mem ref/ours':>22} {'mem ratio':>9}"
    )
    lines = [head]
    for r in rows:
        a, b = r["reference"], r["fused"]
        if "error" in a or "error" in b:
            lines.append(
                f"{r['layer']:<30} {'x'.join(map(str, r['shape'])):>15}  {a.get('error', '')} {b.get('error', '')}"
            )
            continue
        speed = a["fwd_bwd_ms"] / b["fwd_bwd_ms"]
        mem_a, mem_b = a["fwd_bwd_mem"], b["fwd_bwd_mem"]
        mem = f"{mem_a / 2**20:>9.1f}/{mem_b / 2**20:<8.1f}MiB" if mem_a is not None else f"{'n/a':>22}"
        ratio = f"{mem_a / mem_b:>8.1f}x" if mem_a else f"{'n/a':>9}"
        shape = "x".join(map(str, r["shape"]))
        errs = f"{r['max_err_reference']:>9.1e} {r['max_err_fused']:>9.1e}"
        times = f"{a['fwd_ms']:>8.2f}/{b['fwd_ms']:<8.2f} {a['fwd_bwd_ms']:>10.2f}/{b['fwd_bwd_ms']:<10.2f}"
        lines.append(f"{r['layer']:<30} {shape:>15} {errs} {times} {speed:>7.2f}x {mem} {ratio}")
    return lines
