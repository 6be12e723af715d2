"""``ctfactory phantom``: write a phantom dataset in the CT-RATE layout."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from factory import vocab
from factory.console import HelpFormatter
from factory.errors import UsageError

EXAMPLES = """\
examples:
  ctfactory phantom --n 8 --size 64 --out data/phantom --preview
  ctfactory phantom --n 200 --size 256x256x128 --spacing 1.5x1.5x2.5 --split valid --out data/ph
  ctfactory phantom --n 4 --finding "pleural_effusion:laterality=left,severity=large" --out x
  ctfactory phantom --n 4 --finding "Lung nodule:size_mm=12,lobe=RUL" --finding cardiomegaly --out y
  ctfactory phantom --n 4 --size 64 --normal --out normals

Without --finding or --normal, each volume's labels, age and sex are drawn with realistic
co-occurrence (reference prevalences, pairwise associations, calcification rising with age).
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "phantom",
        help="write a procedural chest-CT phantom dataset (CT-RATE layout)",
        description="Render seeded chest-CT phantoms with the 18 CT-RATE findings, reports, "
        "anatomy masks and ground truth, in the CT-RATE dataset layout.",
        epilog=EXAMPLES,
        formatter_class=HelpFormatter,
    )
    p.add_argument("--n", type=int, default=8, help="number of volumes")
    p.add_argument("--size", default="64", help="grid in voxels: N or XxYxZ")
    p.add_argument(
        "--spacing",
        default=None,
        help="voxel size in mm: S or SXxSYxSZ (default: fit a 380 x 380 x 320 mm field of view)",
    )
    p.add_argument("--split", default="train", help="split name (train, valid, ...)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed")
    p.add_argument("--out", required=True, help="dataset root folder")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="processes")
    p.add_argument(
        "--finding",
        action="append",
        default=[],
        metavar="NAME[:attr=value,...]",
        help="give every volume exactly these findings (repeatable)",
    )
    p.add_argument("--normal", action="store_true", help="volumes without any finding")
    p.add_argument("--preview", action="store_true", help="write PNG montages")
    p.add_argument("--preview-max", type=int, default=16, help="at most this many previews")
    p.add_argument("--overwrite", action="store_true", help="replace this split if it exists")
    p.set_defaults(func=run)


def parse_triple(option: str, text: str, kind: type, lo: float, hi: float) -> tuple:
    """'64' or '256x256x128' (or with commas) as a 3-tuple within [lo, hi]."""
    number = r"\d+" if kind is int else r"\d+(?:\.\d*)?"
    match = re.fullmatch(
        rf"\s*({number})(?:\s*[x,]\s*({number})\s*[x,]\s*({number}))?\s*", text.lower()
    )
    values = tuple(kind(t) for t in match.groups() if t is not None) if match else ()
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or not all(lo <= v <= hi for v in values):
        name, example = (
            ("integers", "64 or 256x256x128")
            if kind is int
            else ("numbers", "1.5 or 0.75x0.75x1.5")
        )
        raise UsageError(
            f"{option}: {text!r} is not valid; expected one or three {name} "
            f"in [{lo:g}, {hi:g}] such as {example}"
        )
    return values


def parse_finding(text: str) -> tuple[str, dict]:
    """'name:attr=value,attr=value' -> (finding id, validated attributes)."""
    name, _, rest = text.partition(":")
    try:
        fid = vocab.resolve(name)
        attrs: dict[str, object] = {}
        for item in filter(None, (s.strip() for s in rest.split(","))):
            key, eq, value = item.partition("=")
            if not eq:
                raise vocab.VocabError(f"{item!r} is not attr=value")
            attrs[key.strip()] = _number(value.strip())
        return fid, vocab.validate_attributes(fid, attrs, where=fid)
    except vocab.VocabError as exc:
        raise UsageError(f"--finding {text!r}: {exc}") from None


def _number(text: str) -> object:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def run(args: argparse.Namespace) -> int:
    from factory.phantom.dataset import (
        PhantomSettings,
        check_grid,
        default_grid,
        prepare_output,
        write_dataset,
    )

    if args.n < 1:
        raise UsageError(f"--n: {args.n} is not valid; expected a positive number of volumes")
    if args.workers < 1:
        raise UsageError(f"--workers: {args.workers} is not valid; expected at least 1")
    if not re.fullmatch(r"[a-z][a-z0-9]*", args.split):
        raise UsageError(
            f"--split: {args.split!r} is not valid; expected a lower-case word such as "
            "train or valid"
        )
    size = parse_triple("--size", args.size, int, 1, 1024)
    spacing = parse_triple("--spacing", args.spacing, float, 0.1, 50.0) if args.spacing else None
    grid = default_grid(size, spacing)
    problem = check_grid(grid)
    if problem:
        raise UsageError(f"--size/--spacing: {problem}; use a larger --size or --spacing")
    if args.normal and args.finding:
        raise UsageError("--normal and --finding exclude each other; use one")
    findings = (
        dict(parse_finding(f) for f in args.finding)
        if args.finding
        else ({} if args.normal else None)
    )
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: {out} is a file; expected a folder")
    problem = prepare_output(out, args.split, args.overwrite)
    if problem:
        raise UsageError(f"--out: {problem}")
    settings = PhantomSettings(
        n=args.n,
        grid=grid,
        split=args.split,
        seed=args.seed,
        findings=findings,
        previews=min(args.n, args.preview_max) if args.preview else 0,
    )
    summary = write_dataset(settings, out, workers=min(args.workers, args.n))
    rate = summary["n"] / summary["seconds"]
    print(
        f"wrote {summary['n']} volumes ({summary['bytes'] / 1e6:.1f} MB) of {grid.shape} voxels at "
        f"{'x'.join(f'{s:g}' for s in grid.spacing)} mm to {out} in {summary['seconds']:.1f} s "
        f"({rate:.2f} volumes/s)"
    )
    present = {c: k for c, k in summary["positives"].items() if k}
    if present:
        print("findings: " + ", ".join(f"{c} {k}" for c, k in present.items()))
    if settings.previews:
        print(f"previews: {out / 'previews' / args.split}")
    return 0
