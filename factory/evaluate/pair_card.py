"""The model card of a prompt-pair run: the source card's numbers plus the yardstick's table,
the pictures, the settings and the caveats (factory.evaluate.prompt_pairs measures; this says)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from factory.evaluate.measure import DENSE_HU, HEART_DILATION, LAA_HU, PERC15
from factory.evaluate.prompt_pairs import (
    PICTURE_SEEDS,
    Pair,
    plural,
    results_table,
    verdict,
)
from factory.models.card import ModelCard
from factory.models.checkpoint import IMAGES_DIR

SCHEDULER_NAMES = {"ddim": "DDIM", "ddpm": "DDPM", "rectified_flow": "rectified-flow"}


def training_data_text(root: Path, source: ModelCard) -> str:
    """The card's training-data section from the dataset's dataset.json and the source card."""
    lines = ["ct-factory phantom dataset in the CT-RATE layout (`ctfactory phantom`).", ""]
    try:
        manifest = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
        splits = manifest.get("splits", {})
    except (OSError, ValueError):
        splits = {}
    for name, info in sorted(splits.items()):
        shape = " x ".join(str(s) for s in info.get("shape", []))
        spacing = " x ".join(f"{s:g}" for s in info.get("spacing_mm", []))
        findings = info.get("findings")
        how = (
            "findings drawn with realistic co-occurrence"
            if findings == "sampled"
            else (f"findings {findings}")
        )
        lines.append(
            f"- {name}: {info.get('n', '?')} volumes, seed {info.get('seed', '?')}, "
            f"{shape} voxels at {spacing} mm, {how}"
        )
    if source.training_data:
        lines += ["", f"Trained on: {source.training_data}."]
    lines += ["", "The valid split defines the yardstick zones and the real HU reference."]
    return "\n".join(lines)


def negation_text(negations: str) -> str:
    """How the card's "without" prompts were read, for the card's readers."""
    if negations != "guide":
        return ""
    return (
        ' The "without" prompts are read as the model reads every negation (`text.negations: '
        'guide`, docs/models.md "Negation"): "no pleural effusion" conditions on what it '
        "affirms (nothing) and guidance steers away from the negated finding."
    )


def build_card(
    source: ModelCard,
    pairs: Sequence[Pair],
    results: Mapping[str, dict],
    hu: Mapping[str, tuple[float, float, float]],
    settings: Mapping[str, object],
    images: Sequence[str],
    training_data: str,
    config_text: str,
) -> ModelCard:
    """The demo model's card: the source card's numbers plus the yardstick, pictures (one per
    pair, in ``images``' order), caveats."""
    metrics = dict(source.metrics)
    for fid, r in results.items():
        for key in ("with", "without", "difference", "p_value", "real_with", "real_without"):
            if r[key] is not None and math.isfinite(r[key]):
                metrics[f"{fid}/{key}"] = float(r[key])
    for name, values in hu.items():
        prefix = "hu/" if name == "generated" else "hu/real_"
        for q, value in zip(("q25", "q50", "q75"), values, strict=True):
            metrics[f"{prefix}{q}"] = float(value)
    wall = source.extra.get("wall_s") if isinstance(source.extra, dict) else None
    trained = f"{source.steps:,} diffusion training steps" + (
        f", {float(wall) / 60:.0f} min" if wall else ""
    )
    seeds = list(settings["seeds"])  # type: ignore[call-overload]
    scheduler_name = SCHEDULER_NAMES.get(str(settings["scheduler"]), settings["scheduler"])
    shown = ("seed " if len(seeds[:PICTURE_SEEDS]) == 1 else "seeds ") + " and ".join(
        map(str, seeds[:PICTURE_SEEDS])
    )
    pictures = []
    for pair, name in zip(pairs, images, strict=True):
        finding = pair.finding.replace("_", " ")
        pictures.append(
            f"![{finding}: without and with the finding]({IMAGES_DIR}/{name})\n\n"
            f'*{finding.capitalize()}: "{pair.without_prompt}" vs "{pair.with_prompt}" '
            f"({shown}), and the same phantom subject without and with it; {pair.window_name} "
            f"{pair.window[0]:g}..{pair.window[1]:g} HU.*"
        )
    description = "\n\n".join(
        [
            "A phantom-trained demonstration model: ct-factory's latent diffusion generator at "
            f"the {config_text}, trained on CPU by `make demo-model` "
            f"({trained}) on procedural chest-CT phantoms. It is not a model of real anatomy: "
            "it learned the phantom. Use it to try the generation API, the "
            "factory and the server, not to study chest CT.",
            "**Does the prompt change the volume the right way?** For each finding the model "
            f"generated a prompt pair from the same seed ({plural(len(seeds), 'seed')}, "
            f"{settings['steps']} {scheduler_name} steps, guidance "
            f"{settings['guidance']}). A yardstick "
            "that needs no network measures each volume in fixed zones taken from the "
            "validation phantoms' anatomy (lungs: inside the lungs in at least half; heart: "
            f"the majority heart dilated by {HEART_DILATION} voxels, inside the chest cavity): "
            f"the fraction of the zone denser than {DENSE_HU:g} HU; for emphysema the lung "
            f"zone's Perc{PERC15:g} (the HU below which {PERC15:g}% of it lies, the densitometry "
            "index of emphysema trials: lower is more emphysema) and the fraction below "
            f"{LAA_HU:g} HU (%LAA-950). The phantom columns are the same measure on real phantoms "
            "rendered with and without the finding "
            f"({plural(int(settings['reference']), 'subject')}), "
            "the direction a faithful model should show. "
            + verdict(results)
            + negation_text(str(settings["negations"])),
            results_table(results),
            f"HU quartiles (25/50/75 %) over all generated volumes: "
            f"{' / '.join(f'{v:.0f}' for v in hu['generated'])}; over the validation phantoms: "
            f"{' / '.join(f'{v:.0f}' for v in hu['real'])}.",
            *pictures,
        ]
    )
    limitations = (
        "Trained on procedural phantoms only (smooth primitive shapes, rule-drawn findings; see "
        "docs/phantom.md), with the tiny networks and a short CPU schedule: anatomy and "
        "textures are coarse and findings are at best approximate. At 64^3 voxels of about "
        "6 x 6 x 5 mm small findings (nodules under about 10 mm, calcified plaques, fine "
        "septal lines) cannot be represented, and texture finer than one latent voxel of the VAE, "
        "such as the phantom's emphysema speckle, comes back as a change in density "
        "at best. The yardstick is a crude HU fraction or percentile in fixed "
        "zones: it cannot tell an effusion from a consolidation or a large heart from nearby "
        "dense lung, and it rests on a few seeds with uncorrected p-values. The model was "
        "conditioned on phantom report phrasing only; other wording may have little effect. "
        "Never for "
        "clinical use or for conclusions about real patients."
    )
    extra = dict(source.extra) if isinstance(source.extra, dict) else {}
    extra["prompt_pairs"] = {
        **settings,
        "prompts": {
            fid: {"with": r["with_prompt"], "without": r["without_prompt"]}
            for fid, r in results.items()
        },
        "measures": {fid: r["measure"] for fid, r in results.items()},
        "heart_dilation_voxels": HEART_DILATION,
    }
    extra["images"] = [f"{IMAGES_DIR}/{name}" for name in images]
    return ModelCard(
        name="demo",
        description=description,
        training_data=training_data,
        steps=source.steps,
        metrics=metrics,
        intended_use=source.intended_use,
        limitations=limitations,
        license=source.license,
        extra=extra,
    )
