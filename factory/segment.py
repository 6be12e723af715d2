"""``ctfactory segment``: anatomy for a given CT by generation (MedSyn's use of joint anatomy
channels). The CT is brought to the model's grid, encoded, held fixed as the image latents, and
the anatomy channels are sampled for it (``Request.image``, factory/models/generator.py)."""

from __future__ import annotations

import argparse
import json

from factory.console import HelpFormatter
from factory.errors import UsageError
from factory.store.cli import add_storage_args, storage_options

EXAMPLES = """\
examples:
  ctfactory segment scan.nii.gz --model builtin:demo --out seg/scan
  ctfactory segment demo-out/cohort --volume demo_0000003 --model builtin:demo --out seg/v3

A NIfTI file is reoriented to RAS, resampled to the model's spacing and padded or cropped to
its grid (as training data is); a cohort volume is taken as stored (on its model's grid). The
out folder gets anatomy.nii.gz (one uint8 label map on the model's grid, a value per set of
channels), labels.json (its legend) and segmentation.json (model, prompt, seed, steps). The
masks are at the latent grid's resolution: organs, not thin airways or vessels (docs/models.md).
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "segment",
        help="anatomy masks for a given CT, sampled by a model with anatomy channels",
        description="Encode a CT, hold it fixed as the image latents and sample the anatomy "
        "channels for it: segmentation by generation.",
        epilog=EXAMPLES,
        formatter_class=HelpFormatter,
    )
    p.add_argument("input", metavar="INPUT", help="a NIfTI file, or a cohort with --volume")
    p.add_argument("--volume", help="the volume id when INPUT is a cohort")
    p.add_argument("--model", default="builtin:demo", help="builtin:NAME, a directory or a URL")
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument("--prompt", default="", help="text to condition on (default: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's own)")
    add_storage_args(p)
    p.set_defaults(func=run)


def check_input(args: argparse.Namespace) -> None:
    """Refuse an input that is neither a NIfTI file nor a cohort with --volume, before the
    model loads."""
    from pathlib import Path

    if not args.volume and not (
        Path(args.input).is_file() and args.input.endswith((".nii", ".nii.gz"))
    ):
        raise UsageError(f"{args.input}: not a NIfTI file (.nii, .nii.gz); a cohort needs --volume")


def read_input(args: argparse.Namespace, config) -> object:
    """The input CT as HU on ``config``'s grid."""
    from pathlib import Path

    from factory.models.intensity import unit_to_hu

    if args.volume:
        from factory.store.reader import open_cohort

        volume = open_cohort(args.input, storage_options(args)).volume(args.volume, masks=False)
        return volume.hu
    from factory.data.transforms import preprocessing

    path = Path(args.input)

    try:
        unit = preprocessing(config)({"image": str(path), "rescale": (1.0, 0.0), "name": str(path)})
    except Exception as exc:  # nibabel / MONAI: a file that does not read as a volume
        raise UsageError(f"{path}: cannot be read as a CT volume: {exc.__cause__ or exc}") from None
    return unit_to_hu(unit["image"][0].float(), config.hu_window)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from factory.anatomy import legend_bytes, pack_channels
    from factory.data.nifti import nifti_bytes, write_atomic
    from factory.models.generator import Generator, Request

    check_input(args)
    generator = Generator.load(args.model, **storage_options(args))
    channels = generator.config.diffusion.anatomy_channels
    if not channels:
        raise UsageError(f"--model {args.model}: has no anatomy channels to sample")
    hu = read_input(args, generator.config)
    request = Request(args.prompt, seed=args.seed, steps=args.steps, image=hu)
    (volume,) = generator.generate([request])
    labels, legend = pack_channels(volume.masks)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "anatomy.nii.gz", nifti_bytes(labels, volume.affine))
    write_atomic(out / "labels.json", legend_bytes(legend))
    record = {
        "input": args.input,
        "volume": args.volume,
        "model": args.model,
        "model_hash": volume.model_hash,
        "prompt": args.prompt,
        "seed": args.seed,
        "sampler": volume.sampler,
        "voxels": {name: int(mask.sum()) for name, mask in volume.masks.items()},
    }
    write_atomic(out / "segmentation.json", json.dumps(record, indent=2).encode())
    sizes = ", ".join(f"{n} {v:,}" for n, v in record["voxels"].items())
    print(
        f"segmented {args.input}{'#' + args.volume if args.volume else ''}: {sizes} voxels; {out}"
    )
    return 0
