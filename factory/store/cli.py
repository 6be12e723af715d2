"""``ctfactory status | check | export``: look after a cohort store, wherever it lives.

``verify`` is the deprecated spelling of ``check`` (until 0.3): "verify" now means only a cohort
spec's label verification, which checks what a volume shows, not how it is stored.
"""

from __future__ import annotations

import argparse
import sys

import yaml

from factory.console import HelpFormatter
from factory.errors import UsageError

EXAMPLES = {
    "status": """examples:
  ctfactory status demo-out/cohort
  ctfactory status s3://my-bucket/cohorts/effusion --endpoint-url http://127.0.0.1:9000""",
    "check": """examples:
  ctfactory check demo-out/cohort
Reads every committed volume back (a missing chunk is an error, never fill values) and checks
its shape and checksums against the manifest. Exit status 1 when anything is wrong.""",
    "export": """examples:
  ctfactory export demo-out/cohort --nifti demo-out/nifti
  ctfactory export demo-out/cohort --nifti /data/ct --ids demo_0000003 demo_0000007
Writes CT-RATE layout (int16 .nii.gz with the real affine, anatomy masks, labels, reports and
metadata CSVs), readable by ct-factory's own training and by nnU-Net/MONAI/CT-CLIP tooling.""",
}


def add_storage_args(parser: argparse.ArgumentParser) -> None:
    """Options that reach fsspec/s3fs (credentials come from the standard AWS variables)."""
    parser.add_argument(
        "--endpoint-url", help="S3-compatible endpoint (MinIO, Ceph...), e.g. http://host:9000"
    )
    parser.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an fsspec storage option (YAML value), e.g. anon=true; repeatable",
    )


def storage_options(args: argparse.Namespace) -> dict:
    options: dict = {}
    for item in args.storage_option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--storage-option {item!r}: expected KEY=VALUE")
        options[key] = yaml.safe_load(value)
    if args.endpoint_url:
        options["endpoint_url"] = args.endpoint_url
    return options


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``status``, ``check`` and ``export`` commands (and ``verify``, deprecated)."""
    helps = {
        "status": "count a cohort's done, partial and missing volumes",
        "check": "read every committed volume back and check it against the manifest",
        "export": "export a cohort (or some volumes) as NIfTI in CT-RATE layout",
        "verify": "deprecated spelling of `check` (removed in 0.3)",
    }
    commands = (
        ("status", run_status),
        ("check", run_check),
        ("export", run_export),
        ("verify", run_verify),
    )
    for name, func in commands:
        parser = subparsers.add_parser(
            name,
            help=helps[name],
            description=helps[name][0].upper() + helps[name][1:] + ".",
            formatter_class=HelpFormatter,
            epilog=EXAMPLES.get(name, EXAMPLES["check"]),
        )
        parser.add_argument("url", metavar="URL", help="the cohort: a path, file:// or s3:// URL")
        add_storage_args(parser)
        if name == "export":
            parser.add_argument("--nifti", required=True, metavar="DIR", help="output folder")
            parser.add_argument("--ids", nargs="+", metavar="ID", help="only these volumes")
            parser.add_argument(
                "--split", default="train", help="the CT-RATE split name to write under"
            )
        parser.set_defaults(func=func)


def _open(args: argparse.Namespace):
    from factory.store.reader import open_cohort

    return open_cohort(args.url, storage_options(args))


def run_status(args: argparse.Namespace) -> int:
    print(_open(args).status().text())
    return 0


def run_check(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    cohort = _open(args)
    manifest_rows = len(cohort.read_manifest())
    with tqdm(total=manifest_rows, unit="vol", desc="check", mininterval=1.0) as bar:
        problems = cohort.check(progress=bar.update)
    status = cohort.status()
    for line in problems:
        print(line, file=sys.stderr)
    verdict = "ok" if not problems else f"{len(problems)} problem(s)"
    print(f"checked {manifest_rows:,} volumes: {verdict} | {status.text()}")
    return 1 if problems else 0


def run_verify(args: argparse.Namespace) -> int:
    """The deprecated spelling: says so once, then checks."""
    print(
        "ctfactory verify: deprecated, use `ctfactory check` (the same check; `verify` goes in "
        "0.3 and then means only a spec's label verification)",
        file=sys.stderr,
    )
    return run_check(args)


def run_export(args: argparse.Namespace) -> int:
    from factory.store.export import export_nifti

    cohort = _open(args)
    try:
        written = export_nifti(cohort, args.nifti, ids=args.ids, split=args.split)
    except KeyError as exc:
        raise UsageError(f"--ids: {exc.args[0]}") from None
    except OSError as exc:
        raise UsageError(f"--nifti {args.nifti}: cannot write: {exc}") from None
    print(f"exported {written:,} volumes to {args.nifti} (CT-RATE layout, split {args.split})")
    return 0
