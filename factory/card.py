"""``ctfactory card``: measure a model with prompt pairs and write it with a new model card (the
last step of ``make demo-model``). A composition of plain pieces: the real reference is
factory.phantom.render.render_subjects, the experiment factory.evaluate.prompt_pairs, the card's
text factory.evaluate.pair_card, the repacking factory.models.checkpoint.save_with_card."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from factory.console import HelpFormatter
from factory.errors import UsageError

EXAMPLES = """\
examples:
  ctfactory card build/demo-model --data build/demo-data --out factory/models/builtin/demo
  ctfactory card s3://bucket/models/m1 --data /data/phantoms --out m1-card --seeds 8 --steps 50

The data is a phantom dataset in the CT-RATE layout with anatomy masks (`ctfactory phantom
--split valid`): its valid split defines the yardstick's zones and the real HU reference. The
weights, config and labels are written unchanged; only the card and its pictures are new.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "card",
        help="measure a model with prompt pairs and an HU yardstick; write it with its card",
        description="Generate 'with' / 'without' prompt pairs for four findings, measure them "
        "with an HU yardstick against real phantoms, draw them, and write the model with the "
        "results in its model card.",
        epilog=EXAMPLES,
        formatter_class=HelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="the model: builtin:NAME, a directory or a URL")
    p.add_argument(
        "--data", type=Path, required=True, help="phantom dataset root (its valid split is used)"
    )
    p.add_argument("--out", type=Path, required=True, help="the checkpoint directory to write")
    p.add_argument(
        "--docs-images", default="", metavar="DIR", help="also write the pictures to DIR"
    )
    p.add_argument("--seeds", type=int, default=4, help="seeds per prompt pair")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's own)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the model's own)")
    p.add_argument("--reference", type=int, default=4, help="real phantom subjects per finding")
    p.add_argument("--batch-size", type=int, default=8, help="volumes per forward pass")
    p.set_defaults(func=run_card)


def _check(args: argparse.Namespace) -> None:
    for name in ("seeds", "reference", "batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')}: must be at least 1")


def run_card(args: argparse.Namespace) -> int:
    import numpy as np

    from factory.data.ctrate import DatasetError, read_split
    from factory.data.nifti import read_nifti
    from factory.evaluate import pair_card, prompt_pairs
    from factory.evaluate.measure import quartiles, zones
    from factory.geometry import Grid
    from factory.models.checkpoint import (
        check_carried,
        check_destination,
        load_checkpoint,
        save_with_card,
    )
    from factory.models.generator import Generator
    from factory.phantom.render import SUBJECT_SEED, render_subjects

    _check(args)
    started = time.perf_counter()
    check_destination(args.out)
    checkpoint = load_checkpoint(args.model)
    check_carried(checkpoint)  # before the slow part, as save_with_card will
    config = checkpoint.config
    grid = Grid(tuple(config.size), tuple(config.spacing_mm))
    records = [r for r in read_split(args.data, "valid") if r.mask is not None]
    if not records:
        raise DatasetError(f"{args.data}: the valid split has no anatomy masks (masks/valid/)")
    label_maps = [read_nifti(r.mask) for r in records]
    if label_maps[0].shape != grid.shape:
        raise DatasetError(
            f"{records[0].mask}: grid {label_maps[0].shape} does not match the model grid "
            f"{grid.shape}; use the dataset the model was trained on"
        )
    zone_masks = zones(label_maps, records[0].legend)
    real_hu = quartiles(read_nifti(r.image) for r in records)
    print(
        f"zones from {len(records)} valid phantoms: lungs {int(zone_masks['lungs'].sum())} "
        f"voxels, heart {int(zone_masks['heart'].sum())} voxels"
    )
    t = time.perf_counter()
    real_without, real_with = render_subjects(
        grid, {p.finding: p.attributes for p in prompt_pairs.PAIRS}, args.reference
    )
    print(
        f"reference phantoms: {args.reference} subjects x {len(prompt_pairs.PAIRS) + 1} "
        f"renders in {time.perf_counter() - t:.1f} s"
    )

    generator = Generator.from_checkpoint(checkpoint)
    seeds = list(range(args.seeds))
    results: dict[str, dict] = {}
    images: dict[str, bytes] = {}
    generated: list[np.ndarray] = []
    sampling: dict = {}
    for k, pair in enumerate(prompt_pairs.PAIRS, 1):
        t = time.perf_counter()
        run = prompt_pairs.run_pair(
            generator, pair, seeds, real_with[pair.finding], real_without, zone_masks,
            args.steps, args.guidance, args.batch_size,
        )  # fmt: skip
        results.update(run.results)
        images[f"pair-{pair.finding}.png"] = run.picture
        generated.extend(run.generated)
        sampling = run.settings
        differences = ", ".join(
            f"{r['measure']} {prompt_pairs.fmt(r['difference'])} "
            f"(phantom {prompt_pairs.fmt(r['real_with'] - r['real_without'])})"
            for r in run.results.values()
        )
        print(
            f"pair {k}/{len(prompt_pairs.PAIRS)} {pair.finding}: {len(run.generated)} volumes "
            f"in {time.perf_counter() - t:.1f} s, difference {differences}"
        )

    hu = {"generated": quartiles(generated), "real": real_hu}
    settings = {
        "seeds": seeds,
        **sampling,
        "reference": args.reference,
        "valid_phantoms": len(records),
        "source_model_hash": checkpoint.hash,
        "negations": config.text.negations,
        "reference_seed": SUBJECT_SEED,
    }
    spacing = " x ".join(f"{s:g}" for s in grid.spacing)
    config_text = (
        f"`{config.name}` config ({' x '.join(map(str, grid.shape))} voxels at {spacing} mm)"
    )
    card = pair_card.build_card(
        checkpoint.card,
        prompt_pairs.PAIRS,
        results,
        hu,
        settings,
        list(images),
        pair_card.training_data_text(args.data, checkpoint.card),
        config_text,
    )
    digest = save_with_card(checkpoint, args.out, card, images)
    if args.docs_images:
        docs = Path(args.docs_images)
        docs.mkdir(parents=True, exist_ok=True)
        for name, data in images.items():
            (docs / name).write_bytes(data)

    print()
    print(prompt_pairs.results_table(results))
    print(
        f"\nHU quartiles generated {' / '.join(f'{v:.0f}' for v in hu['generated'])}, "
        f"valid phantoms {' / '.join(f'{v:.0f}' for v in hu['real'])}"
    )
    print(f"wrote {args.out} (content hash {digest}) in {time.perf_counter() - started:.0f} s")
    if args.docs_images:
        print(f"pictures also in {args.docs_images}")
    return 0
