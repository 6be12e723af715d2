"""``ctfactory report``: the cohort's QC report, one self-contained HTML file (pictures inlined)
plus the same figures as PNG, written under the cohort's ``report/``.

Sections: requested vs planned vs stored vs verified prevalence per finding, the co-occurrence
matrix, demographics, the metrics of ``ctfactory eval`` with the real reference beside them (when
``report/eval.json`` exists), a montage per finding (each row's volume ids beside it, to open
in ``ctfactory view``) and the model's prompt-pair pictures.
"""

from __future__ import annotations

import base64
import html
import json
import math
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from factory import vocab
from factory.evaluate.measure import row_finding
from factory.evaluate.run_summary import montage_picks, montage_png
from factory.schema import RunSettings
from factory.store.cohort import REPORT, CohortStore
from factory.viz import figure_png, pyplot

EVAL_FILE = "eval.json"
SHORT = {f.column: f.column.replace("Coronary artery wall", "Coronary") for f in vocab.FINDINGS}


def _png(fig) -> bytes:
    return figure_png(fig, bbox_inches="tight")


def prevalence_table(
    settings: RunSettings, plan: pd.DataFrame, manifest: pd.DataFrame
) -> pd.DataFrame:
    """Per finding, as shares of the volumes: requested (where the spec asked), planned, in the
    cohort and, for verified cohorts, stored with the finding and passing verification."""
    labels = settings.spec.get("labels", {})
    n = max(int(settings.n), 1)
    rows = []
    for f in vocab.FINDINGS:
        asked = labels.get(f.id, {})
        count = asked.get("count") if asked.get("count") is not None else asked.get("expected")
        row = {
            "finding": f.column,
            "requested": None if count is None else float(count) / n,
            "planned": float(plan[f.column].mean()) if len(plan) else None,
            "in_cohort": float(manifest[f.column].mean()) if len(manifest) else None,
        }
        if "verified" in manifest and manifest["verified"].notna().any():
            ok = manifest["verified"].fillna(False).astype(bool)
            row["verified"] = float((manifest[f.column].astype(bool) & ok).mean())
        rows.append(row)
    return pd.DataFrame(rows)


def prevalence_png(table: pd.DataFrame) -> bytes:
    columns = [c for c in ("requested", "planned", "in_cohort", "verified") if c in table]
    fig, ax = pyplot().subplots(figsize=(9, 6.5), dpi=90)
    y = np.arange(len(table))
    h = 0.8 / len(columns)
    for k, c in enumerate(columns):
        values = table[c].astype(float).fillna(0.0).to_numpy()
        ax.barh(y + k * h, values, h, label=c.replace("_", " "))
    ax.set_yticks(y + 0.4 - h / 2, [SHORT[f] for f in table["finding"]], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("share of volumes")
    ax.legend(fontsize=8)
    ax.set_title("prevalence per finding")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def cooccurrence(manifest: pd.DataFrame) -> np.ndarray:
    """(18, 18) counts of volumes with both findings (the diagonal: with the finding)."""
    x = manifest[list(vocab.COLUMNS)].to_numpy().astype(np.int64)
    return x.T @ x


def cooccurrence_png(counts: np.ndarray) -> bytes:
    fig, ax = pyplot().subplots(figsize=(7.5, 6.5), dpi=90)
    image = ax.imshow(np.log1p(counts), cmap="viridis")
    names = [SHORT[c] for c in vocab.COLUMNS]
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            if counts[i, j]:
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=5, color="w")
    fig.colorbar(image, ax=ax, label="log(1 + volumes)")
    ax.set_title("co-occurrence (volumes with both findings)")
    return _png(fig)


def demographics_png(manifest: pd.DataFrame) -> bytes:
    fig, (a, b) = pyplot().subplots(1, 2, figsize=(9, 3.2), dpi=90)
    for sex, colour in (("F", "tab:red"), ("M", "tab:blue")):
        ages = manifest["age"][manifest["sex"] == sex]
        a.hist(ages, bins=np.arange(15, 100, 5), alpha=0.6, label=sex, color=colour)
    a.set_xlabel("age (years)")
    a.set_ylabel("volumes")
    a.legend()
    a.set_title("age by sex")
    counts = manifest["sex"].value_counts()
    b.bar(counts.index.astype(str), counts.to_numpy(), color="tab:gray")
    b.set_title("sex")
    return _png(fig)


# ----- HTML -----------------------------------------------------------------------------------
def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "&ndash;"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return html.escape(str(value))


def _img(data: bytes, alt: str) -> str:
    src = base64.b64encode(data).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{src}">'


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def montage_index_html(url: str, manifest: pd.DataFrame) -> str:
    """The volumes of each montage row, by id, and how to open one in ``ctfactory view``."""
    picks = montage_picks(manifest)
    command = f"ctfactory view {shlex.quote(url)} --volume {shlex.quote(picks[0][1][0])}"
    return (
        _table(["montage row", "volumes, left to right"], [[f, ", ".join(i)] for f, i in picks])
        + f"<p>Open any of them in the 3D viewer, with its record: <code>{html.escape(command)}"
        + "</code> (docs/viewing.md).</p>"
    )


def metrics_html(result: Mapping | None) -> str:
    """The eval.json metrics, generated beside real; a pointer to ``ctfactory eval`` if none."""
    if result is None:
        return (
            "<p>No metrics yet: run <code>ctfactory eval COHORT_URL --reference REAL_DATASET"
            "</code>, then this report again.</p>"
        )
    fc = result["factual_correctness"]
    gen, real = fc["generated"], fc["real"]
    parts = [
        f"<p>Feature extractor: {html.escape(result.get('feature_extractor', '?'))}. "
        f"Reference: <code>{html.escape(str(result.get('reference', {}).get('root')))}</code> "
        f"({_fmt(result['volumes']['real'])} volumes); cohort volumes scored: "
        f"{_fmt(result['volumes']['generated'])}.</p>",
        _table(
            ["metric", "generated", "real"],
            [
                ["macro AUC (factual correctness)", gen["macro_auc"], real["macro_auc"]],
                ["macro precision", gen["macro_precision"], real["macro_precision"]],
                ["AUC ratio (generated / real)", fc["auc_ratio"], None],
                *[[k.replace("_", " "), v, None] for k, v in result["distances"].items()],
                ["HU quartiles", *[str(result["hu_quartiles"][k]) for k in ("generated", "real")]],
            ],
        ),
        "<h3>Per finding (classifier AUC)</h3>",
        _table(
            ["finding", "AUC generated", "AUC real", "positives generated", "positives real"],
            [
                [
                    c,
                    gen["per_finding"][c]["auc"],
                    real["per_finding"].get(c, {}).get("auc"),
                    gen["per_finding"][c]["positives"],
                    real["per_finding"].get(c, {}).get("positives"),
                ]
                for c in gen["per_finding"]
            ],
        ),
    ]
    measures = result.get("measurements", {})
    if measures.get("generated"):
        parts += [
            "<h3>Physical measurements (mean with the finding &minus; without; Welch p)</h3>",
            _table(
                ["finding", "measure", "generated", "p", "real", "p"],
                [
                    [
                        row_finding(c),
                        g["measure"],
                        g["difference"],
                        g["p_value"],
                        measures["real"].get(c, {}).get("difference"),
                        measures["real"].get(c, {}).get("p_value"),
                    ]
                    for c, g in measures["generated"].items()
                ],
            ),
        ]
    agreement = measures.get("phantom_agreement")
    if agreement:
        parts += [
            "<h3>Measurements against the phantom's ground truth (real reference)</h3>",
            _table(
                ["measure", "Pearson r", "volumes", "mean |difference|"],
                [
                    [k, v["pearson_r"], v["n"], v.get("mean_abs_difference")]
                    for k, v in agreement.items()
                    if isinstance(v, dict)
                ],
            ),
        ]
    clip = result.get("clip")
    if clip:
        r = clip["real_retrieval"]
        parts += [
            f"<h3>3D CLIP ({html.escape(str(result.get('clip_model')))})</h3>",
            _table(
                ["metric", "generated", "real"],
                [
                    ["CLIP score", clip["score"]["generated"], clip["score"]["real"]],
                    *[[f"real {k.replace('_', ' ')}", None, v] for k, v in r.items()],
                    ["real zero-shot macro AUC", None, clip["real_zero_shot"]["macro_auc"]],
                ],
            ),
        ]
    return "\n".join(parts)


CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;
font-size:13px;text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}
img{max-width:100%;border:1px solid #ddd;margin:4px 0}section{margin-bottom:2em}"""


def build_report(store: CohortStore, model_images: Mapping[str, bytes] | None = None) -> dict:
    """Every figure (PNG bytes, by file name) and the HTML text of the report."""
    settings = store.settings()
    manifest = store.read_manifest()
    plan = store.read_plan(list(vocab.COLUMNS)).to_pandas()
    stored = store.get(f"{REPORT}/{EVAL_FILE}")
    result = json.loads(stored) if stored is not None else None
    table = prevalence_table(settings, plan, manifest)
    figures = {
        "qc-prevalence.png": prevalence_png(table),
        "qc-cooccurrence.png": cooccurrence_png(cooccurrence(manifest)),
        "qc-demographics.png": demographics_png(manifest),
    }
    if len(manifest):
        figures["qc-montage.png"] = montage_png(store, manifest)
    pairs = {k: v for k, v in (model_images or {}).items() if k.startswith("pair-")}
    title = f"ct-factory QC report: cohort {settings.cohort_id}"
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{len(manifest):,} of {settings.n} planned volumes; model "
        f"<code>{html.escape(settings.model)}</code> "
        f"({html.escape(settings.model_hash[:12])}); sampler "
        f"{html.escape(json.dumps(settings.sampler))}.</p>",
        '<section id="prevalence"><h2>Prevalence: requested, planned, stored, verified</h2>',
        _table(
            list(table.columns),
            table.astype(object).where(table.notna(), None).to_numpy().tolist(),
        ),
        _img(figures["qc-prevalence.png"], "prevalence per finding"),
        "</section>",
        '<section id="cooccurrence"><h2>Co-occurrence</h2>',
        _img(figures["qc-cooccurrence.png"], "co-occurrence matrix"),
        "</section>",
        '<section id="demographics"><h2>Demographics</h2>',
        _img(figures["qc-demographics.png"], "age and sex"),
        "</section>",
        '<section id="metrics"><h2>Metrics, with the real reference</h2>',
        metrics_html(result),
        "</section>",
        '<section id="montage"><h2>Montage per finding</h2>',
        _img(figures["qc-montage.png"], "montage") if "qc-montage.png" in figures else "",
        montage_index_html(store.url, manifest) if len(manifest) else "",
        "</section>",
        '<section id="pairs"><h2>Prompt pairs (from the model card)</h2>',
        "".join(_img(data, name) for name, data in sorted(pairs.items()))
        or "<p>The model's card has no prompt-pair pictures.</p>",
        "</section>",
    ]
    page = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>'
        f"{html.escape(title)}</title><style>{CSS}</style></head><body>"
        + "\n".join(sections)
        + "</body></html>"
    )
    return {"figures": figures, "html": page}


def model_images(ref: str, storage_options: dict | None = None) -> dict[str, bytes]:
    """The PNGs a model's card shows (its ``images/``), or none if it cannot be read."""
    from factory.models.checkpoint import CheckpointError, load_checkpoint

    try:
        directory = Path(load_checkpoint(ref, storage_options=storage_options).directory)
    except (CheckpointError, OSError):
        return {}
    return {p.name: p.read_bytes() for p in sorted((directory / "images").glob("*.png"))}
