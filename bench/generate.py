"""Greedy generation with chapter 4's GPT-2 124M (context 1024): tokens per second, same tokens everywhere.

- ``book uncached``: chapter 4's loop, the whole context recomputed per token (the KV-cache file's
  ``generate_text_simple_cached(use_cache=False)``); timed over fewer tokens, it is slow;
- ``book KV cache``: the book's ch04/03 model, its cache grown by ``torch.cat``;
- ``ours``: the same model after ``swap_attention``, through the book's own loop (the cache allocated
  once, each token through the split-KV decode kernel);
- ``ours graphed`` (GPU): the same layers, one token's whole step (embedding, 12 blocks, head, argmax)
  captured in one CUDA graph with the position in a device tensor, replayed per token (timed over the
  decode steps; the others' times include the prompt's one forward, a thousandth of their steps).

Batch 1 and 8, a 24-token prompt of real text, random weights seeded as chapter 4. Each row checks its
tokens against the uncached book's.

    python -m bench.generate --json generate.json
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
from chapter3_flash.attention.text import text_to_token_ids
from chapter3_flash.kernels import flash_attention_with_kvcache

from bench.book import kv_cache as book
from bench.common import metadata, save_json, smoke_mode, sync
from bench.gpt import GPT_CONFIG_124M
from chapter3_flash import attention

WARMUP_TOKENS = 64  # before each timed run: enough for the decode kernel to meet its split and unsplit variants


class GraphedDecoder:
    """One token's step of a swapped ch04/03 GPT captured in a CUDA graph. The step reads the token and its
    position from static device tensors and leaves the next token in them, so the host only replays."""

    def __init__(self, model: torch.nn.Module, last_token: torch.Tensor, position: int, max_new: int, capture=True):
        if not all(type(b.att) is attention.kv_cache.MultiHeadAttention for b in model.trf_blocks):
            raise TypeError("GraphedDecoder needs a model whose attention swap_attention converted")
        self.model = model
        b = last_token.shape[0]
        self.token = last_token.clone()  # (b, 1)
        self.pos = torch.full((b,), position, dtype=torch.int32, device=last_token.device)  # the token's position
        self.start = position
        self.out = torch.zeros(b, max_new, dtype=torch.long, device=last_token.device)
        self.graph = None
        if not capture:  # the same step, run eagerly (a CPU check of what the graph replays)
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile and warm up outside the capture, on the caches' spare room
            for _ in range(2):
                self._step(dry=True)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step(dry=False)

    @torch.no_grad()
    def _step(self, dry: bool) -> None:
        m = self.model
        x = m.drop_emb(m.tok_emb(self.token) + m.pos_emb(self.pos.long())[:, None])  # (b, 1, emb)
        for block in m.trf_blocks:
            x = x + block.drop_shortcut(self._attend(block.att, block.norm1(x)))
            x = x + block.drop_shortcut(block.ff(block.norm2(x)))
        logits = m.out_head(m.final_norm(x))  # (b, 1, vocab)
        nxt = logits[:, -1].argmax(dim=-1, keepdim=True)  # (b, 1)
        if not dry:
            self.out.index_copy_(1, (self.pos[:1] - self.start).long(), nxt)
            self.token.copy_(nxt)
            self.pos.add_(1)

    def _attend(self, att, h):
        b = h.shape[0]
        split = lambda name: getattr(att, name)(h).view(b, 1, att.num_heads, att.head_dim).transpose(1, 2)
        k_cache, v_cache = (t.transpose(1, 2) for t in att.cache_storage())  # (b, nh, T_max, hs), preallocated
        context = flash_attention_with_kvcache(
            split("W_query"),
            k_cache,
            v_cache,
            split("W_key"),
            split("W_value"),
            cache_seqlens=self.pos,
            causal=True,
            backend=attention.fused.current_backend(),  # the layers' choice (PyTorch's on a CPU)
        )  # (b, nh, 1, hs); appends this token's key and value at pos, in the graph
        return att.out_proj(context.transpose(1, 2).reshape(b, 1, att.d_out))

    def generate(self, steps: int) -> torch.Tensor:
        for _ in range(steps):
            if self.graph is None:
                self._step(dry=False)
            else:
                self.graph.replay()
        return self.out[:, :steps]


def _timed(fn, device):
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


def run(
    device: str, cfg: dict, batches, new_tokens: int, uncached_tokens: int, prompt_len: int = 24, on_row=None
) -> list[dict]:
    """Every variant at every batch size; ``on_row(rows)`` after each row (to print and save as it goes)."""
    rows = _Rows(on_row)
    ids = text_to_token_ids()
    ids = ids.repeat(-(-(prompt_len + max(batches)) // len(ids)))  # the text repeated for a long prompt
    for b in batches:
        prompt = torch.stack([ids[i : i + prompt_len] for i in range(b)]).to(device)  # (b, prompt_len)
        torch.manual_seed(123)
        model = book.GPTModel(cfg).to(device).eval()
        ours = attention.swap_attention(copy.deepcopy(model))
        reference, _ = _timed(
            lambda: book.generate_text_simple_cached(model, prompt, uncached_tokens, use_cache=False), device
        )
        cases = [("book uncached", uncached_tokens, model, False), ("book KV cache", new_tokens, model, True)]
        cases.append(("ours", new_tokens, ours, True))
        for name, n, m, cached in cases:
            # Warm-up: allocates, and compiles every kernel variant a growing cache meets (past the split point)
            book.generate_text_simple_cached(m, prompt, min(n, WARMUP_TOKENS), use_cache=cached)
            fn = lambda m=m, n=n, cached=cached: book.generate_text_simple_cached(m, prompt, n, use_cache=cached)
            tokens, seconds = _timed(fn, device)
            rows.append(
                _row(
                    name, b, n, seconds, tokens[:, prompt_len : prompt_len + uncached_tokens], reference[:, prompt_len:]
                )
            )
        ours.reset_kv_cache()
        with torch.no_grad():
            logits = ours(prompt, use_cache=True)  # the prompt through the cache; the decoder takes it from there
        first_token = logits[:, -1].argmax(-1, keepdim=True)
        name = "ours graphed" if device == "cuda" else "ours stepped"
        try:
            decoder = GraphedDecoder(ours, first_token, prompt_len, new_tokens, capture=device == "cuda")
            tokens, seconds = _timed(lambda: decoder.generate(new_tokens - 1), device)
        except Exception as err:  # an error of ours: recorded, the run exits non-zero
            rows.append(dict(variant=name, batch=b, error=f"{type(err).__name__}: {str(err)[:200]}"))
            continue
        tokens = torch.cat([first_token, tokens], dim=1)
        rows.append(_row(name, b, new_tokens - 1, seconds, tokens[:, :uncached_tokens], reference[:, prompt_len:]))
    return rows


class _Rows(list):
    def __init__(self, on_row):
        super().__init__()
        self.on_row = on_row

    def append(self, row) -> None:
        super().append(row)
        if self.on_row:
            self.on_row(self)


def _row(name, batch, n, seconds, tokens, reference) -> dict:
    return dict(
        variant=name,
        batch=batch,
        new_tokens=n,
        seconds=seconds,
        tokens_per_s=batch * n / seconds,
        same_tokens_as_uncached=bool(torch.equal(tokens.cpu(), reference.cpu())),
    )


def table(rows: list[dict]) -> list[str]:
    lines = [f"{'variant':<15} {'batch':>5} {'new tokens':>10} {'tokens/s':>10} {'same tokens':>11}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['variant']:<15} {r['batch']:>5} ERROR {r['error']}")
            continue
        lines.append(
            f"{r['variant']:<15} {r['batch']:>5} {r['new_tokens']:>10} {r['tokens_per_s']:>10,.0f} "
            f"{str(r['same_tokens_as_uncached']):>11}"
        )
    return lines


def host_profile(device: str, cfg: dict, tokens: int = 50) -> str:
    """cProfile of ours through the book's loop at batch 1 (host-bound there): functions by own time."""
    import cProfile
    import io
    import pstats

    torch.manual_seed(123)
    ours = attention.swap_attention(book.GPTModel(cfg).to(device).eval())
    prompt = text_to_token_ids()[None, :24].to(device)
    book.generate_text_simple_cached(ours, prompt, WARMUP_TOKENS, use_cache=True)  # compiles outside the profile
    prof = cProfile.Profile()
    prof.enable()
    book.generate_text_simple_cached(ours, prompt, tokens, use_cache=True)
    sync(device)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(22)
    return "\n".join(line for line in out.getvalue().splitlines() if line.strip())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.generate")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--smoke", action="store_true", help="a tiny model on whatever device is here (a code check)")
    ap.add_argument("--profile", action="store_true", help="only the host profile of ours through the book's loop")
    ap.add_argument("--prompt-len", type=int, default=24, help="prompt tokens (the text repeated; default 24)")
    args = ap.parse_args(argv)
    if args.smoke:
        smoke_mode()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    meta = metadata(device)

    def on_row(rows):
        print(table(rows[-1:])[-1], flush=True)
        save_json(args.json, {"meta": meta, "rows": list(rows)})

    print(table([])[0])
    if args.profile or (not args.smoke and device == "cuda"):  # where a token's host time goes, book's loop
        meta["host_profile"] = host_profile(device, GPT_CONFIG_124M)
        print(meta["host_profile"])
        save_json(args.json, {"meta": meta, "rows": []})
        if args.profile:
            return 0
    if args.smoke:
        cfg = {**GPT_CONFIG_124M, "context_length": 64, "emb_dim": 32, "n_heads": 2, "n_layers": 2, "drop_rate": 0.0}
        rows = run(device, cfg, batches=(1,), new_tokens=8, uncached_tokens=4, prompt_len=6, on_row=on_row)
    elif device == "cuda":
        new_tokens = min(1000, GPT_CONFIG_124M["context_length"] - args.prompt_len)
        rows = run(device, GPT_CONFIG_124M, (1, 8), new_tokens, 100, prompt_len=args.prompt_len, on_row=on_row)
    else:  # a CPU: the same model, fewer tokens
        rows = run(device, GPT_CONFIG_124M, (1,), 100, 20, prompt_len=args.prompt_len, on_row=on_row)
    return 0 if all(r.get("same_tokens_as_uncached") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
