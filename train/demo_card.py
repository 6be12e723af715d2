"""The last step of ``make demo-model``: measure the demo model, draw it, write its model card.

Run as::

    python -m train.demo_card MODEL_DIR --data DATA_ROOT --out OUT_DIR [--docs-images DIR]
        [--seeds N] [--steps S] [--guidance G] [--reference K]

For four findings the model generates prompt pairs ("with" / "without" the finding, the same
seed for both prompts of a pair) and a physical yardstick that needs no network measures each
volume: the fraction of a fixed zone denser than -300 HU (pleural effusion, consolidation,
cardiomegaly); for emphysema the lung zone's 15th HU percentile (Perc15) and the fraction below
-950 HU (%LAA-950). The zones come from the anatomy masks of
the phantom dataset's ``valid`` split, so every volume is measured in the same place whatever
anatomy the model drew. Real phantoms rendered with and without each finding (same subjects)
give the direction and size a faithful model should show. The weights, config and labels of
MODEL_DIR are written unchanged to OUT_DIR with the new card and one picture per pair.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from factory import vocab
from factory.anatomy import read_legend
from factory.errors import CtFactoryError
from factory.evaluate.measure import (
    DENSE_HU,
    HEART_DILATION,
    LAA_HU,
    PERC15,
    paired_stats,
    quartiles,
    row_finding,
    row_id,
    zone_fraction,
    zone_percentile,
    zones,
)
from factory.geometry import Grid
from factory.models.checkpoint import (
    CARD_JSON,
    CARD_MARKDOWN,
    CHECKSUMS_FILE,
    CONFIG_FILE,
    IMAGES_DIR,
    LABELS_FILE,
    WEIGHTS_SUFFIX,
    Checkpoint,
    CheckpointError,
    ModelCard,
    load_checkpoint,
    save_checkpoint,
)
from factory.viz import aspects, figure_png, planes, pyplot, show_plane

LUNG_WINDOW = (-1000.0, 200.0)
PARENCHYMA_WINDOW = (-1000.0, -700.0)  # aerated lung only: shows changes in lung density
REFERENCE_SEED = 20240  # the real reference subjects (sex alternates, ages cycle REFERENCE_AGES)
REFERENCE_AGES = (62, 48, 71, 55)
MAX_PNG_BYTES = 250_000
PICTURE_SEEDS = 2
SCHEDULER_NAMES = {"ddim": "DDIM", "ddpm": "DDPM", "rectified_flow": "rectified-flow"}


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


class InputError(CtFactoryError, ValueError):
    """Bad input (a path that is not what it should be); the message names the path."""


# ----- measuring ------------------------------------------------------------------------------
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


# ----- data -----------------------------------------------------------------------------------
def read_nifti(path: Path) -> np.ndarray:
    """A NIfTI volume as stored (dtype kept), reoriented to RAS+ (x, y, z)."""
    import nibabel as nib

    image = nib.as_closest_canonical(nib.load(str(path)))
    return np.asarray(image.dataobj)


def valid_files(root: Path) -> tuple[list[Path], list[Path]]:
    """The valid split's volumes and anatomy masks, or InputError naming what is missing."""
    if not root.is_dir():
        raise InputError(f"{root}: no such dataset folder")
    masks = sorted((root / "masks" / "valid").glob("*.nii.gz"))
    volumes = sorted((root / "valid").glob("*.nii.gz"))
    if not masks or not volumes:
        raise InputError(
            f"{root}: no valid split with anatomy masks (need valid/*.nii.gz and "
            "masks/valid/*.nii.gz, as `ctfactory phantom --split valid` writes)"
        )
    return volumes, masks


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


def reference_phantoms(
    grid: Grid, pairs: Sequence[Pair], n: int
) -> tuple[list[np.ndarray], dict[str, list[np.ndarray]]]:
    """Real phantoms of ``n`` subjects without findings and with each pair's finding.

    The same subjects (seeds) render with and without, so each difference is the finding.
    """
    from factory.phantom.render import render_phantom

    without: list[np.ndarray] = []
    with_finding: dict[str, list[np.ndarray]] = {p.finding: [] for p in pairs}
    for i in range(n):
        sex = "MF"[i % 2]
        age = REFERENCE_AGES[i % len(REFERENCE_AGES)]
        seed = np.random.SeedSequence([REFERENCE_SEED, i])
        without.append(render_phantom(grid, {}, sex, age, seed).image)
        for pair in pairs:
            rng = np.random.default_rng([REFERENCE_SEED, i])
            attrs = vocab.complete_attributes(pair.finding, pair.attributes, rng)
            seed = np.random.SeedSequence([REFERENCE_SEED, i])
            image = render_phantom(grid, {pair.finding: attrs}, sex, age, seed).image
            with_finding[pair.finding].append(image)
    return without, with_finding


# ----- pictures -------------------------------------------------------------------------------
def busiest_slices(
    with_images: Sequence[np.ndarray], without_images: Sequence[np.ndarray]
) -> list[int]:
    """(x, y, z) voxel whose coronal (y) and axial (z) slices the finding changes most.

    Slices through the finding show it; fixed mid-slices miss a posterior effusion.
    """
    shape = np.asarray(with_images[0]).shape
    diff = np.zeros(shape, np.float64)
    for a, b in zip(with_images, without_images, strict=True):
        diff += np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    centre = [s // 2 for s in shape]
    if diff.sum() == 0:
        return centre
    return [centre[0], int(diff.sum(axis=(0, 2)).argmax()), int(diff.sum(axis=(0, 1)).argmax())]


def pair_figure(
    title: str,
    panels: Sequence[tuple[str, np.ndarray]],
    spacing: Sequence[float],
    centre: Sequence[int],
    window: tuple[float, float] = LUNG_WINDOW,
) -> bytes:
    """PNG bytes: one column per (label, HU volume), axial and coronal rows, in ``window``.

    Radiological convention (factory.viz.planes); shrinks until under
    MAX_PNG_BYTES.
    """
    ratio = aspects(spacing)
    fig, axes = pyplot().subplots(2, len(panels), figsize=(2.1 * len(panels), 5.0), squeeze=False)
    for col, (label, hu) in enumerate(panels):
        views = planes(np.asarray(hu), centre)
        for row, name in enumerate(("axial", "coronal")):
            ax = axes[row, col]
            show_plane(ax, views[name], window, ratio[name])
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title("\n".join(textwrap.wrap(label, 26)), fontsize=7)
        axes[0, 0].set_ylabel(f"axial z={centre[2]}", fontsize=7)
        axes[1, 0].set_ylabel(f"coronal y={centre[1]}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return figure_png(fig, dpis=(100, 80, 64, 50), max_bytes=MAX_PNG_BYTES)


# ----- the card -------------------------------------------------------------------------------
def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    if abs(value) >= 10:  # HU
        return f"{value:.1f}"
    return f"{value:.{digits}f}" if abs(value) >= 10**-digits or value == 0 else f"{value:.1e}"


def _plural(n: int, word: str) -> str:
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
            f"| {row_finding(fid).replace('_', ' ')} | {r['measure']} | {_fmt(r['with'])} | "
            f"{_fmt(r['without'])} | {_fmt(r['difference'])} | {_fmt(r['p_value'])} | "
            f"{_fmt(r['real_with'])} | {_fmt(r['real_without'])} | "
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
        f"{_plural(len(results), 'measure')} of {_plural(len(findings), 'finding')}"
    )
    if tested:
        sentence += f" ({len(significant)} with p < 0.05, uncorrected)"
    return sentence + "."


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
            f"generated a prompt pair from the same seed ({_plural(len(seeds), 'seed')}, "
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
            f"({_plural(int(settings['reference']), 'subject')}), "
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
    extra["demo_card"] = {
        **settings,
        "prompts": {
            fid: {"with": r["with_prompt"], "without": r["without_prompt"]}
            for fid, r in results.items()
        },
        "measures": {fid: r["measure"] for fid, r in results.items()},
        "heart_dilation_voxels": HEART_DILATION,
        "reference_seed": REFERENCE_SEED,
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


# ----- the run --------------------------------------------------------------------------------
_CARRIED = {CONFIG_FILE, CARD_MARKDOWN, CARD_JSON, LABELS_FILE, CHECKSUMS_FILE}


def check_source(checkpoint: Checkpoint) -> None:
    """Refuse a checkpoint holding files that the rewritten checkpoint would silently drop."""
    directory = checkpoint.directory
    dropped = [
        p.relative_to(directory).as_posix()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
        and p.name not in _CARRIED
        and not p.name.endswith(WEIGHTS_SUFFIX)
        and p.parent.name != IMAGES_DIR
    ]
    if dropped:
        raise InputError(
            f"{directory}: holds files this step cannot carry over ({', '.join(dropped)}); "
            "only config, weights, model card and labels.csv are rewritten"
        )


def check_out(out: Path) -> None:
    """OUT_DIR must be absent, empty or a checkpoint (save_checkpoint refuses anything else)."""
    if not out.exists():
        return
    if out.is_dir() and (
        not any(out.iterdir())
        or ((out / CHECKSUMS_FILE).is_file() and (out / CONFIG_FILE).is_file())
    ):
        return
    raise InputError(f"{out}: exists and is not a ct-factory checkpoint; choose another --out")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m train.demo_card",
        description="Measure a ct-factory model with prompt pairs and an HU yardstick, draw the "
        "pairs and write the model with its card (the last step of `make demo-model`).",
        epilog="example: python -m train.demo_card build/demo-model --data build/demo-data "
        "--out factory/models/builtin/demo",
    )
    parser.add_argument(
        "model", type=Path, metavar="MODEL_DIR", help="model checkpoint (ctfactory export-model)"
    )
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        metavar="DATA_ROOT",
        help="the phantom dataset the model was trained on (its valid split is used)",
    )
    parser.add_argument(
        "--out", type=Path, required=True, metavar="OUT_DIR", help="checkpoint to write"
    )
    parser.add_argument(
        "--docs-images",
        default="docs/images/models",
        metavar="DIR",
        help="also write the pictures here ('' for nowhere)",
    )
    parser.add_argument("--seeds", type=int, default=4, help="seeds per prompt pair")
    parser.add_argument(
        "--steps", type=int, default=20, help="sampling steps (the model's scheduler)"
    )
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance")
    parser.add_argument(
        "--reference", type=int, default=4, help="real phantom subjects per finding"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="volumes per forward pass")
    args = parser.parse_args(argv)
    for name in ("seeds", "steps", "reference", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.guidance < 0:
        parser.error("--guidance must be at least 0")
    return args


def run(args: argparse.Namespace) -> int:
    """Measure, draw and write; returns the exit status."""
    from factory.models.generator import Generator, Request

    started = time.perf_counter()
    if not args.model.is_dir():
        raise InputError(f"{args.model}: no such checkpoint directory")
    volumes_paths, mask_paths = valid_files(args.data)
    check_out(args.out)
    try:
        checkpoint = load_checkpoint(args.model)
    except CheckpointError as exc:
        raise InputError(str(exc)) from None
    check_source(checkpoint)
    config = checkpoint.config
    grid = Grid(tuple(config.size), tuple(config.spacing_mm))  # type: ignore[arg-type]

    label_maps = [read_nifti(p) for p in mask_paths]
    if label_maps[0].shape != grid.shape:
        raise InputError(
            f"{mask_paths[0]}: grid {label_maps[0].shape} does not match the model grid "
            f"{grid.shape}; use the dataset the model was trained on"
        )
    try:
        zone_masks = zones(label_maps, read_legend(args.data / "masks"))
    except ValueError as exc:  # LegendError too
        raise InputError(f"{args.data / 'masks' / 'valid'}: {exc}") from None
    real_hu = quartiles(read_nifti(p) for p in volumes_paths)
    print(
        f"zones from {len(label_maps)} valid phantoms: lungs {int(zone_masks['lungs'].sum())} "
        f"voxels, heart {int(zone_masks['heart'].sum())} voxels"
    )

    t = time.perf_counter()
    real_without, real_with = reference_phantoms(grid, PAIRS, args.reference)
    print(
        f"reference phantoms: {args.reference} subjects x {len(PAIRS) + 1} renders in "
        f"{time.perf_counter() - t:.1f} s"
    )

    generator = Generator.from_checkpoint(checkpoint)
    seeds = list(range(args.seeds))
    results: dict[str, dict] = {}
    images: dict[str, bytes] = {}
    generated: list[np.ndarray] = []
    scheduler = None
    for k, pair in enumerate(PAIRS, 1):
        t = time.perf_counter()
        requests = [
            Request(prompt, seed, args.steps, args.guidance)
            for seed in seeds
            for prompt in (pair.with_prompt, pair.without_prompt)
        ]
        volumes = generator.generate(requests, batch_size=args.batch_size)
        with_hu = [v.hu for v in volumes[0::2]]
        without_hu = [v.hu for v in volumes[1::2]]
        generated.extend(v.hu for v in volumes)
        scheduler = volumes[0].sampler.get("scheduler")
        rows = pair_results(
            pair, with_hu, without_hu, real_with[pair.finding], real_without, zone_masks
        )
        results.update(rows)
        centre = busiest_slices(real_with[pair.finding], real_without)
        panels: list[tuple[str, np.ndarray]] = []
        for i in range(min(PICTURE_SEEDS, len(seeds))):
            panels.append((f'seed {seeds[i]}, without: "{pair.without_prompt}"', without_hu[i]))
            panels.append((f'seed {seeds[i]}, with: "{pair.with_prompt}"', with_hu[i]))
        panels.append(("phantom without (reference)", real_without[0]))
        panels.append(("phantom with (reference)", real_with[pair.finding][0]))
        title = (
            f"{pair.finding.replace('_', ' ')}: generated pairs (same seed) and a phantom "
            f"reference; {pair.window_name} {pair.window[0]:g}..{pair.window[1]:g} HU"
        )
        images[f"pair-{pair.finding}.png"] = pair_figure(
            title, panels, grid.spacing, centre, pair.window
        )
        differences = ", ".join(
            f"{r['measure']} {_fmt(r['difference'])} "
            f"(phantom {_fmt(r['real_with'] - r['real_without'])})"
            for r in rows.values()
        )
        print(
            f"pair {k}/{len(PAIRS)} {pair.finding}: {len(requests)} volumes in "
            f"{time.perf_counter() - t:.1f} s, difference {differences}"
        )

    hu = {"generated": quartiles(generated), "real": real_hu}
    settings = {
        "seeds": seeds,
        "steps": args.steps,
        "guidance": args.guidance,
        "scheduler": scheduler,
        "reference": args.reference,
        "valid_phantoms": len(label_maps),
        "source_model_hash": checkpoint.hash,
        "negations": config.text.negations,
    }
    spacing = " x ".join(f"{s:g}" for s in grid.spacing)
    config_text = (
        f"`{config.name}` config ({' x '.join(map(str, grid.shape))} voxels at {spacing} mm)"
    )
    card = build_card(
        checkpoint.card,
        PAIRS,
        results,
        hu,
        settings,
        list(images),
        training_data_text(args.data, checkpoint.card),
        config_text,
    )
    labels = checkpoint.directory / LABELS_FILE
    digest = save_checkpoint(
        args.out,
        config,
        checkpoint.weights,
        card,
        labels_csv=labels if labels.is_file() else None,
        images=images,
    )
    if args.docs_images:
        docs = Path(args.docs_images)
        docs.mkdir(parents=True, exist_ok=True)
        for name, data in images.items():
            (docs / name).write_bytes(data)

    print()
    print(results_table(results))
    print(
        f"\nHU quartiles generated {' / '.join(f'{v:.0f}' for v in hu['generated'])}, "
        f"valid phantoms {' / '.join(f'{v:.0f}' for v in hu['real'])}"
    )
    print(f"wrote {args.out} (content hash {digest}) in {time.perf_counter() - started:.0f} s")
    if args.docs_images:
        print(f"pictures also in {args.docs_images}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; bad input is one line on stderr and exit status 2."""
    args = parse_args(argv)
    try:
        return run(args)
    except InputError as exc:
        print(f"demo_card: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
