"""Training curves: the metrics JSONL of a run drawn as one PNG (loss, learning rate, gradient
norm, throughput and every evaluation metric)."""

from __future__ import annotations

import json

import fsspec

from factory.viz import figure_png, pyplot


def read_metrics(run: str, storage_options: dict | None = None) -> list[dict]:
    """The per-step records of a run (``{run}/metrics.jsonl``)."""
    fs, path = fsspec.core.url_to_fs(run, **(storage_options or {}))
    text = fs.cat_file(f"{path.rstrip('/')}/metrics.jsonl").decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def panel_groups(history: list[dict]) -> dict[str, list[str]]:
    """Evaluation panels: ``eval/x`` alone, and ``eval/x/a``, ``eval/x/b``, ... together as
    ``eval/x`` (one line per finding, say)."""
    groups: dict[str, list[str]] = {}
    for key in sorted({k for r in history for k in r if k.startswith("eval/")}):
        panel = "/".join(key.split("/")[:2])
        groups.setdefault(panel, []).append(key)
    return groups


def plot_curves(history: list[dict], title: str) -> bytes:
    """A PNG of the curves, one panel per quantity."""
    plt = pyplot()
    groups = panel_groups(history)
    panels = ["loss", "lr", "grad_norm", "samples_per_s", *groups]
    cols = 3
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        keys = groups.get(panel, [panel])
        values: tuple = ()
        for key in keys:
            points = [(r["step"], r[key]) for r in history if key in r]
            if points:
                steps, values = zip(*points, strict=True)
                label = key[len(panel) + 1 :] if len(keys) > 1 else None
                ax.plot(steps, values, marker="." if len(points) < 30 else None, lw=1, label=label)
        if len(keys) > 1:
            ax.legend(fontsize=6, ncol=2)
        if panel == "loss" and values and min(values) > 0:
            ax.set_yscale("log")
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return figure_png(fig, dpis=(100,))
