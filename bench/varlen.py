"""Packed batches of mixed lengths (issue 26): ``flash_attention_varlen`` against the ways to run the same tokens.

Workload (GPU): 32 causal sequences with lengths log-uniform in 64..4096 (a fixed draw), bf16, 16 heads of
head dim 128, forward and forward+backward, each of:

- ``ours packed``: ``flash_attention_varlen`` on the packed tokens, one launch per kernel;
- ``ours per sequence``: ``flash_attention`` on each sequence in turn, the summed dense cost of the same work
  (the goal: packed within 1.1x of it);
- ``ours padded``: ``flash_attention`` on the batch padded to its longest sequence (right padding with causal
  masking leaves the real rows exact);
- ``sdpa padded mask``: SDPA on the padded batch with the (B, 1, N, N) causal-and-valid-key mask (the goal:
  packed at least 3x faster);
- ``flex document``: FlexAttention on the packed tokens with a document mask (the goal: packed at least as
  fast);
- ``ours packed softcap`` / ``ours packed lse``: the packed call with a softcap of 50 / returning the lse (the
  goals: +10% at most / nothing measurable).

On a CPU the same rows at a scaled-down workload (8 sequences, 16..256 tokens, float32, 4 heads of 64) run in
well under a minute, plus ``sdpa per sequence`` (the goal there: packed no slower than SDPA sequence by
sequence; the packed PyTorch path holds one sequence's chunk at a time, never total x total).

    python -m bench.varlen                      # writes bench/results/<device>/varlen.json
    python -m bench.varlen --smoke              # tiny shapes, a code check on any device
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from chapter3_flash.kernels import flash_attention, flash_attention_varlen

from bench import providers
from bench.common import RESULTS, device_slug, measure, metadata, save_json, smoke_mode, smoke_mode_on

GPU_WORKLOAD = dict(num_seqs=32, min_len=64, max_len=4096, heads=16, head_dim=128, dtype=torch.bfloat16)
CPU_WORKLOAD = dict(num_seqs=8, min_len=16, max_len=256, heads=4, head_dim=64, dtype=torch.float32)
SMOKE_WORKLOAD = dict(num_seqs=3, min_len=4, max_len=24, heads=2, head_dim=16, dtype=torch.float32)


def lengths(num_seqs: int, min_len: int, max_len: int, seed: int = 0) -> list[int]:
    """Log-uniform lengths in [min_len, max_len], the same every run."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(num_seqs, generator=gen, dtype=torch.float64)
    return [int(round(math.exp(math.log(min_len) + float(x) * (math.log(max_len) - math.log(min_len))))) for x in u]


def build(lens: list[int], heads: int, head_dim: int, dtype, device: str) -> dict:
    """The packed tokens and everything the rows need: cu_seqlens, the padded (B, H, N, D) copies, the mask."""
    total, longest, B = sum(lens), max(lens), len(lens)
    q, k, v = (torch.randn(total, heads, head_dim, device=device, dtype=dtype) for _ in range(3))
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32, device=device)
    starts = cu.tolist()
    padded = []
    for t in (q, k, v):
        p = t.new_zeros(B, longest, heads, head_dim)  # (B, N, H, D), right padding
        for b, n in enumerate(lens):
            p[b, :n] = t[starts[b] : starts[b] + n]
        padded.append(p.transpose(1, 2))  # (B, H, N, D) view
    valid = torch.arange(longest, device=device)[None, :] < torch.tensor(lens, device=device)[:, None]  # (B, N)
    causal = torch.ones(longest, longest, dtype=torch.bool, device=device).tril()
    mask = (causal[None] & valid[:, None, :])[:, None]  # (B, 1, N, N): causal and a real key
    return dict(q=q, k=k, v=v, cu=cu, starts=starts, lens=lens, longest=longest, padded=padded, mask=mask)


def providers_for(data: dict, device: str, flex: bool) -> dict:
    """Name -> (fn taking (q, k, v) in that row's layout, the inputs it takes)."""
    cu, lens, longest, starts = data["cu"], data["lens"], data["longest"], data["starts"]
    packed = (data["q"], data["k"], data["v"])
    # What "auto" gives a user of this device: the kernels on a GPU, PyTorch's path on a CPU (named, since the
    # main job turns Triton's interpreter on for its agreement check, and "auto" would take it).
    backend = "auto" if device == "cuda" else "sdpa"

    def ours_packed(q, k, v, **kw):
        return flash_attention_varlen(q, k, v, cu, cu, longest, longest, causal=True, backend=backend, **kw)

    def per_sequence(fn):
        def run(q, k, v):
            outs = []
            for b, n in enumerate(lens):
                s = slice(starts[b], starts[b] + n)
                outs.append(fn(*(t[s].transpose(0, 1)[None] for t in (q, k, v)))[0].transpose(0, 1))
            return torch.cat(outs)

        return run

    table = {
        "ours packed": (ours_packed, packed),
        "ours packed softcap": (lambda q, k, v: ours_packed(q, k, v, softcap=50.0), packed),
        "ours packed lse": (lambda q, k, v: ours_packed(q, k, v, return_lse=True)[0], packed),
        "ours per sequence": (
            per_sequence(lambda q, k, v: flash_attention(q, k, v, causal=True, backend=backend)),
            packed,
        ),
        "ours padded": (lambda q, k, v: flash_attention(q, k, v, causal=True, backend=backend), data["padded"]),
        "sdpa padded mask": (
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=data["mask"]),
            data["padded"],
        ),
    }
    if device != "cuda":
        table["sdpa per sequence"] = (
            per_sequence(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
            packed,
        )
    if flex:
        try:
            table["flex document"] = (flex_document(data, device), packed)
        except providers.Unavailable as err:
            table["flex document"] = (err, packed)
    return table


def flex_document(data: dict, device: str):
    """FlexAttention on the packed tokens as one (1, H, total, D) sequence with a causal document mask."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as err:
        raise providers.Unavailable("FlexAttention is not in this PyTorch") from err
    total = data["q"].shape[0]
    doc = torch.repeat_interleave(
        torch.arange(len(data["lens"]), device=device), torch.tensor(data["lens"], device=device)
    )  # (total,): each token's sequence

    def document_causal(b, h, qi, kv):
        return (doc[qi] == doc[kv]) & (qi >= kv)

    block_mask = create_block_mask(document_causal, None, None, total, total, device=device)
    compiled = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v):
        out = compiled(*(t.transpose(0, 1)[None] for t in (q, k, v)), block_mask=block_mask)  # (1, H, total, D)
        return out[0].transpose(0, 1)

    return run


# Rounds: on a CPU every provider is timed once per round (at least MIN_REPS calls, ROUND_MS long), the rounds in
# alternating order, and a row reports the median of its rounds' medians (p20 / p80: the 20th and 80th percentile of
# those). A shared 2-core machine drifts by tens of percent within seconds; short rounds put every provider under the
# same drift. A GPU's timings hold still: one round of measure's usual length.
CPU_ROUNDS = 15
ROUND_MS = 20


def rows(workload: dict, device: str, flex: bool) -> list[dict]:
    lens = lengths(workload["num_seqs"], workload["min_len"], workload["max_len"])
    data = build(lens, workload["heads"], workload["head_dim"], workload["dtype"], device)
    common = dict(
        num_seqs=len(lens), total_tokens=sum(lens), longest=max(lens), heads=workload["heads"],
        head_dim=workload["head_dim"], dtype=str(workload["dtype"]).removeprefix("torch."), causal=True,
    )  # fmt: skip
    table = providers_for(data, device, flex)
    out = {name: dict(provider=name, **common) for name in table}
    timings: dict[str, dict[str, dict]] = {name: {"fwd": {}, "fwd_bwd": {}} for name in table}  # round -> Timing
    for name, (fn, _) in table.items():
        if isinstance(fn, Exception):
            out[name]["error"] = f"n/a: {fn}"
    if "flex document" in table and device != "cuda":
        # Trying its backward raises, and afterwards the compiled forward runs ~9x slower (recompiled): not tried.
        out["flex document"]["fwd_bwd_error"] = "n/a: FlexAttention has no backward on a CPU"
    rounds = 1 if device == "cuda" or smoke_mode_on() else CPU_ROUNDS
    kw = dict(rep_ms=ROUND_MS) if rounds > 1 else {}
    for r in range(rounds):
        names = [n for n in table if "error" not in out[n]]
        for name in names if r % 2 == 0 else names[::-1]:
            fn, inputs = table[name]
            try:
                if "fwd_error" not in out[name]:
                    with torch.no_grad():
                        timings[name]["fwd"][r] = measure(lambda fn=fn, inputs=inputs: fn(*inputs), device, **kw)
                if "fwd_bwd_error" not in out[name]:
                    timings[name]["fwd_bwd"][r] = measure(_fwd_bwd(fn, inputs), device, **kw)
            except providers.Unavailable as err:
                out[name]["error"] = f"n/a: {err}"
            except Exception as err:
                # A forward that ran keeps its time (FlexAttention has no CPU backward, for one).
                key = "fwd_bwd_error" if timings[name]["fwd"] and not timings[name]["fwd_bwd"] else "error"
                out[name][key] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
                out[name]["ours_failed"] = name.startswith("ours")
                if device == "cuda":
                    torch.cuda.empty_cache()
    packed = timings.get("ours packed")
    for name, row in out.items():
        if "error" in row:
            continue
        for mode in ("fwd", "fwd_bwd"):
            got = timings[name][mode]
            if not got:
                continue
            if len(got) == 1:
                (t,) = got.values()
                row.update({f"{mode}_ms": t.ms, f"{mode}_p20": t.p20, f"{mode}_p80": t.p80})
                continue
            medians = [t.ms for t in got.values()]
            q = statistics.quantiles(medians, n=10, method="inclusive")
            row.update({f"{mode}_ms": statistics.median(medians), f"{mode}_p20": q[1], f"{mode}_p80": q[7]})
            # The comparison that drift cannot bias: this row against ours packed within each round, the median.
            ratios = [t.ms / packed[mode][r].ms for r, t in got.items() if packed and r in packed[mode]]
            if ratios:
                row[f"{mode}_vs_packed"] = statistics.median(ratios)
        row["rounds"] = rounds
    return list(out.values())


def _fwd_bwd(fn, inputs):
    grads = [t.detach().requires_grad_() for t in inputs]
    do = torch.randn_like(fn(*inputs))

    def run():
        for t in grads:
            t.grad = None
        fn(*grads).backward(do)

    return run


def table(result_rows: list[dict]) -> list[str]:
    if not result_rows:
        return []
    r0 = result_rows[0]
    lines = [
        f"packed batch: {r0['num_seqs']} causal sequences, {r0['total_tokens']} tokens (longest {r0['longest']}), "
        f"H {r0['heads']} D {r0['head_dim']} {r0['dtype']}: ms (packed's speedup)"
    ]
    packed = next((r for r in result_rows if r["provider"] == "ours packed" and "fwd_ms" in r), None)

    def gain(r, mode):
        if f"{mode}_vs_packed" in r:  # rounds: the median of the within-round ratios
            return f"{r[f'{mode}_vs_packed']:.2f}x"
        return f"{r[f'{mode}_ms'] / packed[f'{mode}_ms']:.2f}x"

    for r in result_rows:
        if "fwd_ms" not in r:
            lines.append(f"  {r['provider']:<22} {r.get('error', r.get('fwd_error'))}")
        elif "fwd_bwd_ms" not in r:
            ratio = f"  ({gain(r, 'fwd')})" if packed else ""
            lines.append(f"  {r['provider']:<22} fwd {r['fwd_ms']:9.3f}{ratio}  fwd+bwd: {r.get('fwd_bwd_error')}")
        else:
            ratio = f"  ({gain(r, 'fwd')} / {gain(r, 'fwd_bwd')})" if packed and "fwd_bwd_ms" in packed else ""
            lines.append(f"  {r['provider']:<22} fwd {r['fwd_ms']:9.3f}  fwd+bwd {r['fwd_bwd_ms']:9.3f}{ratio}")
    if packed and "fwd_vs_packed" in packed:
        lines.append("  (ratios: the median over the rounds of each round's time over ours packed's)")
    return lines


def run(device: str, smoke: bool = False, flex: bool = True) -> list[dict]:
    """The main job's part: the device's workload (the smoke one with ``smoke``)."""
    workload = SMOKE_WORKLOAD if smoke else GPU_WORKLOAD if device == "cuda" else CPU_WORKLOAD
    return rows(workload, device, flex=flex)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.varlen", description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, help="write the rows here (default bench/results/<device>/varlen.json)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on whatever device is here (a code check)")
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile takes tens of seconds)")
    args = ap.parse_args(argv)
    if args.smoke:
        smoke_mode()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = args.json or RESULTS / device_slug(device) / "varlen.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {"meta": metadata(device), "rows": run(device, smoke=args.smoke, flex=not args.no_flex)}
    save_json(str(path), result)
    print("\n".join(table(result["rows"])))
    print(f"wrote {path}")
    return 1 if any(r.get("ours_failed") for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
