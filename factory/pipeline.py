"""plan -> Ray Data -> generator actors -> store: the factory's main job.

The pieces are plain Python: :func:`prepare_run` plans the cohort and readies its store on the
driver, :class:`VolumeWriter` turns a batch of plan rows into committed volumes (testable
without Ray), and :func:`generate_cohort` composes them with Ray Data. Volumes never travel
through the object store or the driver: actors write them and return small rows.
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from factory.errors import CtFactoryError
from factory.raycluster import IN_FLIGHT, NODE_WAIT_S, node_text, this_node
from factory.refs import ref_options
from factory.schema import RECORD_KEYS, RESULT_SCHEMA, RunSettings
from factory.seeds import attempt_seed
from factory.store.cohort import CohortStore, now
from factory.store.fs import StoreError
from factory.store.layout import FORMAT, encode_volume, intensity_stats
from factory.store.lease import Lease

MANIFEST_FLUSH_ROWS = 1000  # the driver appends a manifest part every this many volumes...
MANIFEST_FLUSH_S = 30.0  # ... or this many seconds, whichever comes first
WATCH_EVERY_S = 5.0  # how often the driver looks at the cluster while no volume arrives


class GenerationError(CtFactoryError, RuntimeError):
    """A volume that could not be stored; the message names it and the cause."""


class ActorStartError(CtFactoryError, RuntimeError):
    """A generator actor that cannot start where it was placed: the message names the node, its
    host and the model or classifier it could not load or that differs from the driver's."""


@dataclass
class Run:
    """Everything the driver decided before any actor starts."""

    url: str
    storage_options: dict
    settings: RunSettings  # recorded at the cohort root; actors get them too
    plan: object  # factory.cohort.plan.Plan
    todo: pa.Table  # plan rows still to generate
    state: str  # created / resumed / overwritten
    recovered: int  # committed volumes whose lost manifest rows were restored
    done_before: int
    text_tokens: int  # the model's text.max_tokens, for the end-of-run warning on cut prompts
    lease: Lease | None = None  # the cohort's write lease, held from prepare_run to the end

    def release(self) -> None:
        """Give the cohort's write lease back (generate_cohort does, when it ends)."""
        if self.lease is not None:
            self.lease.release()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@dataclass
class Totals:
    """What a run did, for the summary."""

    written: int = 0
    skipped: int = 0
    bytes_stored: int = 0
    bytes_raw: int = 0
    generate_s: float = 0.0
    write_s: float = 0.0
    wall_s: float = 0.0
    manifest_parts: int = 0
    prompts_cut: int = 0  # written volumes whose prompt the text encoder cut
    most_tokens_cut: int = 0
    rows: list[dict] = field(default_factory=list)

    def add(self, rows: list[dict]) -> None:
        for r in rows:
            if r["status"] == "failed":
                continue
            if r["status"] == "written":
                self.written += 1
                self.generate_s += r["generate_s"]
                self.write_s += r["write_s"]
                cut = r.get("prompt_cut") or 0
                self.prompts_cut += cut > 0
                self.most_tokens_cut = max(self.most_tokens_cut, cut)
            else:
                self.skipped += 1
            self.bytes_stored += r["bytes_stored"]
            self.bytes_raw += r["bytes_raw"]


def installed_version() -> str:
    """This process's ct-factory version (the driver records its own in the run settings)."""
    from importlib.metadata import version

    return version("ct-factory")


def run_settings(spec, plan, checkpoint, sampler: dict, classifier=None) -> RunSettings:
    """The settings recorded at the cohort root; two runs with equal identity keys (plan hash,
    model hash, sampler, grid, verification) make the same volumes."""
    config = checkpoint.config
    return RunSettings(
        format=FORMAT,
        cohort_id=spec.cohort.id,
        n=plan.n,
        plan_hash=plan.plan_hash,
        spec=json.loads(spec.canonical_json()),
        model=spec.model,
        model_hash=checkpoint.hash,
        model_name=checkpoint.card.name,
        sampler=sampler,
        grid={"shape": list(config.size), "spacing_mm": list(config.spacing_mm)},
        anatomy_channels=list(config.diffusion.anatomy_channels),
        hu_window=list(config.hu_window),
        verify=verify_settings(spec, checkpoint, classifier) if classifier else None,
        ct_factory_version=installed_version(),
        created=now(),
    )


def verify_settings(spec, model, classifier) -> dict:
    """The spec's ``verify`` block as run: the classifier (and its hash), threshold, attempts
    and the columns checked. A classifier without those outputs, or on another grid than the
    model's, is refused here, before anything is generated."""
    from factory.cohort.errors import SpecError

    ref = spec.verify.classifier
    columns = list(spec.resolved.verify_columns)
    if not columns:
        raise SpecError(
            ("verify", "findings"), "no findings to check: name them here or under labels"
        )
    if "classifier" not in classifier.weights:
        raise SpecError(
            ("verify", "classifier"),
            f"{ref} has no classifier network (it has {', '.join(sorted(classifier.weights))})",
        )
    missing = [c for c in columns if c not in classifier.config.classifier.findings]
    if missing:
        raise SpecError(
            ("verify", "findings"),
            f"{ref} has no output for {', '.join(missing)}; it was trained on "
            f"{', '.join(classifier.config.classifier.findings)}",
        )
    mine, theirs = classifier.config, model.config
    if tuple(mine.size) != tuple(theirs.size) or tuple(mine.spacing_mm) != tuple(theirs.spacing_mm):
        raise SpecError(
            ("verify", "classifier"),
            f"{ref} reads {list(mine.size)} voxels at {list(mine.spacing_mm)} mm, but the model "
            f"generates {list(theirs.size)} at {list(theirs.spacing_mm)} mm",
        )
    return {
        "classifier": ref,
        "classifier_hash": classifier.hash,
        "threshold": spec.verify.threshold,
        "max_attempts": spec.verify.max_attempts,
        "findings": columns,
    }


def prepare_run(
    spec_path: str,
    out: str | None = None,
    storage_options: dict | None = None,
    limit: int | None = None,
    overwrite: bool = False,
) -> Run:
    """Plan the spec, check the model and sampler, create or resume the store (driver side).

    Raises SpecError, CheckpointError, SamplerError or StoreError (each naming the file, key or
    URL) before anything is generated.
    """
    from factory.cohort.plan import make_plan
    from factory.cohort.spec import load_spec
    from factory.models.checkpoint import load_checkpoint
    from factory.models.sampling import sampling_settings
    from factory.preflight import check_references

    spec = load_spec(spec_path)
    # Local and builtin checkpoints are loaded (and hashed) once, by the checks; remote ones
    # are downloaded here.
    refs = check_references(spec, out, hash_files=True)
    url = out or spec.output
    storage_options = dict(storage_options or {})
    options = ref_options(spec.model, storage_options)
    checkpoint = refs.model or load_checkpoint(spec.model, storage_options=options)
    # The spec's settings, or the model's own; settings it cannot use fail before planning.
    sampler = refs.sampler or sampling_settings(
        checkpoint.config.diffusion, **spec.sampler.model_dump()
    )
    plan = make_plan(spec)
    classifier = None
    if spec.verify is not None:
        ref = spec.verify.classifier
        classifier = refs.classifier or load_checkpoint(
            ref, storage_options=ref_options(ref, storage_options)
        )
    settings = run_settings(spec, plan, checkpoint, sampler, classifier)
    store = CohortStore(url, storage_options)
    lease = store.lease()
    lease.acquire()  # one run at a time: a second one refuses here, naming the first
    lease.keep_alive()
    try:
        state = store.prepare(settings, spec.source.text, plan, overwrite)
        recovered, done = store.recover() if state == "resumed" else (0, set())
    except BaseException:
        lease.release()
        raise
    table = pa.Table.from_batches(list(plan.batches()))
    if done:
        keep = pc.invert(pc.is_in(table.column("volume_id"), pa.array(sorted(done))))
        table = table.filter(keep)
    if limit is not None:
        table = table.slice(0, limit)
    tokens = checkpoint.config.text.max_tokens
    return Run(
        url, storage_options, settings, plan, table, state, recovered, len(done), tokens, lease
    )


def load_actor_generator(ref: str, storage_options: dict | None = None):
    """The default model loader of :class:`VolumeWriter` (GPU when the actor has one)."""
    from factory.models.generator import Generator

    return Generator.load(ref, **(ref_options(ref, storage_options or {}) or {}))


class VolumeWriter:
    """A Ray Data callable: loads the model once, then per batch generates each volume, writes
    it to the store and commits it, returning one small row per volume.

    Calls may run concurrently (Ray Data's ``max_concurrent_calls_per_actor``): sampling is
    one call at a time, and a call compresses and writes its volumes after it lets the next
    call sample, so that the accelerator does not wait for the store.

    ``loader(model_ref, storage_options)`` returns an object with ``model_hash`` and
    ``generate(requests, batch_size)`` (the :class:`Generator` API); benchmarks pass a null one.
    """

    def __init__(
        self,
        url: str,
        storage_options: dict,
        settings: RunSettings,
        threads: int | None = None,
        loader: Callable = load_actor_generator,
    ):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.settings = settings
        self.made_by = this_node()
        here = node_text(self.made_by)
        ours = installed_version()
        if settings.ct_factory_version and ours != settings.ct_factory_version:
            raise ActorStartError(
                f"ct-factory {ours} on {here} but {settings.ct_factory_version} on the driver; "
                "install the same ct-factory on every node (one image for the whole cluster)"
            )
        try:
            self.generator = loader(settings.model, storage_options)
        except (CtFactoryError, OSError) as exc:  # a path that only the driver's machine has
            raise ActorStartError(
                f"model {settings.model}: cannot be loaded on {here}: {exc}; every node must "
                "reach the model: builtin:NAME, an s3:// URL, or a path on every node"
            ) from None
        if self.generator.model_hash != settings.model_hash:
            raise ActorStartError(
                f"model {settings.model}: hash {self.generator.model_hash[:16]} on "
                f"{here} but {settings.model_hash[:16]} on the driver; install the same model "
                "on every node (a model at a URL must not change while a run reads it)"
            )
        self.store = CohortStore(url, storage_options)
        self._sampling = threading.Lock()
        self._started = False  # whether a call has sampled yet
        self.verifier = None
        if settings.verify:
            from factory.evaluate.verify import Verifier

            v = settings.verify
            self.verifier = Verifier(
                v["classifier"],
                v["findings"],
                v["threshold"],
                getattr(self.generator, "device", None),
                ref_options(v["classifier"], storage_options),
            )
            if self.verifier.hash != v["classifier_hash"]:
                raise ActorStartError(
                    f"verify.classifier {v['classifier']}: hash {self.verifier.hash[:16]} on "
                    f"{here} but {v['classifier_hash'][:16]} on the driver"
                )

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        out: list[dict] = []
        todo = []
        for row in rows:
            try:
                committed = self.store.read_marker(row["volume_id"])
            except StoreError as exc:  # retries are spent: the driver stops the run
                out.append({**row, "status": "failed", "error": str(exc)})
                continue
            if committed is not None:  # a retried task: committed already, never twice
                out.append({**committed, "status": "skipped"})
            else:
                todo.append(row)
        # An actor's first volume is sampled alone, then committed, so that a run's first
        # volume comes after one is sampled, not a whole batch.
        first, self._started = not self._started, True
        for part in [todo[:1], todo[1:]] if first else [todo]:
            if not part:
                continue
            with self._sampling:  # one batch on the accelerator; the other call writes
                start = time.perf_counter()
                volumes, verdicts = self._generate(part)
                each = (time.perf_counter() - start) / len(part)
            for row, volume, verdict in zip(part, volumes, verdicts, strict=True):
                try:
                    out.append(self._commit(row, volume, each, verdict))
                except StoreError as exc:  # retries are spent: the driver stops the run
                    out.append({**row, "status": "failed", "error": str(exc)})
        return pa.Table.from_pylist(out, schema=RESULT_SCHEMA)

    def _generate(self, rows: list[dict]) -> tuple[list, list[dict]]:
        """The rows' volumes and, per volume, its verification fields (empty without a
        ``verify`` block): failing volumes are generated again, batched, attempt by attempt."""
        from factory.models.generator import Request

        s = self.settings.sampler

        def generate(idx: list[int], attempt: int) -> list:
            requests = [
                Request(
                    rows[i]["prompt"],
                    attempt_seed(int(rows[i]["seed"]), attempt),
                    s["steps"],
                    s["guidance"],
                    s["scheduler"],
                )
                for i in idx
            ]
            return self.generator.generate(requests, batch_size=len(requests))

        everyone = list(range(len(rows)))
        volumes = generate(everyone, 1)
        if self.verifier is None:
            return volumes, [{} for _ in rows]
        checks = self.verifier.check([v.hu for v in volumes], rows)
        attempts = [1] * len(rows)
        for attempt in range(2, self.settings.verify["max_attempts"] + 1):
            again = [i for i in everyone if not checks[i].passed]
            if not again:
                break
            fresh = generate(again, attempt)
            rechecked = self.verifier.check([v.hu for v in fresh], [rows[i] for i in again])
            for i, volume, check in zip(again, fresh, rechecked, strict=True):
                volumes[i], checks[i], attempts[i] = volume, check, attempt
        verdicts = [
            {
                "attempts": attempts[i],
                "sample_seed": attempt_seed(int(rows[i]["seed"]), attempts[i]),
                "verified": checks[i].passed,
                "verify_failed": json.dumps(checks[i].failed),
                "verify_scores": json.dumps(checks[i].scores, sort_keys=True),
            }
            for i in everyone
        ]
        return volumes, verdicts

    def _commit(self, row: dict, volume, generate_s: float, verdict: dict) -> dict:
        vid = row["volume_id"]
        start = time.perf_counter()
        record = {
            **{k: row[k] for k in RECORD_KEYS},
            "labels": {c: int(row[c]) for c in _finding_columns()},
            "attributes": json.loads(row["attributes"]),
            "model": self.settings.model,
            "model_hash": volume.model_hash,
            "sampler": volume.sampler,
            "verification": verdict or None,
            "made_by": self.made_by,
        }
        encoded = encode_volume(
            vid, volume.hu, volume.masks, volume.affine, volume.spacing,
            self.settings.hu_window, record,
        )  # fmt: skip
        self.store.write_volume(vid, encoded)
        result = {
            **row,
            **encoded.sums,
            **intensity_stats(volume.hu),
            "model_hash": volume.model_hash,
            "sampler": json.dumps(volume.sampler, sort_keys=True),
            "shape": list(volume.hu.shape),
            "spacing_mm": [float(s) for s in volume.spacing],
            "bytes_stored": encoded.nbytes,
            "bytes_raw": int(volume.hu.nbytes + sum(m.nbytes for m in volume.masks.values())),
            "generate_s": generate_s,
            "write_s": time.perf_counter() - start,
            "committed_at": now(),
            **self.made_by,
            **verdict,
        }
        created = self.store.commit(result)
        cut = getattr(volume, "prompt_cut", 0)
        return {**result, "status": "written" if created else "skipped", "prompt_cut": cut}


def _finding_columns() -> tuple[str, ...]:
    from factory import vocab

    return vocab.COLUMNS


def blocks(table: pa.Table, rows: int) -> list[pa.Table]:
    """The plan rows as blocks of one actor batch each, so that every actor gets work."""
    return [table.slice(i, rows) for i in range(0, table.num_rows, rows)]


def watched(items: Iterator, check: Callable[[], None], every: float = WATCH_EVERY_S) -> Iterator:
    """``items`` consumed on a helper thread, so that ``check()`` runs every ``every`` seconds
    while none arrives (a cluster that lost its nodes blocks the iterator for ever); an
    exception from ``check`` or from ``items`` ends the loop. Leaving the loop early stops the
    helper after its current item."""
    box: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()
    end = object()

    def offer(item: object) -> bool:
        """Hand ``item`` over unless the consumer has left; whether it was taken."""
        while not stop.is_set():
            try:
                box.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def pump() -> None:
        try:
            for item in items:
                if not offer(item):
                    break
            else:
                offer(end)
        except BaseException as exc:  # handed to the consumer, who raises it
            offer(exc)
        finally:
            getattr(items, "close", lambda: None)()

    threading.Thread(target=pump, name="ct-factory-results", daemon=True).start()
    try:
        while True:
            try:
                item = box.get(timeout=every)
            except queue.Empty:
                check()
                continue
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def capacity_check(need: dict[str, float], wait_s: float, committed: Callable[[], int]):
    """A ``check`` for :func:`watched`: raises GenerationError once no alive node could host a
    generator actor (``need``: its resources) for ``wait_s`` seconds running."""
    from factory.raycluster import nodes_that_fit

    first_seen: float | None = None  # when no node could host an actor, this time round

    def check() -> None:
        nonlocal first_seen
        if nodes_that_fit(need):
            first_seen = None
            return
        now = time.monotonic()
        first_seen = now if first_seen is None else first_seen
        if now - first_seen >= wait_s:
            wanted = ", ".join(f"{v:g} {k}" for k, v in need.items())
            raise GenerationError(
                f"no node of the cluster can run a generator actor (each needs {wanted}) and "
                f"none came for {wait_s:.0f} s; the {committed():,} volumes committed are kept: "
                "add nodes with these resources (or lower --gpus-per-worker) and re-run the "
                "same command to finish the cohort"
            )

    return check


def generate_cohort(
    run: Run,
    workers: int | tuple[int, int] = 1,
    gpus_per_worker: float | None = None,
    batch_size: int = 4,
    loader: Callable = load_actor_generator,
    progress: Callable[[list[dict]], None] | None = None,
    node_wait_s: float = NODE_WAIT_S,
    in_flight: int = IN_FLIGHT,
) -> Totals:
    """Generate ``run.todo`` with a pool of ``workers`` actors (N, or (MIN, MAX) for a pool that
    grows and shrinks with the cluster); rows reach the manifest in parts.

    ``gpus_per_worker`` defaults to 1 when the cluster has GPUs, else 0 (CPU actors). When no
    node can host an actor for ``node_wait_s`` (all GPU nodes lost, say), the run stops with a
    GenerationError; what was committed stays, and a re-run finishes the cohort.

    Each actor holds at most ``in_flight`` batches (one sampling, the others being written):
    ``in_flight * batch_size`` volumes of memory. 1 samples and writes in turn.

    The run's write lease is checked at every batch and given back at the end, however the
    run ends; a volume gets one manifest row, however often a retried task reports it.
    """
    with run:  # the write lease is given back however the run ends
        import ray

        from factory.raycluster import cluster_has_gpus, cpu_threads, init_ray

        totals = Totals()
        if run.todo.num_rows == 0:
            return totals
        lo, hi = (workers, workers) if isinstance(workers, int) else workers
        init_ray(hi)
        gpus = gpus_per_worker
        if gpus is None:
            gpus = 1.0 if cluster_has_gpus() else 0.0
        threads = None if gpus else cpu_threads(hi)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # ours shows volumes, rate and ETA
        ds = ray.data.from_arrow(blocks(run.todo, batch_size))
        results = ds.map_batches(
            VolumeWriter,
            fn_constructor_kwargs={
                "url": run.url,
                "storage_options": run.storage_options,
                "settings": run.settings,
                "threads": threads,
                "loader": loader,
            },
            batch_size=batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(
                min_size=lo,
                max_size=hi,
                max_concurrent_calls_per_actor=in_flight,
                enable_true_multi_threading=in_flight > 1,
            ),
            num_gpus=gpus,
            num_cpus=0 if gpus else threads,
            zero_copy_batch=True,
        )
        store = CohortStore(run.url, run.storage_options)
        start = time.perf_counter()
        pending: list[dict] = []
        last = time.monotonic()
        need = {"GPU": gpus} if gpus else {"CPU": float(threads or 1)}
        capacity = capacity_check(need, node_wait_s, lambda: run.done_before + totals.written)

        def check() -> None:
            if run.lease is not None:
                run.lease.check()
            capacity()

        listed: set[str] = set()  # volumes given a manifest row by this run
        try:
            batches = results.iter_batches(batch_size=None, batch_format="pyarrow")
            for batch in watched(batches, check):
                if run.lease is not None:
                    run.lease.check()
                rows = batch.to_pylist()
                totals.add(rows)
                failed = [r for r in rows if r["status"] == "failed"]
                fresh = [
                    r for r in rows if r["status"] != "failed" and r["volume_id"] not in listed
                ]
                listed.update(r["volume_id"] for r in fresh)
                pending += fresh
                if failed:
                    raise GenerationError(failed[0]["error"])
                if progress is not None:
                    progress(rows)
                if (
                    len(pending) >= MANIFEST_FLUSH_ROWS
                    or time.monotonic() - last >= MANIFEST_FLUSH_S
                ):
                    flushing, pending, last = pending, [], time.monotonic()
                    totals.manifest_parts += bool(store.write_manifest(flushing))
        except BaseException:
            # What was committed reaches the manifest, in one try: the run is failing, perhaps for
            # the store itself, and the markers hold these rows for the next run to recover.
            with contextlib.suppress(StoreError):
                totals.manifest_parts += bool(store.write_manifest(pending, delays=()))
            raise
        totals.manifest_parts += bool(store.write_manifest(pending))
        totals.wall_s = time.perf_counter() - start
        return totals
