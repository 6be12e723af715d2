"""``ctfactory generate``: a cohort spec in, a labelled chunked Zarr cohort out (Ray Data)."""

from __future__ import annotations

import argparse
import sys

from factory.console import HelpFormatter, keep_log, libraries_to_log, log_line, run_log
from factory.errors import UsageError
from factory.raycluster import IN_FLIGHT, NODE_WAIT_S, parse_workers
from factory.store.cli import add_storage_args, storage_options

EXAMPLES = """examples:
  ctfactory generate cohorts/demo.yaml
  ctfactory generate cohorts/effusion-enriched.yaml --out s3://bucket/cohorts/effusion --workers 8
  ctfactory generate cohorts/demo.yaml --out /tmp/smoke --limit 4 --batch-size 2

Re-running the same spec to the same output resumes it: committed volumes are kept, partial
ones regenerated, none generated twice. Another spec into the same output is refused unless
--overwrite. Then: ctfactory status|check|export URL (docs/factory.md)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``generate`` command."""
    parser = subparsers.add_parser(
        "generate",
        help="generate a labelled cohort from a spec into a Zarr store",
        description=(
            "Plan the cohort spec, then generate every volume on a pool of Ray actors, each\n"
            "writing its volumes straight to the store (a path, file:// or s3:// URL), and\n"
            "index them in a Parquet manifest. Ends with a summary and a QC montage."
        ),
        formatter_class=HelpFormatter,
        epilog=EXAMPLES,
    )
    parser.add_argument("spec", metavar="SPEC.yaml", help="the cohort spec")
    parser.add_argument("--out", metavar="URL", help="the cohort store (default: spec's output)")
    parser.add_argument(
        "--workers",
        default="1",
        metavar="N|MIN-MAX",
        help="generator actors: N, or MIN-MAX for a pool that grows and shrinks with the cluster",
    )
    parser.add_argument(
        "--gpus-per-worker",
        type=float,
        help="GPUs per actor (default: 1 when the cluster has GPUs, else CPU actors)",
    )
    parser.add_argument("--batch-size", type=int, default=4, help="volumes per actor batch")
    parser.add_argument(
        "--in-flight",
        type=int,
        default=IN_FLIGHT,
        metavar="K",
        help="batches an actor holds: one samples while the others are written (1: in turn)",
    )
    parser.add_argument(
        "--node-wait",
        type=float,
        default=NODE_WAIT_S,
        metavar="SECONDS",
        help="stop (keeping what is committed) when no node can run an actor for this long",
    )
    parser.add_argument("--limit", type=int, metavar="K", help="generate at most K volumes now")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace another cohort at the output"
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's, Ray Data's and the libraries' messages here, not in the run's log",
    )
    add_storage_args(parser)
    parser.set_defaults(func=run)


def _check(args: argparse.Namespace) -> tuple[int, int]:
    """Refuse bad options before any work; returns the actor pool's (min, max) size."""
    try:
        workers = parse_workers(args.workers)
    except ValueError as exc:
        raise UsageError(f"--{exc}") from None
    for name, low in (("batch_size", 1), ("in_flight", 1), ("limit", 0)):
        value = getattr(args, name)
        if value is not None and value < low:
            raise UsageError(f"--{name.replace('_', '-')} {value}: expected an integer >= {low}")
    if args.gpus_per_worker is not None and args.gpus_per_worker < 0:
        raise UsageError(f"--gpus-per-worker {args.gpus_per_worker}: expected a number >= 0")
    if args.node_wait <= 0:
        raise UsageError(f"--node-wait {args.node_wait:g}: expected a number of seconds > 0")
    return workers


def check_pool(text: str, workers: tuple[int, int], gpus_per_worker: float | None) -> None:
    """Refuse a pool whose minimum can never start: more GPU actors than the cluster's GPUs
    hold, and no autoscaler to add nodes. A cluster with no GPU node at all is taken for one
    whose nodes are lost or not yet up: the run waits ``--node-wait`` for them, then stops."""
    from factory.raycluster import can_autoscale, cluster_has_gpus, init_ray, workers_that_fit

    init_ray(workers[1])
    gpus = gpus_per_worker if gpus_per_worker is not None else float(cluster_has_gpus())
    if not gpus:
        return
    fit = workers_that_fit({"GPU": gpus})
    if fit and workers[0] > fit and not can_autoscale():
        raise UsageError(
            f"--workers {text}: a minimum of {workers[0]} actors at {gpus:g} GPU each, but the "
            f"cluster's GPUs hold {fit} and no autoscaler can add nodes; valid here: a minimum "
            f"of 1 to {fit} (say --workers {fit}-{max(fit, workers[1])}), or a smaller "
            "--gpus-per-worker"
        )


def root_cause(exc: BaseException) -> BaseException:
    """The user-code exception inside Ray's wrappers (task errors carry it as ``cause``)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None) or exc.__cause__
        if not isinstance(inner, BaseException):
            break
        exc = inner
    return exc


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from factory.evaluate.run_summary import write_run_summary
    from factory.pipeline import GenerationError, generate_cohort, prepare_run
    from factory.store.cohort import CohortStore

    workers = _check(args)
    try:
        run = prepare_run(
            args.spec, args.out, storage_options(args), limit=args.limit, overwrite=args.overwrite
        )
    except OSError as exc:  # the spec file or a local output that cannot be read or made
        raise UsageError(str(exc)) from None
    todo = run.todo.num_rows
    print(
        f"cohort {run.settings.cohort_id}: {run.plan.n:,} planned, {run.done_before:,} already "
        f"in {run.url} ({run.state}), {todo:,} to generate with {args.workers} worker(s)"
    )
    store = CohortStore(run.url, run.storage_options)
    log = None if args.verbose else run_log(run.url, "generate")
    try:
        with (
            libraries_to_log(log) as console,
            tqdm(
                total=todo,
                unit="vol",
                desc="generate",
                mininterval=1.0,
                smoothing=0.1,
                file=console,
            ) as bar,
        ):
            check_pool(args.workers, workers, args.gpus_per_worker)
            totals = generate_cohort(
                run,
                workers=workers,
                gpus_per_worker=args.gpus_per_worker,
                batch_size=args.batch_size,
                progress=lambda rows: bar.update(len(rows)),
                node_wait_s=args.node_wait,
                in_flight=args.in_flight,
            )
    except UsageError:
        raise
    except Exception as exc:  # a failure that retries did not mend: name it, keep the rest
        cause = exc if isinstance(exc, GenerationError) else root_cause(exc)
        print(
            f"ctfactory generate: failed: {type(cause).__name__}: {cause}\n"
            f"committed volumes are kept; re-run the same command to resume",
            file=sys.stderr,
        )
        if log is not None:
            print(log_line(keep_log(log, run.url, store.put)), file=sys.stderr)
        return 1
    print(write_run_summary(store, run.plan, totals, run))
    if log is not None:
        print(log_line(keep_log(log, run.url, store.put)))
    return 0
