"""What a generation run reports: a text summary and a first QC picture, kept with the cohort.

``{cohort}/report/summary.txt`` and ``summary.json`` hold requested vs planned vs stored counts
per finding, volumes written, bytes and throughput; ``report/montage.png`` shows a few volumes
per finding (axial, coronal, sagittal, lung window) with their prompts.
"""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pandas as pd

from factory import vocab
from factory.cohort.summary import findings_lines
from factory.store.cohort import REPORT, CohortStore
from factory.viz import WINDOWS, aspects, figure_png, limits, planes, pyplot, show_plane

NO_FINDING = "No finding"


def montage_picks(manifest: pd.DataFrame, per_finding: int = 2) -> list[tuple[str, list[str]]]:
    """(finding, volume ids) per row of the montage: the first volumes of each finding present
    in the cohort, then volumes with no finding."""
    picks = []
    labels = manifest[list(vocab.COLUMNS)].to_numpy()
    for j, column in enumerate(vocab.COLUMNS):
        ids = manifest["volume_id"][labels[:, j] == 1].head(per_finding).tolist()
        if ids:
            picks.append((column, ids))
    normal = manifest["volume_id"][labels.sum(axis=1) == 0].head(per_finding).tolist()
    if normal:
        picks.append((NO_FINDING, normal))
    return picks


def montage_png(store: CohortStore, manifest: pd.DataFrame, per_finding: int = 2) -> bytes:
    """Rows of findings, each with ``per_finding`` volumes in three planes and their prompts."""
    picks = montage_picks(manifest, per_finding)
    prompts = dict(zip(manifest["volume_id"], manifest["prompt"], strict=True))
    window = limits(*WINDOWS["lung"])
    cols = 3 * per_finding
    fig, axes = pyplot().subplots(
        len(picks), cols, figsize=(2.2 * cols, 2.9 * len(picks)), dpi=90, squeeze=False
    )
    for r, (finding, ids) in enumerate(picks):
        for k in range(per_finding):
            for p in range(3):
                axes[r, 3 * k + p].set_axis_off()
            if k >= len(ids):
                continue
            volume = store.volume(ids[k], masks=False)
            ratio = aspects(volume.spacing)
            for p, (plane, image) in enumerate(planes(volume.hu).items()):
                ax = axes[r, 3 * k + p]
                show_plane(ax, image, window, ratio[plane])
                ax.set_title(plane, fontsize=7)
            caption = textwrap.shorten(prompts[ids[k]], 150, placeholder=" ...")
            axes[r, 3 * k + 1].text(
                0.5, -0.06, f"{ids[k]}\n" + "\n".join(textwrap.wrap(caption, 52)),
                transform=axes[r, 3 * k + 1].transAxes, ha="center", va="top", fontsize=5.5,
            )  # fmt: skip
        axes[r, 0].text(
            -0.08, 0.5, finding, transform=axes[r, 0].transAxes, rotation=90,
            ha="right", va="center", fontsize=8, fontweight="bold",
        )  # fmt: skip
    fig.suptitle(f"{store.url}: {len(manifest):,} volumes, lung window", fontsize=9)
    fig.tight_layout(rect=(0.02, 0, 1, 0.97), h_pad=3.0)
    return figure_png(fig)


def summary(plan, manifest: pd.DataFrame, totals, run) -> tuple[str, dict]:
    """The end-of-run summary as text and as JSON."""
    in_cohort = manifest[list(vocab.COLUMNS)].to_numpy().sum(axis=0)
    stored = int(manifest["bytes_stored"].sum()) if len(manifest) else 0
    raw = int(manifest["bytes_raw"].sum()) if len(manifest) else 0
    rate = totals.written / totals.wall_s if totals.wall_s else 0.0
    facts = {
        "url": run.url,
        "state": run.state,
        "planned": plan.n,
        "in_cohort": len(manifest),
        "written_this_run": totals.written,
        "skipped_this_run": totals.skipped,
        "recovered_manifest_rows": run.recovered,
        "bytes_stored": stored,
        "bytes_raw": raw,
        "compression_ratio": raw / stored if stored else None,
        "wall_s": totals.wall_s,
        "volumes_per_s": rate,
        "generate_s_per_volume": totals.generate_s / totals.written if totals.written else None,
        "write_s_per_volume": totals.write_s / totals.written if totals.written else None,
        "per_finding": {c: int(v) for c, v in zip(vocab.COLUMNS, in_cohort, strict=True)},
    }
    verification = verification_rates(manifest, run.settings.verify)
    if verification is not None:
        facts["verification"] = verification
    per_volume = stored / len(manifest) if len(manifest) else 0
    lines = [
        f"cohort {run.settings.cohort_id} at {run.url} ({run.state})",
        f"model {run.settings.model} ({run.settings.model_hash[:12]}), sampler "
        + ", ".join(f"{k} {v}" for k, v in run.settings.sampler.items()),
        "",
        *findings_lines(plan, in_cohort),
        "",
        f"volumes: {len(manifest):,} of {plan.n:,} in the cohort; this run wrote "
        f"{totals.written:,} in {totals.wall_s:.1f} s ({rate:.2f} volumes/s)"
        + (f", recovered {run.recovered:,} manifest rows" if run.recovered else "")
        + (f", {totals.skipped:,} already committed" if totals.skipped else ""),
        f"bytes: {stored / 2**20:,.1f} MiB stored ({per_volume / 2**10:,.0f} KiB per volume), "
        f"{raw / max(stored, 1):.1f}x smaller than raw int16 + uint8",
    ]
    if verification is not None:
        lines += ["", *verification_lines(verification)]
    warnings = run_warnings(totals, run)
    facts["warnings"] = warnings
    if warnings:
        lines += ["", *(f"warning: {w}" for w in warnings)]
    return "\n".join(lines), facts


def run_warnings(totals, run) -> list[str]:
    """What the user should act on, once per run and in plain words."""
    out = []
    if totals.prompts_cut:
        from factory.models.text import prompts_cut  # transformers, only when it is needed

        cut = prompts_cut(
            totals.prompts_cut, totals.written, run.text_tokens, totals.most_tokens_cut
        )
        out.append(
            f"{cut}; a shorter prompt style (prompt.style: structured) or a model with a larger "
            "text.max_tokens keeps them whole"
        )
    return out


def verification_rates(manifest: pd.DataFrame, verify: dict | None) -> dict | None:
    """Pass rates of label verification: overall, per checked finding (of the stored attempt)
    and per attempt count; None when the cohort was not verified."""
    if not verify or not len(manifest) or "verified" not in manifest:
        return None
    rows = manifest[manifest["verified"].notna()]
    failed = [set(json.loads(f)) for f in rows["verify_failed"]]
    per = {}
    for column in verify["findings"]:
        has = rows[column].astype(bool).to_numpy()
        ok = np.array([column not in f for f in failed], bool)
        per[column] = {
            "pass_rate": float(ok.mean()) if len(ok) else None,
            "pass_rate_with": float(ok[has].mean()) if has.any() else None,
            "pass_rate_without": float(ok[~has].mean()) if (~has).any() else None,
        }
    return {
        "classifier": verify["classifier"],
        "threshold": verify["threshold"],
        "max_attempts": verify["max_attempts"],
        "volumes": len(rows),
        "passed": int(rows["verified"].astype(bool).sum()),
        "attempts": {int(k): int(v) for k, v in rows["attempts"].value_counts().items()},
        "per_finding": per,
    }


def verification_lines(v: dict) -> list[str]:
    def pct(x):
        return "-" if x is None else f"{100 * x:.0f}%"

    lines = [
        f"verification ({v['classifier']}, threshold {v['threshold']}, at most "
        f"{v['max_attempts']} attempts): {v['passed']:,} of {v['volumes']:,} volumes passed; "
        "attempts " + ", ".join(f"{k}: {n:,}" for k, n in sorted(v["attempts"].items())),
    ]
    for column, r in v["per_finding"].items():
        lines.append(
            f"  {column}: {pct(r['pass_rate'])} pass (labelled with: {pct(r['pass_rate_with'])}, "
            f"without: {pct(r['pass_rate_without'])})"
        )
    return lines


def write_run_summary(store: CohortStore, plan, totals, run, per_finding: int = 2) -> str:
    """Write summary.txt, summary.json and montage.png under ``report/``; returns the text."""
    manifest = store.read_manifest()
    text, facts = summary(plan, manifest, totals, run)
    text += f"\nreport: {store.url}/{REPORT}/ (summary.txt, summary.json, montage.png)"
    store.put(f"{REPORT}/summary.txt", (text + "\n").encode())
    store.put(f"{REPORT}/summary.json", json.dumps(facts, indent=1, default=float).encode())
    if len(manifest):
        store.put(f"{REPORT}/montage.png", montage_png(store, manifest, per_finding))
    return text
