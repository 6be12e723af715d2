"""Training curves: the metrics JSONL of a run drawn as one PNG (loss, learning rate, gradient
norm, throughput and every evaluation metric)."""

from __future__ import annotations

import io
import json

import fsspec


def read_metrics(run: str, storage_options: dict | None = None) -> list[dict]:
    """The per-step records of a run (``{run}/metrics.jsonl``)."""
    fs, path = fsspec.core.url_to_fs(run, **(storage_options or {}))
    text = fs.cat_file(f"{path.rstrip('/')}/metrics.jsonl").decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def plot_curves(history: list[dict], title: str) -> bytes:
    """A PNG of the curves, one panel per quantity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = sorted({k for r in history for k in r if k.startswith("eval/")})
    panels = ["loss", "lr", "grad_norm", "samples_per_s", *evals]
    cols = 3
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, key in zip(axes.flat, panels, strict=False):
        points = [(r["step"], r[key]) for r in history if key in r]
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="." if len(points) < 30 else None, lw=1)
        if key == "loss" and points and min(values) > 0:
            ax.set_yscale("log")
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()
