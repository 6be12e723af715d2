"""``ctfactory train`` and ``ctfactory export-model``."""

from __future__ import annotations

import argparse

from factory.console import HelpFormatter, keep_log, libraries_to_log, log_line, run_log
from factory.errors import UsageError
from train.config import TASKS, load_train_config

TRAIN_EXAMPLES = """\
examples:
  ctfactory train vae --config train/configs/demo-vae.yaml
  ctfactory train clip --config train/configs/demo-clip.yaml --workers 2 --steps 200
  ctfactory train diffusion --config train/configs/demo-diffusion.yaml --workers 2-8
  ctfactory train classifier --config train/configs/demo-classifier.yaml
  ctfactory train vae --config train/configs/vae.yaml --storage s3://bucket/runs --resume
  ctfactory train clip --config c.yaml --set optim.lr=3e-4 --set data.text=mixed --plot

A run lives in {storage}/{name} (name defaults to the task). Running it again needs --resume,
which continues from its newest checkpoint; a different task or model config is refused.
--workers MIN-MAX trains elastically: a resize restarts every worker from the newest
checkpoint, with gradient accumulation adjusted so the global batch stays --batch-size.
Set RAY_ADDRESS to train on a running cluster; otherwise a local one is started.
"""

EXPORT_EXAMPLES = """\
examples:
  ctfactory export-model runs/vae --out models/vae
  ctfactory export-model runs/diffusion --out models/demo --name demo
  ctfactory export-model s3://bucket/runs/diffusion --out models/big

The newest checkpoint of the run is exported (its EMA weights when the run kept an EMA). A
diffusion run's model also carries the VAE it was trained on (and its CLIP, if configured),
so it loads with Generator.load.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train the VAE, the 3D CLIP, the latent diffusion model or the finding classifier",
        description="Train one of the model's networks with Ray Train: any number of workers "
        "or an elastic range, checkpoints to a local folder or s3://, exact resume.",
        epilog=TRAIN_EXAMPLES,
        formatter_class=HelpFormatter,
    )
    p.add_argument("task", choices=TASKS, help="which network to train")
    p.add_argument("--config", required=True, help="training config YAML (train/configs/)")
    p.add_argument("--workers", help="N workers, or MIN-MAX for elastic training")
    p.add_argument("--storage", help="where runs live: a folder, file:// or s3:// URL")
    p.add_argument("--name", help="run name under the storage (default: the task)")
    p.add_argument("--steps", type=int, help="optimiser steps in total")
    p.add_argument("--batch-size", type=int, help="global batch size")
    p.add_argument("--resume", action="store_true", help="continue the run from its checkpoint")
    p.add_argument("--plot", action="store_true", help="draw curves.png in the run when done")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's, Ray Train's and the libraries' messages here, not in the run's log",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. optim.lr=3e-4 (repeatable)",
    )
    p.set_defaults(func=run_train)

    e = sub.add_parser(
        "export-model",
        help="write a training run's model as a checkpoint for Generator.load",
        description="Export the newest checkpoint of a training run in ct-factory's model "
        "format: config, safetensors weights, model card and content hash.",
        epilog=EXPORT_EXAMPLES,
        formatter_class=HelpFormatter,
    )
    e.add_argument("run", help="run directory or URL ({storage}/{name})")
    e.add_argument("--out", required=True, help="model directory to write")
    e.add_argument("--name", help="model name for the card (default: the run name)")
    e.add_argument("--description", help="what the model is, for its card")
    e.add_argument("--limitations", default="", help="what it cannot do, for its card")
    e.set_defaults(func=run_export)


def overrides(args: argparse.Namespace) -> list[str]:
    out = [f"task={args.task}"]
    for flag, key in (
        ("workers", "workers"),
        ("storage", "storage"),
        ("name", "name"),
        ("steps", "steps"),
        ("batch_size", "batch_size"),
    ):
        value = getattr(args, flag)
        if value is not None:
            out.append(f"{key}={value}")
    return out + list(args.set)


def run_train(args: argparse.Namespace) -> int:
    import yaml

    from factory.store.fs import write_url
    from train.curves import plot_curves, read_metrics
    from train.launcher import launch

    try:
        with open(args.config) as f:
            declared = (yaml.safe_load(f) or {}).get("task")
    except OSError as exc:
        raise UsageError(f"--config {args.config}: {exc.strerror}") from None
    except (yaml.YAMLError, AttributeError):
        declared = None  # load_train_config reports it
    if declared not in (None, args.task):
        raise UsageError(f"--config {args.config} is for task {declared!r}, not {args.task!r}")
    cfg = load_train_config(args.config, overrides(args))
    log = None if args.verbose else run_log(cfg.run_url, f"train-{args.task}")

    def put(name: str, data: bytes) -> None:
        write_url(f"{cfg.run_url}/{name}", data, cfg.storage_options)

    with libraries_to_log(log):
        result = launch(cfg, resume=args.resume)
    kept = log_line(keep_log(log, cfg.run_url, put)) if log is not None else None
    if result.error is not None:
        print(f"ctfactory train {args.task}: training failed: {result.error}")
        if kept:
            print(kept)
        return 1
    print(f"run: {cfg.run_url}")
    print(f"newest checkpoint: {result.checkpoint.path if result.checkpoint else '(none)'}")
    print(f"metrics: {cfg.run_url}/metrics.jsonl")
    if args.plot:
        png = plot_curves(read_metrics(cfg.run_url, cfg.storage_options), cfg.run_name)
        write_url(f"{cfg.run_url}/curves.png", png, cfg.storage_options)
        print(f"curves: {cfg.run_url}/curves.png")
    if kept:
        print(kept)
    return 0


def run_export(args: argparse.Namespace) -> int:
    from train.export import export_model

    digest = export_model(
        args.run,
        args.out,
        args.name,
        description=args.description,
        limitations=args.limitations,
    )
    print(f"model: {args.out} (content hash {digest[:16]})")
    return 0
