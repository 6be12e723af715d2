"""``ctfactory view``: a cohort in the browser, served on this machine (factory/viewer/app.py)."""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys

from factory.console import HelpFormatter
from factory.errors import UsageError
from factory.store.cli import add_storage_args, storage_options

EXAMPLES = """\
examples:
  ctfactory view demo-out/cohort
  ctfactory view demo-out/cohort --volume demo_0000003
  ctfactory view s3://my-bucket/cohorts/effusion --endpoint-url http://127.0.0.1:9000 --port 0

The page lists the committed volumes (findings, attributes, age, sex, prompt, verification),
filters them, and opens any in a 3D viewer (axial, coronal and sagittal, window presets, the
anatomy masks as an overlay) with its record. Volumes are read from the store when opened and
sent as NIfTI; a cohort that generate is still writing shows its new volumes on refresh. The
store is read here with your credentials; the browser never sees them. It listens on 127.0.0.1
unless --host says otherwise; --port 0 takes a free port. Ctrl-C stops it.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "view",
        help="browse a cohort in the web browser: its manifest, filtered, and any volume in 3D",
        description="Serve a local web page over a cohort: the manifest listed and filtered, "
        "any volume opened in NiiVue with its record beside it.",
        epilog=EXAMPLES,
        formatter_class=HelpFormatter,
    )
    p.add_argument("url", metavar="COHORT", help="the cohort: a path, file:// or s3:// URL")
    p.add_argument("--volume", metavar="ID", help="open the page at this volume")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    p.add_argument("--port", type=int, default=8765, help="the port to listen on; 0: a free one")
    add_storage_args(p)
    p.set_defaults(func=run)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine only (a loopback address, or localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on ``host``:``port``, or a UsageError naming the options."""
    if not 0 <= port <= 65535:
        raise UsageError(f"--port {port}: not a port; valid: 0 (a free one) to 65535")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)  # from now on a browser's connection waits for the server, not refused
    except OSError as exc:
        raise UsageError(f"--host {host} --port {port}: cannot listen there: {exc}") from None
    return sock


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from factory.store.reader import open_cohort
    from factory.viewer.app import committed_text, make_app

    cohort = open_cohort(args.url, storage_options(args))
    committed = list(cohort.manifest["volume_id"])
    if args.volume is not None and args.volume not in committed:
        raise UsageError(
            f"--volume {args.volume}: not a committed volume of {cohort.url} "
            f"({committed_text(committed)})"
        )
    loopback = is_loopback(args.host)
    app = make_app(cohort, loopback=loopback)
    sock = listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    where = f"[{host}]" if ":" in host else host
    at = f"?volume={args.volume}" if args.volume else ""
    if not loopback:
        print(
            f"ctfactory view: listening on {host}: anyone who reaches it reads {cohort.url} "
            "with your credentials",
            file=sys.stderr,
        )
    print(
        f"ctfactory view: {cohort.url} ({len(committed):,} of {cohort.settings().n:,} volumes "
        f"committed) on http://{where}:{port}/{at} (Ctrl-C stops it)",
        flush=True,
    )
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])
    return 0
