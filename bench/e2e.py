"""End to end: a chapter-4 GPT training step with each attention layer.

Like the book's training-speed table: tokens/s and peak memory of one forward + backward + AdamW step
of GPT-2 small (124M, context 1024), with the chapter's MultiHeadAttention, ours, and one on PyTorch's
scaled_dot_product_attention (median of at least 10 steps). Generation: ``bench/generate.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from chapter3_flash.attention import reference as ref
from chapter3_flash.attention.text import text_to_token_ids

from bench.common import is_oom, measure, peak_memory
from bench.gpt import GPT_CONFIG_124M, GPTModel, SDPAMultiHeadAttention
from chapter3_flash import attention

VARIANTS = {
    "chapter": ref.MultiHeadAttention,
    "ours": attention.MultiHeadAttention,
    "sdpa": SDPAMultiHeadAttention,
}


def _batch(batch: int, context: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    ids = text_to_token_ids()
    stream = ids.repeat((batch * (context + 1)) // len(ids) + 1)[: batch * (context + 1)].view(batch, context + 1)
    stream = stream.to(device)
    return stream[:, :-1], stream[:, 1:]  # inputs and next-token targets, (b, T) each


def train_step_rows(*, batch: int, cfg: dict, device: str, precision: str) -> list[dict]:
    """precision 'fp32' (TF32 matmuls, as PyTorch users run) or 'bf16' (autocast)."""
    rows = []
    inputs, targets = _batch(batch, cfg["context_length"], device)
    for name, attn_cls in VARIANTS.items():
        torch.manual_seed(123)
        row = {"variant": name, "precision": precision, "batch": batch, "context": cfg["context_length"]}
        model = opt = None
        try:
            model = GPTModel(cfg, attn_cls).to(device).train()
            opt = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)

            def step():
                with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
                    logits = model(inputs)
                    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                return loss

            torch.backends.cuda.matmul.allow_tf32 = True
            row["first_loss"] = step().item()
            row["peak_mem_bytes"] = peak_memory(step, device)
            t = measure(step, device, warmup_ms=100, rep_ms=600)
            row.update(step_ms=t.ms, step_p20=t.p20, step_p80=t.p80, reps=t.reps)
            row["tokens_per_s"] = batch * cfg["context_length"] / (t.ms * 1e-3)
        except RuntimeError as err:
            if not is_oom(err):
                raise
            row["error"] = "out of memory"
        finally:
            torch.backends.cuda.matmul.allow_tf32 = False
            model = opt = None  # free the GPU memory before the next variant
            if device == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
    return rows


def small_config() -> dict:
    """GPT-2 124M's width, heads and depth at context 128: a step a CPU takes in seconds (all three variants
    measured in about a minute)."""
    return {**GPT_CONFIG_124M, "context_length": 128}


def table(train: list[dict]) -> list[str]:
    lines = [f"{'variant':<8} {'precision':>9} {'step ms':>9} {'tokens/s':>10} {'peak mem':>12}"]
    for r in train:
        if "error" in r:
            lines.append(f"{r['variant']:<8} {r['precision']:>9} {r['error']:>33}")
            continue
        mem = f"{r['peak_mem_bytes'] / 2**30:.2f} GiB" if r["peak_mem_bytes"] is not None else "n/a"
        lines.append(
            f"{r['variant']:<8} {r['precision']:>9} {r['step_ms']:>9.1f} {r['tokens_per_s']:>10,.0f} {mem:>12}"
        )
    return lines
