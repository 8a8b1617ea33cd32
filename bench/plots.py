"""PNG plots of the sweep: TFLOP/s, time and peak memory against sequence length, one panel per setting."""

from __future__ import annotations

from pathlib import Path

METRICS = {
    "tflops": ("TFLOP/s", False),
    "ms": ("median time (ms)", True),
    "peak_mem_bytes": ("peak memory over inputs (MiB)", True),
}


def plot_sweep(rows: list[dict], out_dir: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    panels = sorted({(r["dtype"], r["head_dim"], r["dropout_p"], r["mode"]) for r in rows})
    if not panels:
        return []
    cols = min(4, len(panels))
    nrows = -(-len(panels) // cols)
    written = []
    for metric, (label, log_y) in METRICS.items():
        fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
        for ax, (dtype, d, p, mode) in zip(axes.flat, panels):
            group = [r for r in rows if (r["dtype"], r["head_dim"], r["dropout_p"], r["mode"]) == (dtype, d, p, mode)]
            for provider in sorted({r["provider"] for r in group}):
                pts = sorted((r["seq_len"], r[metric]) for r in group if r["provider"] == provider and r[metric])
                if not pts:
                    continue
                xs, ys = zip(*pts)
                if metric == "peak_mem_bytes":
                    ys = [y / 2**20 for y in ys]
                style = dict(linewidth=2.5, color="black") if provider == "ours" else dict(linewidth=1.2)
                ax.plot(xs, ys, marker="o", markersize=3, label=provider, **style)
            ax.set_xscale("log", base=2)
            if log_y:
                ax.set_yscale("log")
            ax.set_title(f"{dtype} D{d} p={p} {mode}", fontsize=9)
            ax.set_xlabel("sequence length", fontsize=8)
            ax.set_ylabel(label, fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        for ax in list(axes.flat)[len(panels) :]:
            ax.axis("off")
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        path = out_dir / f"sweep_{metric.split('_')[0] if metric != 'peak_mem_bytes' else 'memory'}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
