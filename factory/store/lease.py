"""One run at a time writes a cohort: a lease taken with a create-only-if-absent write (the
commit protocol's one atomic step), kept alive by a heartbeat, and expiring, so that a killed
run never blocks the cohort for ever.

A lease is a numbered object ``lease/{generation}.json`` under the cohort root holding the
holder's host, process, start and last heartbeat. The live lease is the highest generation: a
run takes the next number, and only one run can create it. A run that finds the highest one
fresh refuses, naming its holder; one whose heartbeat is older than its time-to-live, that was
released, that this same process holds, or whose process on this host is gone (killed) is
taken over by creating the next number. A holder
checks at every heartbeat that no next number exists: if it was paused past its expiry and
another run took over, it stops. The clocks of the machines sharing a cohort must agree to
well within the time-to-live.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import fsspec

from factory.store.fs import StoreError, create_exclusive, read_whole, retrying, write_whole

LEASES = "lease"
TTL_S = 60.0  # a lease not renewed for this long may be taken over
TTL_VARIABLE = "CTFACTORY_LEASE_TTL_S"


class CohortBusyError(StoreError):
    """Another run holds the cohort's lease; the message names its host, process and start."""


@dataclass
class Holder:
    """Who holds a lease, as written in its object."""

    run_id: str
    host: str
    pid: int
    started_at: float  # seconds since the epoch
    renewed_at: float
    ttl_s: float
    released: bool = False

    def text(self) -> str:
        started = datetime.fromtimestamp(self.started_at, UTC).isoformat(timespec="seconds")
        return f"host {self.host}, process {self.pid}, started {started}"

    def ours(self) -> bool:
        """Whether this process holds it (a second prepare_run here takes it over)."""
        return (self.host, self.pid) == (socket.gethostname(), os.getpid())

    def running(self) -> bool:
        """Whether the holder's process may still run: one on this host that is gone (killed,
        crashed) is known dead at once, without waiting for its lease to expire."""
        if self.host != socket.gethostname():
            return True
        try:
            os.kill(self.pid, 0)  # PermissionError: another user's process, alive
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True

    def live(self, now: float) -> bool:
        return not self.released and now - self.renewed_at < self.ttl_s


def ttl_s() -> float:
    return float(os.environ.get(TTL_VARIABLE, TTL_S))


class Lease:
    """The write lease of the cohort whose root is ``path`` on ``fs`` (``url`` in messages)."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, url: str, ttl: float = 0.0):
        self.fs, self.root, self.url = fs, f"{path}/{LEASES}", url
        self.ttl = ttl or ttl_s()
        self.generation = 0
        self.holder: Holder | None = None
        self.lost: str | None = None  # why the lease is no longer ours, once it is not
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _path(self, generation: int) -> str:
        return f"{self.root}/{generation:09d}.json"

    def _read(self, generation: int) -> Holder | None:
        try:
            return Holder(**json.loads(read_whole(self.fs, self._path(generation))))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError):  # damaged: treated as released
            return Holder("?", "?", 0, 0.0, 0.0, 0.0, released=True)

    def _latest(self) -> int:
        try:
            names = self.fs.ls(self.root, detail=False, refresh=True)
        except FileNotFoundError:
            return 0
        numbers = [n.rsplit("/", 1)[-1].removesuffix(".json") for n in names]
        return max((int(n) for n in numbers if n.isdigit()), default=0)

    def acquire(self) -> None:
        """Take the lease, or raise CohortBusyError naming the live holder."""
        latest = self._latest()
        current = self._read(latest) if latest else None
        now = time.time()
        if current is not None and current.live(now) and not current.ours() and current.running():
            raise self._busy(current, now)
        holder = Holder(uuid.uuid4().hex, socket.gethostname(), os.getpid(), now, now, self.ttl)
        created = retrying(
            f"{self.url}: taking the write lease",
            lambda: create_exclusive(self.fs, self._path(latest + 1), _json(holder)),
        )
        if not created:  # another run took this number first
            winner = self._read(latest + 1)
            raise self._busy(winner or holder, time.time())
        self.generation, self.holder = latest + 1, holder
        if latest:  # the lease taken over: its holder finds ours at its next heartbeat
            with contextlib.suppress(OSError):  # best effort: a leftover is only clutter
                self.fs.rm(self._path(latest))

    def _busy(self, holder: Holder, now: float) -> CohortBusyError:
        left = max(0.0, holder.ttl_s - (now - holder.renewed_at))
        return CohortBusyError(
            f"{self.url}: another run is writing this cohort ({holder.text()}; last heard "
            f"{now - holder.renewed_at:.0f} s ago); wait for it to finish, or, if it was "
            f"killed, re-run after its lease expires (in {left:.0f} s at most)"
        )

    def renew(self) -> None:
        """One heartbeat: stop holding if a later run took over, else refresh the lease."""
        assert self.holder is not None, "renew before acquire"
        taker = self._read(self.generation + 1)
        if taker is not None:
            self.lost = f"{self.url}: this run's write lease was taken over by {taker.text()}"
            return
        self.holder.renewed_at = time.time()
        write_whole(self.fs, self._path(self.generation), _json(self.holder))

    def check(self) -> None:
        """Raise CohortBusyError once the lease is lost (taken over, or not renewed in time)."""
        held = self.lost is None and self.holder is not None
        if held and time.time() - self.holder.renewed_at >= self.ttl:
            self.lost = (
                f"{self.url}: this run could not renew its write lease for {self.ttl:.0f} s "
                "(the store unreachable?); another run may take the cohort over"
            )
        if self.lost is not None:
            raise CohortBusyError(f"{self.lost}; stopping (committed volumes are kept)")

    def release(self) -> None:
        """Stop the heartbeat and mark the lease released, so a next run need not wait."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if self.holder is None or self.lost is not None:
            return
        self.holder.released = True
        with contextlib.suppress(Exception):  # unreachable store: the lease expires anyway
            write_whole(self.fs, self._path(self.generation), _json(self.holder))

    def keep_alive(self, on_error: Callable[[BaseException], None] | None = None) -> None:
        """Renew the lease every quarter of its time-to-live on a daemon thread until
        :meth:`release`; a failed heartbeat is tried again at the next one."""

        def beat() -> None:
            while not self._stop.wait(self.ttl / 4) and self.lost is None:
                try:
                    self.renew()
                except Exception as exc:
                    if on_error is not None:
                        on_error(exc)

        self._beat = threading.Thread(target=beat, name="cohort-lease", daemon=True)
        self._beat.start()

    def __enter__(self) -> Lease:
        self.acquire()
        self.keep_alive()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _json(holder: Holder) -> bytes:
    return json.dumps(asdict(holder), separators=(",", ":")).encode()
