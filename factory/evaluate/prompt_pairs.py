"""The prompt-pair experiment: does the prompt change a generated volume the way the finding
changes a real phantom?

For four findings a model generates prompt pairs ("with" / "without" the finding, the same seed
for both prompts of a pair), and a physical yardstick that needs no network measures each
volume in fixed zones: the fraction of the zone denser than -300 HU (pleural effusion,
consolidation, cardiomegaly); for emphysema the lung zone's 15th HU percentile (Perc15) and the
fraction below -950 HU (%LAA-950). The zones come from a phantom dataset's anatomy masks, so
every volume is measured in the same place whatever anatomy the model drew. Real phantoms
rendered with and without each finding (the same subjects) give the direction and size a
faithful model should show (``factory.phantom.render.render_subjects``). ``ctfactory card``
runs it and writes the results into a model card.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from factory.evaluate.measure import (
    DENSE_HU,
    LAA_HU,
    PERC15,
    paired_stats,
    row_finding,
    row_id,
    zone_fraction,
    zone_percentile,
)
from factory.models.generator import Generator, Request
from factory.viz import busiest_slices, columns_figure

LUNG_WINDOW = (-1000.0, 200.0)
PARENCHYMA_WINDOW = (-1000.0, -700.0)  # aerated lung only: shows changes in lung density
MAX_PNG_BYTES = 250_000
PICTURE_SEEDS = 2


@dataclass(frozen=True)
class Yardstick:
    """One measure of a fixed zone: the fraction of its voxels above or below ``value`` HU, or
    its ``value``-th HU percentile."""

    zone: str  # "lungs" or "heart"
    kind: Literal["above", "below", "percentile"]
    value: float
    key: str  # names the measure in the card's results after the finding's first (row_id)

    @property
    def text(self) -> str:
        if self.kind == "percentile":
            return f"{self.zone} zone Perc{self.value:g} (HU)"
        return f"{self.zone} zone {'>' if self.kind == 'above' else '<'} {self.value:g} HU"

    def __call__(self, hu: np.ndarray, zone_masks: Mapping[str, np.ndarray]) -> float:
        if self.kind == "percentile":
            return zone_percentile(hu, zone_masks[self.zone], self.value)
        return zone_fraction(hu, zone_masks[self.zone], self.value, self.kind == "above")


LUNGS_DENSE = Yardstick("lungs", "above", DENSE_HU, "dense")


@dataclass(frozen=True)
class Pair:
    """One finding's prompt pair, the attributes of its real reference, its yardsticks and
    the window its picture is drawn in."""

    finding: str
    with_prompt: str
    without_prompt: str
    attributes: Mapping[str, object]
    yardsticks: tuple[Yardstick, ...]
    window: tuple[float, float] = LUNG_WINDOW
    window_name: str = "lung window"

    def rows(self) -> list[tuple[str, Yardstick]]:
        """(row id, yardstick) for each yardstick, named as ``measure.row_id`` names them."""
        return [(row_id(self.finding, i, y.key), y) for i, y in enumerate(self.yardsticks)]


# Wording follows the phantom reports the model was trained on (factory/vocab.py phrases):
# severity words, "Heart size is normal.", one lobe per consolidation (the phantom draws one
# lobe, so "both lower lobes" never occurs in training). The effusion pair is as issued.
PAIRS: tuple[Pair, ...] = (
    Pair(
        "pleural_effusion",
        "large bilateral pleural effusion",
        "no pleural effusion",
        {"laterality": "bilateral", "severity": "large"},
        (LUNGS_DENSE,),
    ),
    Pair(
        "cardiomegaly",
        "severe cardiomegaly, the heart is severely enlarged",
        "heart size is normal",
        {"severity": "severe"},
        (Yardstick("heart", "above", DENSE_HU, "dense"),),
    ),
    Pair(
        "emphysema",
        "severe centrilobular emphysema",
        "no emphysema",
        {"severity": "severe", "type": "centrilobular"},
        (
            Yardstick("lungs", "percentile", PERC15, "perc15"),
            Yardstick("lungs", "below", LAA_HU, "laa950"),
        ),
        PARENCHYMA_WINDOW,
        "parenchyma window",
    ),
    Pair(
        "consolidation",
        "consolidation in the right lower lobe",
        "no consolidation",
        {"lobe": "RLL"},
        (LUNGS_DENSE,),
    ),
)


def pair_results(
    pair: Pair,
    with_hu: Sequence[np.ndarray],
    without_hu: Sequence[np.ndarray],
    real_with: Sequence[np.ndarray],
    real_without: Sequence[np.ndarray],
    zone_masks: Mapping[str, np.ndarray],
) -> dict[str, dict]:
    """Each of a pair's yardsticks on its generated pairs (paired statistics) and on the real
    phantoms with and without the finding, by row id."""
    results = {}
    for row, yardstick in pair.rows():
        result = paired_stats(
            [yardstick(h, zone_masks) for h in with_hu],
            [yardstick(h, zone_masks) for h in without_hu],
        )
        result["real_with"] = float(np.mean([yardstick(h, zone_masks) for h in real_with]))
        result["real_without"] = float(np.mean([yardstick(h, zone_masks) for h in real_without]))
        result.update(
            measure=yardstick.text,
            with_prompt=pair.with_prompt,
            without_prompt=pair.without_prompt,
        )
        results[row] = result
    return results


@dataclass
class PairRun:
    """What one pair's run gave: its results by row id, its picture, and every generated HU
    volume (for the HU quartiles)."""

    results: dict[str, dict]
    picture: bytes
    generated: list[np.ndarray]
    settings: dict


def run_pair(
    generator: Generator,
    pair: Pair,
    seeds: Sequence[int],
    real_with: Sequence[np.ndarray],
    real_without: Sequence[np.ndarray],
    zone_masks: Mapping[str, np.ndarray],
    steps: int | None = None,
    guidance: float | None = None,
    batch_size: int = 8,
) -> PairRun:
    """Generate ``pair``'s prompts from each seed (``steps`` and ``guidance`` None: the model's
    own), measure them against the real phantoms and draw the first seeds beside a phantom."""
    requests = [
        Request(prompt, seed, steps, guidance)
        for seed in seeds
        for prompt in (pair.with_prompt, pair.without_prompt)
    ]
    settings = generator.check(requests[0])
    volumes = generator.generate(requests, batch_size=batch_size)
    with_hu = [v.hu for v in volumes[0::2]]
    without_hu = [v.hu for v in volumes[1::2]]
    results = pair_results(pair, with_hu, without_hu, real_with, real_without, zone_masks)
    panels: list[tuple[str, np.ndarray]] = []
    for i in range(min(PICTURE_SEEDS, len(seeds))):
        panels.append((f'seed {seeds[i]}, without: "{pair.without_prompt}"', without_hu[i]))
        panels.append((f'seed {seeds[i]}, with: "{pair.with_prompt}"', with_hu[i]))
    panels.append(("phantom without (reference)", real_without[0]))
    panels.append(("phantom with (reference)", real_with[0]))
    title = (
        f"{pair.finding.replace('_', ' ')}: generated pairs (same seed) and a phantom "
        f"reference; {pair.window_name} {pair.window[0]:g}..{pair.window[1]:g} HU"
    )
    centre = busiest_slices(real_with, real_without)
    spacing = generator.config.spacing_mm
    picture = columns_figure(title, panels, spacing, centre, pair.window, MAX_PNG_BYTES)
    return PairRun(results, picture, [v.hu for v in volumes], settings)


def fmt(value: float | None, digits: int = 3) -> str:
    """A number for the card: HU to one decimal, fractions to ``digits``, n/a if not finite."""
    if value is None or not math.isfinite(value):
        return "n/a"
    if abs(value) >= 10:  # HU
        return f"{value:.1f}"
    return f"{value:.{digits}f}" if abs(value) >= 10**-digits or value == 0 else f"{value:.1e}"


def plural(n: int, word: str) -> str:
    """ "1 seed", "2 seeds"."""
    return f"{n} {word}" + ("" if n == 1 else "s")


def _same_direction(model: float, real: float) -> str:
    if real == 0 or not math.isfinite(model):
        return "n/a"
    if model == 0:
        return "no change"
    return "yes" if model * real > 0 else "no"


def results_table(results: Mapping[str, dict]) -> str:
    """The yardstick as a Markdown table (fractions of the zone's voxels, or HU)."""
    rows = [
        "| finding | measure | with | without | difference | p (paired t) | phantom with "
        "| phantom without | same direction |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for fid, r in results.items():
        real_diff = r["real_with"] - r["real_without"]
        rows.append(
            f"| {row_finding(fid).replace('_', ' ')} | {r['measure']} | {fmt(r['with'])} | "
            f"{fmt(r['without'])} | {fmt(r['difference'])} | {fmt(r['p_value'])} | "
            f"{fmt(r['real_with'])} | {fmt(r['real_without'])} | "
            f"{_same_direction(r['difference'], real_diff)} |"
        )
    return "\n".join(rows)


def verdict(results: Mapping[str, dict]) -> str:
    """One honest sentence on how many prompts moved the yardstick the way the phantom does."""
    agree = [
        fid
        for fid, r in results.items()
        if _same_direction(r["difference"], r["real_with"] - r["real_without"]) == "yes"
    ]
    significant = [
        fid
        for fid in agree
        if results[fid]["p_value"] is not None and results[fid]["p_value"] < 0.05
    ]
    tested = any(r["p_value"] is not None for r in results.values())
    findings = {row_finding(fid) for fid in results}
    sentence = (
        f"The prompt moved the yardstick in the phantom's direction for {len(agree)} of "
        f"{plural(len(results), 'measure')} of {plural(len(findings), 'finding')}"
    )
    if tested:
        sentence += f" ({len(significant)} with p < 0.05, uncorrected)"
    return sentence + "."
