"""``ctfactory view``'s web app: the cohort browser page, NiiVue, and a JSON and NIfTI API over
one cohort, read from the store on demand (nothing is copied out of the cohort).

Only committed volumes (a manifest row) are listed or sent, and the manifest is listed afresh
for each listing, so a cohort that ``generate`` is still writing shows its new volumes. The
store is read here, on the server, with the user's storage options: the browser gets JSON and
NIfTI, never credentials. Errors are JSON ``{"error", "field"}``: 404 for an id that is not a
committed volume, 422 for a bad filter, 503 when the store cannot be read.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pandas as pd
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from factory import vocab
from factory.errors import CtFactoryError
from factory.store.export import anatomy_nifti, hu_nifti
from factory.store.fs import StoreError, retrying
from factory.store.layout import StoredVolume
from factory.store.reader import Cohort
from factory.viewer import STATIC
from factory.viewer.catalog import QueryError, parse_query, record, select, summary

PAGE = Path(__file__).parent / "page"  # the cohort browser: index.html, browse.js, browse.css
READ_RETRIES = (0.5,)  # a read tried twice, then 503 naming the store and the cause
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
T = TypeVar("T")


class NotFound(CtFactoryError, LookupError):
    """An id that is not a committed volume of the cohort, or masks a volume does not have;
    the message names the id and what there is."""


class LiveCohort:
    """A cohort as the app reads it: the manifest re-listed when asked (only new parts are
    fetched) and kept, indexed by id, for the volume routes until the next listing."""

    def __init__(self, cohort: Cohort):
        self.cohort = cohort
        self.settings = cohort.settings()
        self._parts: dict = {}
        self._rows = pd.DataFrame()
        self._lock = threading.Lock()

    def reading(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()`` on the store, tried twice, else a StoreError naming the cohort and cause."""
        return retrying(f"{self.cohort.url}: {what}", fn, READ_RETRIES)

    def manifest(self) -> pd.DataFrame:
        """The committed volumes now, in plan order."""
        with self._lock:
            frame = self.reading(
                "reading the manifest", lambda: self.cohort.read_manifest(self._parts)
            )
            if frame.empty and not self.reading("reading the root", self.cohort.exists):
                raise StoreError(f"{self.cohort.url}: no cohort here any more (no zarr.json)")
            self._rows = frame.set_index("volume_id", drop=False)
            return frame

    def row(self, volume_id: str) -> pd.Series:
        """A committed volume's manifest row (listed afresh if the id is new to the app)."""
        if volume_id not in self._rows.index:
            self.manifest()
        if volume_id not in self._rows.index:
            raise NotFound(
                f"{volume_id}: not a committed volume of {self.cohort.url} "
                f"({committed_text(list(self._rows.index))})"
            )
        return self._rows.loc[volume_id]

    def volume(self, volume_id: str, masks: bool) -> StoredVolume:
        """A committed volume read from the store."""
        self.row(volume_id)
        return self.reading(
            f"volume {volume_id}: reading it", lambda: self.cohort.volume(volume_id, masks)
        )


def committed_text(ids: list[str]) -> str:
    """How many volumes are committed, and the first few ids."""
    some = ", ".join(ids[:3]) + (", ..." if len(ids) > 3 else "")
    return f"{len(ids):,} committed" + (f": {some}" if ids else "")


def error(status: int, message: str, field: str | None = None) -> JSONResponse:
    """The JSON body of every 4xx and 5xx."""
    return JSONResponse({"error": message, "field": field}, status)


def nifti(body: bytes, name: str, headers: dict | None = None) -> Response:
    """A .nii.gz body, saved as ``name`` when the page's Download link is followed."""
    disposition = {"Content-Disposition": f'attachment; filename="{name}"'}
    return Response(body, media_type="application/gzip", headers=disposition | (headers or {}))


def make_app(cohort: Cohort, loopback: bool = True) -> FastAPI:
    """The app over ``cohort``; ``loopback``: answer only requests addressed to this machine's
    loopback names (a page elsewhere cannot reach it through DNS rebinding)."""
    live = LiveCohort(cohort)
    settings = live.settings
    # No /docs: FastAPI's docs page loads its scripts from a CDN.
    app = FastAPI(title="ct-factory view", docs_url=None, redoc_url=None, openapi_url=None)
    if loopback:

        @app.middleware("http")
        async def loopback_only(request: Request, call_next):
            if request.url.hostname not in LOOPBACK_HOSTS:
                names = ", ".join(LOOPBACK_HOSTS)
                return error(400, f"Host {request.url.hostname}: this server answers {names}")
            return await call_next(request)

    app.add_exception_handler(QueryError, lambda _, exc: error(422, str(exc), exc.parameter))
    app.add_exception_handler(NotFound, lambda _, exc: error(404, str(exc), "volume_id"))
    app.add_exception_handler(StoreError, lambda _, exc: error(503, str(exc)))
    app.add_exception_handler(HTTPException, lambda _, exc: error(exc.status_code, exc.detail))

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(PAGE / "index.html")

    @app.get("/api/cohort")
    def about() -> dict:
        """The cohort: its URL, id, model, planned volumes and anatomy channels, the findings."""
        return {
            "url": cohort.url,
            "cohort_id": settings.cohort_id,
            "planned": settings.n,
            "model": settings.model,
            "model_hash": settings.model_hash,
            "anatomy_channels": list(settings.anatomy_channels),
            "findings": [{"id": f.id, "name": f.column} for f in vocab.FINDINGS],
        }

    @app.get("/api/volumes")
    def volumes(request: Request) -> dict:
        """The committed volumes the filters keep (query string: finding, attribute, sex,
        age_min, age_max, prompt, verified, limit)."""
        query = parse_query(request.query_params.multi_items())
        manifest = live.manifest()
        kept = select(manifest, query)
        return {
            "planned": settings.n,
            "committed": len(manifest),
            "matched": len(kept),
            "volumes": [summary(row) for row in kept.head(query.limit).to_dict("records")],
        }

    @app.get("/api/volumes/{volume_id}")
    def volume_record(volume_id: str) -> dict:
        """A committed volume's record: its manifest row, JSON columns parsed."""
        return record(live.row(volume_id).to_dict())

    @app.get("/api/volumes/{volume_id}/ct.nii.gz")
    def ct(volume_id: str) -> Response:
        """The volume as NIfTI: int16 HU with its real affine, read from the store now."""
        return nifti(hu_nifti(live.volume(volume_id, masks=False)), f"{volume_id}.nii.gz")

    @app.get("/api/volumes/{volume_id}/anatomy.nii.gz")
    def anatomy(volume_id: str) -> Response:
        """The volume's anatomy masks as one uint8 label map, its legend in X-Anatomy-Legend."""
        volume = live.volume(volume_id, masks=True)
        if not volume.masks:
            raise NotFound(f"{volume_id}: has no anatomy masks (its model makes none)")
        body, legend = anatomy_nifti(volume)
        header = {"X-Anatomy-Legend": json.dumps({str(k): v for k, v in legend.items()})}
        return nifti(body, f"{volume_id}.anatomy.nii.gz", header)

    app.mount("/page", StaticFiles(directory=PAGE), name="page")
    app.mount("/viewer", StaticFiles(directory=STATIC), name="viewer")
    return app
