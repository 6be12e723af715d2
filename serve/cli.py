"""``ctfactory serve``: the Ray Serve application on a local Ray (or ``RAY_ADDRESS``)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

from factory.console import HelpFormatter
from factory.errors import UsageError
from serve.config import ServeConfig, ServeConfigError, parse_serve_config, read_app_args

DEFAULT_CONFIG = Path(__file__).parent / "config.yaml"
STOP_TIMEOUT_S = 60.0  # Ctrl-C waits this long at most for Serve to shut down

EXAMPLES = """\
examples:
  ctfactory serve
  ctfactory serve --port 8080 --model big=s3://models/ct-base --default-model big
  CTFACTORY_API_KEY=secret ctfactory serve --config my-serve.yaml
  curl -o ct.nii.gz -H 'Content-Type: application/json' \\
       -d '{"prompt": "Large bilateral pleural effusion.", "seed": 7}' \\
       http://127.0.0.1:8000/v1/volumes

The page at http://HOST:PORT/ generates previews and NIfTI downloads; the API is described at
/docs. On a cluster use `serve deploy serve/config.yaml` instead (docs/serving.md).
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the models over HTTP with Ray Serve (API, previews, web page)",
        description="Run the ct-factory Ray Serve application: POST /v1/volumes and "
        "/v1/previews, GET /v1/models, /healthz, /readyz, a web page at /.",
        epilog=EXAMPLES,
        formatter_class=HelpFormatter,
    )
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="a Ray Serve config file")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="ID=REF",
        help="serve a checkpoint (builtin:NAME, directory, s3://...) under ID; repeatable",
    )
    p.add_argument("--default-model", help="model id used when a request names none")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> dict:
    """The application args of ``--config`` with ``--model``/``--default-model`` applied."""
    try:
        app_args, _ = read_app_args(args.config)
    except ServeConfigError as exc:
        raise UsageError(f"--config: {exc}") from None
    models = dict(app_args.get("models") or ServeConfig().models)  # --model adds to these
    for item in args.model:
        mid, sep, ref = item.partition("=")
        if not sep or not mid or not ref:
            raise UsageError(f"--model {item!r}: expected ID=REF, e.g. demo=builtin:demo")
        models[mid] = ref
    if models:
        app_args["models"] = models
    if args.default_model:
        app_args["default_model"] = args.default_model
    parse_serve_config(app_args, f"{args.config}: applications[0].args")
    if not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port}: expected 1-65535")
    return app_args


def run(args: argparse.Namespace) -> int:
    app_args = config_from_args(args)
    from ray import serve

    from factory.raycluster import init_ray
    from serve.app import build_app

    init_ray(1)
    try:
        # One proxy, on this machine: the address is this machine's (on a cluster, `serve
        # deploy serve/config.yaml` puts one on every node).
        serve.start(http_options={"host": args.host, "port": args.port}, proxy_location="HeadOnly")
        serve.run(build_app(app_args), name="ct-factory", route_prefix="/")
        url = f"http://{args.host}:{args.port}/"
        print(
            f"ct-factory is serving on {url} (API docs at {url}docs); Ctrl-C stops it", flush=True
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:  # also while still deploying
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # stopping takes a while: once is enough
        stop_serving()
        print("ctfactory serve: interrupted", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)  # exit code of ^C, whatever Ray's exit handlers would still wait for


def stop_serving(timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Shut Serve and this driver's Ray connection down, waiting at most ``timeout_s``: on a
    loaded shared cluster Serve's shutdown once outlasted two minutes, and Ctrl-C must end the
    command all the same."""
    import ray
    from ray import serve

    def stop() -> None:
        serve.shutdown()
        ray.shutdown()

    worker = threading.Thread(target=stop, name="stop-serving", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        print(
            f"ctfactory serve: Serve did not stop within {timeout_s:.0f} s; exiting anyway "
            "(run `serve shutdown` against the cluster to remove its applications)",
            file=sys.stderr,
            flush=True,
        )
