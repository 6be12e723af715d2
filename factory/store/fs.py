"""Storage URLs (a path, file://, s3://...) as fsspec filesystems and zarr stores, with retries.

Every write the factory makes goes through :func:`retrying`, so a store that is unreachable for
a few seconds (an S3 endpoint restarting, a throttled bucket) costs a delay, not a run; a fault
that persists raises :class:`StoreError` naming what was being written and the last cause.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from factory.errors import CtFactoryError
from factory.refs import is_local, local_path

T = TypeVar("T")

# Backoff of a write: 0.5 s doubling to 8 s; the default 10 retries wait about 60 s in all.
# CTFACTORY_WRITE_RETRIES changes how many (Ray workers inherit the driver's environment).
RETRIES_VARIABLE = "CTFACTORY_WRITE_RETRIES"


def retry_delays() -> tuple[float, ...]:
    count = int(os.environ.get(RETRIES_VARIABLE, "10"))
    return tuple(min(8.0, 0.5 * 2**i) for i in range(count))


class StoreError(CtFactoryError, RuntimeError):
    """A store that cannot be read or written; the message names the URL or volume and cause."""


def open_fs(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and root path of ``url`` (local paths made absolute)."""
    if is_local(url):
        return LocalFileSystem(), local_path(url)
    try:
        return fsspec.core.url_to_fs(url, **(storage_options or {}))
    except Exception as exc:
        raise StoreError(f"{url}: cannot open: {exc}") from None


def write_url(url: str, data: bytes, storage_options: dict | None = None) -> None:
    """Write ``data`` to a local path or fsspec URL, making parent folders."""
    fs, path = open_fs(url, storage_options)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, data)


def put_objects(fs: fsspec.AbstractFileSystem, root: str, objects: dict[str, bytes]) -> None:
    """Write ``objects`` (key under ``root`` -> bytes): one PUT each on an object store, sent
    together; plain files (and their folders) on local disk. Nothing is listed or checked
    first: a key that exists is replaced."""
    paths = {f"{root}/{key}": data for key, data in objects.items()}
    if isinstance(fs, LocalFileSystem):
        for folder in {path.rsplit("/", 1)[0] for path in paths}:
            os.makedirs(folder, exist_ok=True)
        for path, data in paths.items():
            with open(path, "wb") as f:
                f.write(data)
    else:
        fs.pipe(paths)


def write_whole(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a reader sees the old bytes or the new, never a
    part: local files are written aside and renamed; an object store's PUT is whole."""
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def read_whole(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    """A whole object in one GET (FileNotFoundError if there is none): asked as the byte
    range from 0, since s3fs asks an object's size first otherwise (a HEAD, and for a key
    that does not exist a LIST as well)."""
    return fs.cat_file(path, start=0)


def arrow_fs(url: str, storage_options: dict | None = None):
    """(a pyarrow filesystem, or None for a local path, and the path) for Ray Data, Ray Train
    and Parquet, which take pyarrow filesystems rather than fsspec's."""
    import pyarrow.fs

    fs, path = open_fs(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        return None, path
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path


def zarr_store(url: str, storage_options: dict | None = None, read_only: bool = False):
    """A zarr v3 store on ``url``: a LocalStore for paths, an FsspecStore for object storage."""
    from zarr.storage import FsspecStore, LocalStore

    if is_local(url):
        path = Path(local_path(url))
        if not read_only:
            path.mkdir(parents=True, exist_ok=True)
        return LocalStore(path, read_only=read_only)
    return FsspecStore.from_url(url, storage_options=storage_options or {}, read_only=read_only)


# A full disk or quota, a file over the size limit, a read-only store: waiting does not mend
# these, so a write fails at once instead of spending its retries.
FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


def retrying(what: str, fn: Callable[[], T], delays: tuple[float, ...] | None = None) -> T:
    """``fn()``, retried after transient failures on the ``delays`` schedule (default
    :func:`retry_delays`), each retry once the failed attempt's IO has settled.

    Errors that retrying cannot mend (a file that exists, bad values, a full disk) fail at
    once; every failure is raised as a StoreError naming ``what``.
    """
    delays = retry_delays() if delays is None else delays
    for attempt in range(len(delays) + 1):
        try:
            return fn()
        except (FileExistsError, ValueError, TypeError, KeyError) as exc:
            raise StoreError(f"{what}: failed: {type(exc).__name__}: {exc}") from exc
        except Exception as exc:
            if isinstance(exc, OSError) and exc.errno in FULL:
                raise StoreError(
                    f"{what}: failed: {os.strerror(exc.errno)} ({errno.errorcode[exc.errno]}); "
                    "make room on the store (or make it writable), then re-run: committed "
                    "volumes are kept"
                ) from exc
            if attempt == len(delays):
                raise StoreError(
                    f"{what}: failed after {attempt + 1} attempts: {type(exc).__name__}: {exc}"
                ) from exc
            settle()
            time.sleep(delays[attempt])
    raise AssertionError("unreachable")


SETTLE_TIMEOUT_S = 120.0


def settle(timeout: float = SETTLE_TIMEOUT_S) -> None:
    """Wait until the IO running on zarr's and fsspec's event loops has finished.

    asyncio.gather (zarr's writes, fsspec's bulk calls) does not cancel the siblings of a task
    that failed, and s3fs retries each request on its own: a failed attempt can leave writes in
    flight that land after the retry and replace its bytes (the group metadata without its
    attributes, or a delete). Tasks still running after ``timeout`` s are left alone.
    """
    from fsspec import asyn
    from zarr.core import sync

    for loop in {sync.loop[0], asyn.loop[0]} - {None}:
        if loop.is_running() and not loop.is_closed():
            asyncio.run_coroutine_threadsafe(_finished(timeout), loop).result()


async def _finished(timeout: float) -> None:
    """Wait for every other task of the running loop, at most ``timeout`` s."""
    current = asyncio.current_task()
    pending = [task for task in asyncio.all_tasks() if task is not current]
    if pending:
        await asyncio.wait(pending, timeout=timeout)


def create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Write ``path`` only if it does not exist, all at once; False if it already existed.

    Local files are written aside and hard-linked into place (atomic, never partial); object
    stores use a conditional PUT (``If-None-Match``), which S3 and moto honour.
    """
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.remove(tmp)
    try:
        fs.pipe_file(path, data, mode="create")
        return True
    except FileExistsError:
        return False
