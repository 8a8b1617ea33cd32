"""The KV-cache decode kernel against PyTorch's attentions: one new query per sequence over a cache.

Decoding is memory-bound: the bytes a step must read are the cache's keys and values, ``B * len * Hkv * D *
2 (K and V) * element size`` (the queries and outputs are noise). So each row reports GB/s and its share of
the copy bandwidth measured in the same run (a device-to-device copy, bytes read plus written), for ours
and for every SDPA backend that accepts the case (``q_len`` 1, ``is_causal=False``, ``enable_gqa``) and
FlexAttention. Every provider is captured in a CUDA graph and timed by its replays (decoding is
launch-bound at small sizes; graphs take the launch out of every provider alike). bf16.

    python -m bench.decode --json decode.json
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch
import torch.nn.functional as F
from chapter3_flash.kernels import flash_attention_with_kvcache

from bench import providers
from bench.common import graphed, measure, metadata, save_json, smoke_mode

BATCHES = (1, 8, 64)
CACHES = (512, 4096, 32768)
GROUPS = (1, 4, 8)
HEAD_DIMS = (64, 128)
KV_HEADS = 8  # query heads = KV_HEADS * group
SHAPES = list(itertools.product(BATCHES, CACHES, GROUPS, HEAD_DIMS))  # (B, cache, group, D)
FLEX_SHAPES = [(8, 4096, 8, 128), (1, 32768, 1, 128)]  # FlexAttention compiles per shape: two of them


def goal_first(shape) -> tuple:
    """The goal's shapes (cache >= 4k, batch >= 8) first, so a cut run still answers it."""
    B, T, _, _ = shape
    return (T < 4096 or B < 8, shape)


def copy_bandwidth_gbs(device: str) -> float:
    """Device-to-device copy of 1 GiB: bytes read plus bytes written per second."""
    n = 2**29 if device == "cuda" else 2**22
    a = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    b = torch.empty_like(a)
    ms = measure(lambda: b.copy_(a), device, flush_l2=False).ms
    return 2 * a.numel() * a.element_size() / (ms * 1e-3) / 1e9


def decode_providers(flex: bool) -> dict:
    def ours(q, k, v, length):
        return flash_attention_with_kvcache(q, k, v, cache_seqlens=length, causal=True)

    def sdpa(name):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def run(q, k, v, length):
            with sdpa_kernel(getattr(SDPBackend, name)):
                try:
                    return F.scaled_dot_product_attention(q, k[:, :, :length], v[:, :, :length], enable_gqa=True)
                except RuntimeError as err:
                    if "No available kernel" in str(err) or "No viable backend" in str(err):
                        raise providers.Unavailable(f"SDPA {name}: no kernel for this case") from err
                    raise

        return run

    table = {"ours": ours}
    for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH"):
        table["sdpa_" + name.split("_")[0].lower()] = sdpa(name)
    if flex:
        try:
            from torch.nn.attention.flex_attention import flex_attention

            compiled = torch.compile(flex_attention, dynamic=False)
            table["flex"] = lambda q, k, v, length: compiled(q, k[:, :, :length], v[:, :, :length], enable_gqa=True)
        except ImportError:
            pass
    return table


def run(device: str, shapes, flex_shapes=(), on_row=None) -> tuple[list[dict], float]:
    bandwidth = copy_bandwidth_gbs(device)
    rows = []
    fns = decode_providers(flex=bool(flex_shapes))
    for B, T, group, D in shapes:
        H = KV_HEADS * group
        q = torch.randn(B, H, 1, D, device=device, dtype=torch.bfloat16)
        k = torch.randn(B, KV_HEADS, T, D, device=device, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        cache_bytes = 2 * B * T * KV_HEADS * D * k.element_size()
        for name, fn in fns.items():
            if name == "flex" and (B, T, group, D) not in flex_shapes:
                continue
            row = dict(provider=name, batch=B, cache=T, group=group, head_dim=D, kv_heads=KV_HEADS, dtype="bf16")
            try:
                with torch.no_grad():
                    call = lambda fn=fn, q=q, k=k, v=v, T=T: fn(q, k, v, T)
                    out = call()
                    if name == "ours" or name == "sdpa_math":  # checked on the first sequence (memory)
                        ref = F.scaled_dot_product_attention(
                            q[:1].float(), k[:1].float(), v[:1].float(), enable_gqa=True
                        )
                        row["max_err"] = (out[:1].float() - ref).abs().max().item()
                    timing = measure(graphed(call, device), device)
                row.update(us=timing.ms * 1e3, us_p20=timing.p20 * 1e3, us_p80=timing.p80 * 1e3, reps=timing.reps)
                row["gbs"] = cache_bytes / (timing.ms * 1e-3) / 1e9
                row["pct_copy_bandwidth"] = 100 * row["gbs"] / bandwidth
            except providers.Unavailable as err:
                row["error"] = f"n/a: {err}"
            except Exception as err:  # ours: an error (the caller exits non-zero); peers: recorded as such
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
                if name == "ours":
                    row["ours_failed"] = True
            rows.append(row)
            if on_row:
                on_row(rows, bandwidth)
        del q, k, v
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows, bandwidth


def splits_rows(device: str, shapes, factors=(0.5, 1, 2, 4)) -> list[dict]:
    """Our kernel at num_splits = the default's choice times each factor: what the default leaves on the table."""
    rows = []
    for B, T, group, D in shapes:
        q = torch.randn(B, KV_HEADS * group, 1, D, device=device, dtype=torch.bfloat16)
        k = torch.randn(B, KV_HEADS, T, D, device=device, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        cache_bytes = 2 * B * T * KV_HEADS * D * k.element_size()
        chosen = decode_splits(B, T, group, D, device)
        for factor in factors:
            splits = max(1, round(chosen * factor))
            call = lambda splits=splits: flash_attention_with_kvcache(q, k, v, cache_seqlens=T, num_splits=splits)
            with torch.no_grad():
                t = measure(graphed(call, device), device)
            gbs = cache_bytes / (t.ms * 1e-3) / 1e9
            rows.append(
                dict(
                    batch=B,
                    cache=T,
                    group=group,
                    head_dim=D,
                    default_splits=chosen,
                    num_splits=splits,
                    us=t.ms * 1e3,
                    gbs=gbs,
                )
            )
            print(f"B{B} T{T} g{group} D{D}: splits {splits:>3} ({factor:g}x the default's {chosen}): {gbs:7.0f} GB/s")
    return rows


def append_rows(device: str, shapes) -> list[dict]:
    """A decode step that appends its token (as generation does): the append inside the decode kernel
    (``settings.current.fused_append``, one launch) against its own kernel first (two launches), each captured in a CUDA
    graph, in the same run."""
    from chapter3_flash.kernels import settings

    rows = []
    for B, T, group, D in shapes:
        q = torch.randn(B, KV_HEADS * group, 1, D, device=device, dtype=torch.bfloat16)
        k_cache = torch.randn(B, KV_HEADS, T + 1, D, device=device, dtype=torch.bfloat16)
        v_cache = torch.randn_like(k_cache)
        k_new, v_new = (torch.randn(B, KV_HEADS, 1, D, device=device, dtype=torch.bfloat16) for _ in range(2))
        row = dict(batch=B, cache=T, group=group, head_dim=D)
        outs = {}
        call = lambda: flash_attention_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=T)
        for name, fused in (("fused_us", True), ("separate_us", False)):
            with settings.override(fused_append=fused), torch.no_grad():
                outs[name] = call().float()
                row[name] = measure(graphed(call, device), device).ms * 1e3
        row["max_diff"] = (outs["fused_us"] - outs["separate_us"]).abs().max().item()
        rows.append(row)
        print(
            f"B{B} T{T} g{group} D{D}: append in decode {row['fused_us']:7.1f} us, own kernel {row['separate_us']:7.1f}"
            f" us ({row['separate_us'] / row['fused_us']:.2f}x), max diff {row['max_diff']:.1e}"
        )
    return rows


def decode_splits(B: int, T: int, group: int, D: int, device: str) -> int:
    """The split count the kernel picks for this shape when left to it (as flash_attention_with_kvcache does):
    one query per sequence, so the packed rows are the group's query heads."""
    from chapter3_flash.kernels import decode

    return decode.plan(B, KV_HEADS, group, T, D, "half", 0, 0).num_splits


def table(rows: list[dict], bandwidth: float) -> list[str]:
    names = list(dict.fromkeys(r["provider"] for r in rows))
    lines = [f"decode, bf16, q_len 1, {KV_HEADS} KV heads; copy bandwidth {bandwidth:.0f} GB/s. GB/s (% of copy):"]
    lines.append(f"{'B':>3} {'cache':>6} {'group':>5} {'D':>4} " + " ".join(f"{n:>17}" for n in names))
    for key in dict.fromkeys((r["batch"], r["cache"], r["group"], r["head_dim"]) for r in rows):
        cells = []
        for n in names:
            r = next(
                (r for r in rows if (r["batch"], r["cache"], r["group"], r["head_dim"]) == key and r["provider"] == n),
                None,
            )
            if r is None:
                cells.append(f"{'-':>17}")
            elif "gbs" not in r:
                cells.append(f"{'ERROR' if r.get('ours_failed') else 'n/a':>17}")
            else:
                cells.append(f"{r['gbs']:>9.0f} ({r['pct_copy_bandwidth']:>3.0f}%)")
        lines.append(f"{key[0]:>3} {key[1]:>6} {key[2]:>5} {key[3]:>4} " + " ".join(cells))
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.decode")
    ap.add_argument("--json", help="write the rows here (after every row)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on whatever device is here (a code check)")
    ap.add_argument("--splits", action="store_true", help="only the split-count experiment")
    ap.add_argument("--append", action="store_true", help="only a step that appends: in the decode kernel or not")
    args = ap.parse_args(argv)
    if args.smoke:
        smoke_mode()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.append:
        shapes = (
            [(2, 64, 2, 64)]
            if args.smoke
            else [(1, 1024, 1, 64), (1, 4096, 1, 64), (8, 4096, 1, 64), (8, 4096, 8, 128), (1, 32768, 1, 128)]
        )
        save_json(args.json, {"meta": metadata(device), "append": append_rows(device, shapes)})
        return 0
    if args.splits:
        shapes = (
            [(2, 64, 2, 64)]
            if args.smoke
            else [(8, 4096, 1, 64), (8, 4096, 8, 128), (1, 4096, 8, 64), (1, 32768, 1, 128)]
        )
        save_json(args.json, {"meta": metadata(device), "splits": splits_rows(device, shapes)})
        return 0
    if args.smoke:
        shapes, flex_shapes = [(2, 64, 2, 64)], []
    else:
        shapes, flex_shapes = sorted(SHAPES, key=goal_first), FLEX_SHAPES

    meta = metadata(device)

    def save(rows, bandwidth):
        save_json(args.json, {"meta": meta, "copy_gbs": bandwidth, "rows": rows})

    rows, bandwidth = run(device, shapes, flex_shapes, on_row=save)
    print("\n".join(table(rows, bandwidth)))
    failed = [r for r in rows if r.get("ours_failed")]
    for r in failed:
        print(f"ERROR ours B{r['batch']} T{r['cache']} g{r['group']} D{r['head_dim']}: {r['error']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
