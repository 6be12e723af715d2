"""An S3 API server on 127.0.0.1 (moto's) that counts the requests it serves by kind, so that
a test or benchmark can say what one volume costs in PUT, GET, HEAD and LIST requests, and that
can hold chosen writes at a :class:`Gate` so that a test orders events without racing a clock."""

from __future__ import annotations

import io
import re
import threading
from collections import Counter
from urllib.parse import parse_qs

from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import WSGIRequestHandler, make_server

KINDS = ("PUT", "GET", "HEAD", "LIST", "DELETE", "OTHER")


def request_kind(method: str, path: str, query: str) -> str:
    """PUT (and multipart POST), GET, HEAD, LIST (a GET of a bucket), DELETE, or OTHER."""
    key = path.lstrip("/").partition("/")[2]
    params = parse_qs(query, keep_blank_values=True)
    if method == "GET":
        return "LIST" if not key or "list-type" in params else "GET"
    if method == "POST":
        return "DELETE" if "delete" in params else "PUT"
    return method if method in KINDS else "OTHER"


class QuietHandler(WSGIRequestHandler):
    def log_request(self, *args, **kwargs) -> None:  # a line per request would flood the run
        pass


class Gate:
    """Holds each PUT whose path matches ``pattern`` while closed (at most ``limit_s``), keeping
    its body for the test to read; the client sees a slow server (and may time out and retry).
    Closed when made."""

    def __init__(self, pattern: str, limit_s: float = 600.0) -> None:
        self._pattern, self._limit_s = re.compile(pattern), limit_s
        self._open = threading.Event()
        self._lock = threading.Lock()
        self._held: list[bytes] = []

    def open(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._open.clear()

    def held(self) -> list[bytes]:
        """The bodies of the requests held now."""
        with self._lock:
            return list(self._held)

    def wrap(self, app):
        """``app`` (a WSGI application) behind this gate."""

        def gated(environ, start_response):
            if environ["REQUEST_METHOD"] != "PUT" or not self._pattern.search(
                environ.get("PATH_INFO", "")
            ):
                return app(environ, start_response)
            length = environ.get("CONTENT_LENGTH")
            body = environ["wsgi.input"].read(int(length) if length else -1)
            environ["wsgi.input"] = io.BytesIO(body)
            with self._lock:
                self._held.append(body)
            try:
                self._open.wait(self._limit_s)
            finally:
                with self._lock:
                    self._held.remove(body)
            return app(environ, start_response)

        return gated


class CountingServer:
    """moto's S3 server in a thread of this process; ``counts()`` is what it served so far.
    With a ``gate``, the PUTs it matches wait for it to open."""

    def __init__(self, gate: Gate | None = None) -> None:
        app = DomainDispatcherApplication(create_backend_app)
        app = gate.wrap(app) if gate else app
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

        def counting(environ, start_response):
            kind = request_kind(
                environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""),
                environ.get("QUERY_STRING", ""),
            )  # fmt: skip
            with self._lock:
                self._counts[kind] += 1
            return app(environ, start_response)

        self._server = make_server(
            "127.0.0.1", 0, counting, threaded=True, request_handler=QuietHandler
        )
        self.endpoint = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def options(self) -> dict:
        """s3fs storage options for this server."""
        return {"endpoint_url": self.endpoint, "key": "testing", "secret": "testing"}

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {k: self._counts[k] for k in KINDS}

    def since(self, before: dict[str, int]) -> dict[str, int]:
        """The requests served since ``before`` (an earlier ``counts()``), by kind."""
        now = self.counts()
        return {k: now[k] - before[k] for k in KINDS}

    def stop(self) -> None:
        self._server.shutdown()
