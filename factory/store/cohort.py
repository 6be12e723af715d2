"""A cohort in object storage or on disk: its root, commit protocol, manifest, status and checks.

Layout under the cohort URL::

    zarr.json              root group; attributes ``ct_factory``: format, spec, plan hash,
                           model and model hash, sampler settings, grid (no consolidated metadata)
    spec.yaml              the cohort spec as given
    plan.parquet           the plan (one row per volume to generate)
    volumes/{id}/          one Zarr group per volume (see layout.py)
    committed/{id}.json    the completion marker, created once, holding the volume's manifest row
    manifest/part-*.parquet  the index: one row per committed volume, written in parts
    lease/{generation}.json  the write lease of the run writing the cohort (factory.store.lease)

Commit protocol: arrays, then the marker (created only if absent), then the manifest row.
Readers trust only committed volumes (marker and manifest row); a marker whose manifest row was
lost in a crash is recovered into the manifest by the next run, never regenerated.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from factory import vocab
from factory.refs import RefError, is_local, parse_url
from factory.schema import MANIFEST_SCHEMA, RunSettings, SchemaError
from factory.store.fs import (
    StoreError,
    create_exclusive,
    open_fs,
    put_objects,
    read_whole,
    retrying,
    write_whole,
    zarr_store,
)
from factory.store.layout import (
    FORMAT,
    EncodedVolume,
    StoredVolume,
    check_volume,
    read_volume,
)
from factory.store.lease import LEASES, Lease

SPEC_FILE = "spec.yaml"
PLAN_FILE = "plan.parquet"
VOLUMES = "volumes"
COMMITTED = "committed"
MANIFEST = "manifest"
REPORT = "report"
FINDING_COLUMNS = list(vocab.COLUMNS)


# Where the commit protocol's one atomic step, a marker created only if absent, is proven (by
# the tests: local disk, and S3 through moto's server): a cohort is written only there.
COMMIT_PROTOCOLS = ("file", "s3", "s3a")


def check_output_url(url: str) -> None:
    """Refuse an output whose store the commit protocol is not proven on (reading any
    fsspec store works), naming the protocols that are."""
    try:
        parsed = parse_url(url)
    except RefError as exc:
        raise StoreError(str(exc)) from None
    protocol = "file" if parsed is None else parsed[0]
    if protocol not in COMMIT_PROTOCOLS:
        raise StoreError(
            f"{url}: cannot write a cohort on {protocol}://: its commit (a completion marker "
            "created only if absent) is proven on local paths, file:// and s3:// (s3a://); "
            "write there, then copy the finished cohort"
        )


class CohortExistsError(StoreError):
    """The output holds another cohort (another spec, model or sampler) and may not be reused."""


@dataclass
class Status:
    """Counts of a cohort's volumes by state, and the bytes of the committed ones."""

    planned: int
    done: int
    partial: int
    missing: int
    bytes_stored: int
    uncommitted_markers: int

    def text(self) -> str:
        return (
            f"planned {self.planned:,} | done {self.done:,} | partial {self.partial:,} | "
            f"missing {self.missing:,} | {self.bytes_stored / 2**20:,.1f} MiB stored"
            + (
                f" | {self.uncommitted_markers:,} committed volume(s) not yet in the manifest"
                if self.uncommitted_markers
                else ""
            )
        )


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class CohortStore:
    """One cohort at ``url``: written by the factory, read by :func:`open_cohort` users."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self.path = open_fs(self.url, self.storage_options)
        self._root: zarr.Group | None = None

    # ----- paths and groups -------------------------------------------------------------------
    def _p(self, *parts: str) -> str:
        return "/".join([self.path, *parts])

    def root(self, mode: str = "r") -> zarr.Group:
        if self._root is None or (mode != "r" and self._root.read_only):
            store = zarr_store(self.url, self.storage_options, read_only=mode == "r")
            try:
                self._root = zarr.open_group(store, mode=mode, zarr_format=3)
            except FileNotFoundError:
                raise StoreError(f"{self.url}: no cohort here (no zarr.json at the root)") from None
        return self._root

    def volumes(self, mode: str = "r") -> zarr.Group:
        return self.root(mode)[VOLUMES]

    def exists(self) -> bool:
        return self.fs.exists(self._p("zarr.json"))

    def settings(self) -> RunSettings:
        """The run settings recorded at the root (format, spec, plan and model hashes...)."""
        try:
            recorded = dict(self.root().attrs["ct_factory"])
        except KeyError:
            raise StoreError(
                f"{self.url}: not a ct-factory cohort (no ct_factory attributes)"
            ) from None
        if recorded.get("format") != FORMAT:
            raise StoreError(
                f"{self.url}: format {recorded.get('format')!r}; this reader knows {FORMAT!r}"
            )
        try:
            return RunSettings.from_json(recorded)
        except SchemaError as exc:
            raise StoreError(f"{self.url}: {exc}; written by another ct-factory version") from None

    # ----- creating and resuming --------------------------------------------------------------
    def prepare(self, settings: RunSettings, spec_text: str, plan, overwrite: bool = False) -> str:
        """Create the cohort root, or check that the existing one is the same cohort.

        Returns "created", "resumed" or "overwritten". A different spec, model or sampler in
        the same output is refused (naming what differs) unless ``overwrite``.
        """
        check_output_url(self.url)
        state = "created"
        if self.exists() and "ct_factory" not in self.root().attrs:
            pass  # a root whose creation was interrupted: nothing was generated, create again
        elif self.exists() or self._entries():
            if not self.exists():
                if not overwrite:
                    raise CohortExistsError(
                        f"{self.url}: the folder is not empty and holds no cohort; "
                        "choose another output or pass --overwrite"
                    )
            else:
                differ = self.settings().differences(settings)
                if not differ:
                    return "resumed"
                if not overwrite:
                    what = "; ".join(differ)
                    raise CohortExistsError(
                        f"{self.url}: holds another cohort ({what}); re-run the same spec to "
                        "resume it, choose another output, or pass --overwrite to replace it"
                    )
            retrying(
                f"{self.url}: removing the old cohort",
                lambda: self.fs.rm(self._entries(), recursive=True),
            )
            self._root = None
            state = "overwritten"
        root = retrying(f"{self.url}: creating the cohort root", lambda: self.root("a"))
        retrying(f"{self.url}/{VOLUMES}", lambda: root.require_group(VOLUMES))
        self.put(SPEC_FILE, spec_text.encode())
        retrying(
            f"{self.url}/{PLAN_FILE}",
            lambda: (
                plan.write(self._url(PLAN_FILE), self.storage_options)
                if not is_local(self.url)
                else plan.write(self._p(PLAN_FILE))
            ),
        )
        # The attributes last: a root with them is a complete, resumable cohort root.
        retrying(
            f"{self.url}/zarr.json", lambda: root.attrs.put({"ct_factory": settings.to_json()})
        )
        return state

    def _entries(self) -> list[str]:
        """What the root folder holds, less the write lease (which outlives an overwrite)."""
        try:
            listing = self.fs.ls(self.path, detail=False)
        except FileNotFoundError:
            return []
        return [p for p in listing if p.rstrip("/").rsplit("/", 1)[-1] != LEASES]

    def lease(self) -> Lease:
        """The cohort's write lease (see factory.store.lease), not yet taken."""
        return Lease(self.fs, self.path, self.url)

    def _url(self, name: str) -> str:
        return f"{self.url}/{name}"

    def put(self, name: str, data: bytes, delays: tuple[float, ...] | None = None) -> None:
        """Write a file under the cohort root whole (see :func:`write_whole`), with retries."""
        path = self._p(name)
        retrying(f"{self.url}/{name}", lambda: write_whole(self.fs, path, data), delays)

    def get(self, name: str) -> bytes | None:
        """A file under the cohort root (as :meth:`put` wrote it), or None if there is none."""
        try:
            return self.fs.cat_file(self._p(name))
        except FileNotFoundError:
            return None

    # ----- the commit protocol ----------------------------------------------------------------
    def volume_path(self, volume_id: str) -> str:
        return self._p(VOLUMES, volume_id)

    def write_volume(self, volume_id: str, encoded: EncodedVolume) -> None:
        """Put a volume's objects (replacing those of an earlier, uncommitted attempt)."""
        retrying(
            f"{self.url}: volume {volume_id}: writing its arrays",
            lambda: put_objects(self.fs, self.volume_path(volume_id), encoded.objects),
        )

    def marker_path(self, volume_id: str) -> str:
        return self._p(COMMITTED, f"{volume_id}.json")

    def commit(self, row: Mapping) -> bool:
        """Create the volume's completion marker holding its manifest row; False if one existed."""
        data = json.dumps(dict(row), separators=(",", ":")).encode()
        path = self.marker_path(row["volume_id"])
        return retrying(
            f"{self.url}: volume {row['volume_id']}: writing its completion marker",
            lambda: create_exclusive(self.fs, path, data),
        )

    def read_marker(self, volume_id: str) -> dict | None:
        """The manifest row held by a volume's marker, or None if absent or unreadable; an
        unreachable store is retried, then a StoreError naming the volume."""

        def read() -> dict | None:
            try:
                return json.loads(read_whole(self.fs, self.marker_path(volume_id)))
            except (FileNotFoundError, ValueError):
                return None

        return retrying(f"{self.url}: volume {volume_id}: reading its completion marker", read)

    def committed_ids(self) -> set[str]:
        """Volumes with a completion marker (one listing)."""
        try:
            names = self.fs.ls(self._p(COMMITTED), detail=False)
        except FileNotFoundError:
            return set()
        return {n.rsplit("/", 1)[-1].removesuffix(".json") for n in names if n.endswith(".json")}

    def write_manifest(
        self, rows: Iterable[Mapping], delays: tuple[float, ...] | None = None
    ) -> int:
        """Append one manifest part with ``rows`` (retried on ``delays``, default the store's
        schedule); returns how many rows it holds."""
        rows = list(rows)
        if not rows:
            return 0
        table = pa.Table.from_pylist([manifest_row(r) for r in rows], schema=MANIFEST_SCHEMA)
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        first = min(int(r["index"]) for r in rows)
        name = f"{MANIFEST}/part-{first:09d}-{uuid.uuid4().hex[:8]}.parquet"
        self.put(name, buffer.getvalue(), delays)
        return len(rows)

    def recover(self) -> tuple[int, set[str]]:
        """Write manifest rows for committed volumes whose row was lost (a crash between marker
        and manifest); returns how many, and the ids the manifest now holds. Unreadable markers
        are removed: those volumes count as partial and are generated again."""
        listed = set(self.read_manifest()["volume_id"])
        rows = []
        for volume_id in sorted(self.committed_ids() - listed):
            row = self.read_marker(volume_id)
            if row is None:
                self.fs.rm(self.marker_path(volume_id))
            else:
                rows.append(row)
        return self.write_manifest(rows), listed | {r["volume_id"] for r in rows}

    # ----- reading ----------------------------------------------------------------------------
    def read_manifest(self, seen: dict[str, pa.Table] | None = None) -> pd.DataFrame:
        """One row per committed volume (the cohort's index), in plan order.

        A long-lived reader of a cohort still being written passes ``seen`` (part -> table,
        kept between calls): the listing is then made afresh, not from the filesystem's cache,
        and only parts not read before are fetched (a part, once written, never changes).
        """
        fresh = {} if seen is None else {"refresh": True}
        try:
            listing = self.fs.ls(self._p(MANIFEST), detail=False, **fresh)
            parts = sorted(p for p in listing if p.endswith(".parquet"))
        except FileNotFoundError:
            parts = []
        cache = {} if seen is None else seen
        for part in parts:
            if part not in cache:
                cache[part] = pq.read_table(io.BytesIO(self.fs.cat_file(part)))
        tables = [cache[p] for p in parts]
        if not tables:
            return MANIFEST_SCHEMA.empty_table().to_pandas()
        # Parts written before a column existed read it as null.
        frame = pa.concat_tables(tables, promote_options="default").to_pandas()
        # A part re-written after a crash may repeat rows: the same volume, the same values.
        frame = frame.drop_duplicates("volume_id").sort_values("index", kind="stable")
        return frame.reset_index(drop=True)

    def read_plan(self, columns: list[str] | None = None) -> pa.Table:
        """The plan stored at the root: one row per planned volume (labels, demographics...)."""
        return pq.read_table(io.BytesIO(self.fs.cat_file(self._p(PLAN_FILE))), columns=columns)

    def plan_ids(self) -> list[str]:
        """The ids of every planned volume, from the plan stored at the root."""
        return self.read_plan(["volume_id"]).column("volume_id").to_pylist()

    def volume(self, volume_id: str, masks: bool = True) -> StoredVolume:
        """A committed volume: HU (int16, x y z), masks, affine, spacing and its record."""
        return read_volume(self.volumes(), volume_id, masks)

    def status(self) -> Status:
        manifest = self.read_manifest()
        done = set(manifest["volume_id"])
        committed = self.committed_ids()
        try:
            started = {p.rsplit("/", 1)[-1] for p in self.fs.ls(self._p(VOLUMES), detail=False)}
        except FileNotFoundError:
            started = set()
        started.discard("zarr.json")
        planned = self.plan_ids()
        finished = done | committed
        partial = started - finished
        return Status(
            planned=len(planned),
            done=len(finished),
            partial=len(partial),
            missing=len(set(planned) - finished - partial),
            bytes_stored=int(manifest["bytes_stored"].sum()) if len(manifest) else 0,
            uncommitted_markers=len(committed - done),
        )

    def check(self, progress=None) -> list[str]:
        """Every manifest row's volume read back (missing chunks are errors) and compared with
        its shape and checksums; every row must have its marker. Returns the problems found."""
        manifest = self.read_manifest()
        committed = self.committed_ids()
        volumes = self.volumes()
        problems = []
        for row in manifest.to_dict("records"):
            vid = row["volume_id"]
            found = check_volume(volumes, vid, row, self.fs, self.volume_path(vid))
            if vid not in committed:
                found.append("no completion marker")
            problems += [f"{vid}: {p}" for p in found]
            if progress is not None:
                progress(1)
        return problems


def manifest_row(row: Mapping) -> dict:
    """``row`` reduced to the manifest's columns (numpy scalars made plain)."""
    out = {}
    for f in MANIFEST_SCHEMA:
        value = row.get(f.name)
        if isinstance(value, np.generic):
            value = value.item()
        elif isinstance(value, np.ndarray):
            value = value.tolist()
        out[f.name] = value
    return out
