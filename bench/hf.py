"""A Hugging Face Llama on our kernels (``chapter3_flash.attention.hf``) against HF's own sdpa and eager attention.

Model: Llama-3.2-1B's shape (16 layers, width 2048, 32 query heads on 8 key/value heads of 64, vocab 128256) with
random weights, in bf16 on a GPU. On a CPU the same proportions scaled down (``CPU_CONFIG``: 2 layers, width 256,
4 query heads on 1) in float32, so that the run takes about a minute: the output says so.

- ``train``: one training step (forward + backward of the LM loss, no optimizer) on packed rows, documents of
  random lengths packed into 8 rows of 2048 tokens (CPU: 2 rows of 512), told by ``position_ids`` that restart
  per document. Ours packed (the varlen kernel), sdpa and eager packed (HF's block-diagonal ``N x N`` mask), and
  the same documents padded into one row each (sdpa with the padding mask, ours through varlen). Tokens/s count
  the real tokens.
- ``generate``: greedy generation at batch 1 and 8 (DynamicCache), 128 new tokens after a 128-token prompt
  (CPU: 16 after 32); tokens/s and whether the tokens equal sdpa's.
- ``memory`` (CPU): a padded batch at N 4096 (batch 2, one row half padding), one forward, peak resident memory
  above what existed before the call, each implementation in a fresh process (``bench.cpu_memory``'s method).
  Goal: ours at most half of sdpa's.

    python -m bench.hf --json bench/results/<device>/hf.json     # --parts train,generate,memory; --smoke
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

import torch

from bench.common import RESULTS, device_slug, is_oom, measure, metadata, peak_memory, save_json, smoke_mode, sync

LLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    vocab_size=128256,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    tie_word_embeddings=True,
)
CPU_CONFIG = {**LLAMA_1B, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 2}
CPU_CONFIG.update(num_attention_heads=4, num_key_value_heads=1, vocab_size=4096)
SMOKE_CONFIG = {**CPU_CONFIG, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2}
SMOKE_CONFIG.update(head_dim=32, vocab_size=256)
MEMORY_CONFIG = {**CPU_CONFIG, "num_hidden_layers": 1, "intermediate_size": 512, "vocab_size": 256}
MEMORY_TOKENS = 4096
PARTS = ("train", "generate", "memory")


def transformers_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def build(cfg: dict, device: str, dtype: torch.dtype):
    """The Llama of ``cfg`` with seeded random weights, eval mode (no dropout in Llama), HF's sdpa selected."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**cfg)
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.to(device).eval()


def packed_batch(rows: int, row_len: int, vocab: int, device: str, seed: int = 0):
    """Documents of random lengths (64 to row_len / 2 tokens) packed into ``rows`` rows of ``row_len`` tokens:
    ids and position_ids (B, row_len), labels with -100 at each document's first token (nothing predicts it from
    the previous document), and the document lengths per row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, row_len), generator=g)
    positions, docs = torch.empty(rows, row_len, dtype=torch.long), []
    for r in range(rows):
        lengths, left = [], row_len
        while left > 0:
            n = min(left, int(torch.randint(64, max(65, row_len // 2), (1,), generator=g)))
            lengths.append(n)
            left -= n
        positions[r] = torch.cat([torch.arange(n) for n in lengths])
        docs.append(lengths)
    labels = ids.masked_fill(positions == 0, -100)
    return ids.to(device), positions.to(device), labels.to(device), docs


def padded_batch(ids, docs, device: str):
    """The packed documents one per row, right-padded to the longest: ids, attention_mask, labels (-100 at pads)."""
    pieces = []
    for r, lengths in enumerate(docs):
        start = 0
        for n in lengths:
            pieces.append(ids[r, start : start + n].cpu())
            start += n
    longest = max(len(p) for p in pieces)
    out = torch.zeros(len(pieces), longest, dtype=torch.long)
    mask = torch.zeros_like(out)
    for i, p in enumerate(pieces):
        out[i, : len(p)], mask[i, : len(p)] = p, 1
    labels = out.masked_fill(mask == 0, -100)
    return out.to(device), mask.to(device), labels.to(device)


@contextlib.contextmanager
def implementation(model, impl: str):
    """Select ``impl`` ("ours", "sdpa", "eager") on the model; ours is attention.hf's registration."""
    from chapter3_flash.attention import hf

    model.set_attn_implementation(hf.register() if impl == "ours" else impl)
    try:
        yield
    finally:
        model.set_attn_implementation("sdpa")


def _attempt(row: dict, fn) -> dict:
    try:
        row.update(fn())
    except Exception as err:  # recorded in the row: an OOM of eager is a result, an error of ours a failure
        row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
        row["oom"] = is_oom(err)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return row


def train_rows(model, device: str, rows: int, row_len: int, on_row) -> list[dict]:
    ids, positions, labels, docs = packed_batch(rows, row_len, model.config.vocab_size, device)
    real_tokens = rows * row_len
    p_ids, p_mask, p_labels = padded_batch(ids, docs, device)
    cases = [
        ("ours", "packed", dict(input_ids=ids, position_ids=positions, labels=labels)),
        ("sdpa", "packed", dict(input_ids=ids, position_ids=positions, labels=labels)),
        ("eager", "packed", dict(input_ids=ids, position_ids=positions, labels=labels)),
        ("ours", "padded", dict(input_ids=p_ids, attention_mask=p_mask, labels=p_labels)),
        ("sdpa", "padded", dict(input_ids=p_ids, attention_mask=p_mask, labels=p_labels)),
    ]
    out = []
    for impl, layout, inputs in cases:

        def step(inputs=inputs):
            model.zero_grad(set_to_none=True)
            # use_cache=False: a training step; HF's sdpa and eager see the packing only without a cache
            model(**inputs, use_cache=False).loss.backward()

        def timed(impl=impl, step=step):
            with implementation(model, impl):
                t = measure(step, device, warmup_ms=0, rep_ms=0, min_reps=3)
                peak = peak_memory(step, device)
            return dict(ms=t.ms, tokens_per_s=real_tokens / t.ms * 1e3, peak_bytes=peak)

        row = dict(workload="train", impl=impl, layout=layout, rows=tuple(inputs["input_ids"].shape))
        out.append(_attempt(row, timed))
        on_row(out)
    model.zero_grad(set_to_none=True)
    return out


def generate_rows(model, device: str, batches, prompt_len: int, new_tokens: int, on_row) -> list[dict]:
    out = []
    for batch in batches:
        g = torch.Generator().manual_seed(batch)
        prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=g).to(device)
        expected = None
        for impl in ("sdpa", "ours", "eager"):

            def run(impl=impl, prompt=prompt):
                kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
                with implementation(model, impl), torch.no_grad():
                    model.generate(prompt, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
                    sync(device)
                    start = time.perf_counter()
                    tokens = model.generate(prompt, **kwargs)
                    sync(device)
                    seconds = time.perf_counter() - start
                    peak = peak_memory(lambda: model.generate(prompt, **kwargs), device)
                return dict(tokens=tokens, seconds=seconds, tokens_per_s=batch * new_tokens / seconds, peak_bytes=peak)

            row = _attempt(dict(workload="generate", impl=impl, batch=batch, new_tokens=new_tokens), run)
            tokens = row.pop("tokens", None)
            if impl == "sdpa":
                expected = tokens
            elif tokens is not None and expected is not None:
                row["same_tokens_as_sdpa"] = bool(torch.equal(tokens, expected))
            out.append(row)
            on_row(out)
    return out


def memory_rows(tokens: int) -> list[dict]:
    """Each implementation's peak in its own process (``--memory-case``)."""
    from bench.cpu_memory import MMAP_ENV

    rows = []
    for impl in ("ours", "sdpa", "eager"):
        env = {**os.environ, **MMAP_ENV}
        env.pop("TRITON_INTERPRET", None)
        cmd = [sys.executable, "-m", "bench.hf", "--memory-case", impl, "--tokens", str(tokens)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            rows.append(dict(workload="memory", impl=impl, error=proc.stderr[-300:]))
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    peaks = {r["impl"]: r.get("peak_bytes") for r in rows}
    if peaks.get("ours") and peaks.get("sdpa"):
        for r in rows:
            r["of_sdpa"] = r.get("peak_bytes", 0) / peaks["sdpa"]
    return rows


def memory_case(impl: str, tokens: int) -> dict:
    """One forward of a padded batch (2 rows of ``tokens``, the second half padding on the left) in this process:
    the peak resident memory above what existed before the call."""
    from bench.cpu_memory import call_peak_bytes
    from chapter3_flash import attention

    model = build(MEMORY_CONFIG, "cpu", torch.float32)
    ids = torch.randint(0, MEMORY_CONFIG["vocab_size"], (2, tokens))
    mask = torch.ones(2, tokens, dtype=torch.long)
    mask[1, : tokens // 2] = 0

    def forward():
        with torch.no_grad():
            model(ids, attention_mask=mask, use_cache=False)

    with implementation(model, impl), attention.use_backend("sdpa"):
        forward()  # warm-up: first-call allocations (the kernels' caches) are not the call's
        peak = call_peak_bytes(forward)
    return dict(workload="memory", impl=impl, tokens=tokens, batch=2, peak_bytes=peak)


def table(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        what = {"train": f"train {r.get('layout')} {r.get('rows')}", "generate": f"generate batch {r.get('batch')}"}
        label = what.get(r["workload"], f"memory padded N {r.get('tokens')}")
        if "error" in r:
            lines.append(f"{label:<34} {r['impl']:<6} {'out of memory' if r.get('oom') else r['error'][:80]}")
            continue
        rate = f"{r['tokens_per_s']:>10.0f} tok/s" if "tokens_per_s" in r else " " * 16
        peak = f"{r['peak_bytes'] / 2**20:>9.1f} MiB" if r.get("peak_bytes") is not None else ""
        extra = f"  {r['of_sdpa']:.2f}x sdpa's" if "of_sdpa" in r else ""
        extra += "" if r.get("same_tokens_as_sdpa", True) else "  tokens differ from sdpa's"
        lines.append(f"{label:<34} {r['impl']:<6} {rate} {peak}{extra}")
    return lines


def run(device: str, parts, smoke: bool, on_rows) -> dict:
    """Every part asked for; ``on_rows(result)`` after each row. Returns {"config", "rows", "notes"}."""
    from chapter3_flash import attention

    result: dict = {"rows": [], "notes": []}
    if smoke:
        cfg, dtype, train_shape, gen = SMOKE_CONFIG, torch.float32, (1, 128), ((1, 2), 8, 4)
    elif device == "cuda":
        cfg, dtype, train_shape, gen = LLAMA_1B, torch.bfloat16, (8, 2048), ((1, 8), 128, 128)
    else:
        cfg, dtype, train_shape, gen = CPU_CONFIG, torch.float32, (2, 512), ((1, 8), 32, 16)
        result["notes"].append(
            "CPU: Llama-3.2-1B's proportions scaled down to run in about a minute (2 layers, width 256, 4 query "
            "heads on 1 key/value head of 64, vocab 4096, float32); training on 2 packed rows of 512 tokens, "
            "generation of 16 tokens after 32. Ours is attention.hf on the kernels' PyTorch path (no GPU)."
        )
    result["config"] = cfg

    def on_row(_rows):
        on_rows(result)

    backend = attention.use_backend("sdpa") if device == "cpu" else contextlib.nullcontext()
    with backend:
        if "train" in parts or "generate" in parts:
            model = build(cfg, device, dtype)
            if "train" in parts:
                result["rows"] += train_rows(model, device, *train_shape, on_row=lambda rows: on_row(rows))
            if "generate" in parts:
                result["rows"] += generate_rows(model, device, *gen, on_row=lambda rows: on_row(rows))
            del model
    if "memory" in parts and device == "cpu":
        result["rows"] += memory_rows(256 if smoke else MEMORY_TOKENS)
    on_rows(result)
    return result


def failures(result: dict) -> list[str]:
    """Ours failing (not an eager OOM) is a failure of the run."""
    rows = result["rows"]
    return [f"hf {r['workload']} {r['impl']}: {r['error']}" for r in rows if r["impl"] == "ours" and "error" in r]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.hf", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the results here (default bench/results/<device>/hf.json)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"any of {','.join(PARTS)}")
    ap.add_argument("--smoke", action="store_true", help="a tiny model (a code check; times mean nothing)")
    ap.add_argument("--memory-case", choices=("ours", "sdpa", "eager"), help=argparse.SUPPRESS)
    ap.add_argument("--tokens", type=int, default=MEMORY_TOKENS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not transformers_available():
        print("bench.hf: transformers is not installed (pip install -e .[hf]); nothing measured")
        return 0
    if args.memory_case:
        print(json.dumps(memory_case(args.memory_case, args.tokens)))
        return 0
    parts = [p for p in args.parts.split(",") if p]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        ap.error(f"--parts: {bad} not among {list(PARTS)}")
    if args.smoke:
        smoke_mode()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    meta = metadata(device)
    path = args.json or str(RESULTS / device_slug(device) / "hf.json")
    printed = [0]

    def on_rows(result):
        for line in table(result["rows"][printed[0] :]):
            print(line, flush=True)
        printed[0] = len(result["rows"])
        save_json(path, {"meta": meta, **result})

    print(f"device {meta['device']} | torch {meta['torch']} | commit {meta['commit']}")
    result = run(device, parts, args.smoke, on_rows)
    for note in result["notes"]:
        print(f"note: {note}")
    print(f"wrote {path}")
    bad = failures(result)
    for failure in bad:
        print(f"ERROR: {failure}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
