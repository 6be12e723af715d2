"""Schema fuzzing of the served API (docs/serving.md, "Limits and errors"), outside CI:

    .venv/bin/python benchmarks/serve_fuzz.py [--cases 2000] [--seed 0]
        [--url http://HOST:PORT] [--header 'X-API-Key: ...']

Starts the Serve application on a local Ray (``--model``, builtin:demo by default, steps capped
at 2 so that a generated request costs little) unless ``--url`` names a running server, then
sends ``--cases`` schemathesis cases drawn from its /openapi.json: every operation gets an
equal share (what a GET without parameters cannot use goes to the others), half of it fitting
the schema and half not. It prints how many cases got each
status code, every 5xx with a curl command that repeats it, and the status of one ordinary
request sent after the run (the server must still serve).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field

PROMPT = "Large bilateral pleural effusion."
TIMEOUT_S = 120.0  # per request


@dataclass
class Tally:
    """Status codes seen, and the requests that got a 5xx or no answer."""

    statuses: Counter[int] = field(default_factory=Counter)
    by_operation: dict[str, Counter[int]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # a 5xx, or a request that got no answer

    def add(self, label: str, status: int) -> None:
        """Count one response of ``label`` (an operation)."""
        self.statuses[status] += 1
        self.by_operation.setdefault(label, Counter())[status] += 1


def free_port() -> int:
    """A port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(model: str) -> str:
    """The Serve application on a fresh local Ray; returns its base URL once it is ready."""
    import ray
    from ray import serve

    from serve.app import build_app

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=(os.cpu_count() or 1) + 2, include_dashboard=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {
        "models": {"m": model},
        "default_model": "m",
        "limits": {"max_steps": 2, "default_steps": 1, "max_queued_requests": 64},
        "api_key_env": None,
    }
    serve.run(build_app(args), name="fuzz", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while ordinary(base, {}) != 200:
        if time.monotonic() > deadline:
            sys.exit("serve_fuzz: the application never answered an ordinary request")
        time.sleep(1)
    return base


def ordinary(base: str, headers: dict[str, str]) -> int:
    """The status of one ordinary POST /v1/volumes (0: no answer)."""
    body = json.dumps({"prompt": PROMPT, "seed": 1, "steps": 1, "format": "npy"}).encode()
    request = urllib.request.Request(base + "/v1/volumes", body, method="POST")
    for name, value in {"Content-Type": "application/json", **headers}.items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def fuzz(base: str, cases: int, seed: int, headers: dict[str, str]) -> Tally:
    """Send about ``cases`` schemathesis cases, shared equally by operation and by mode
    (positive: fitting the schema; negative: not); a share left unused goes to the next."""
    import schemathesis
    from schemathesis.generation.modes import GenerationMode

    schema = schemathesis.openapi.from_url(base + "/openapi.json", headers=headers)
    operations = [result.ok() for result in schema.get_all_operations()]
    operations.sort(key=lambda op: len(op.body))  # bodiless ones run short: their rest goes on
    shares = [(op, mode) for op in operations for mode in GenerationMode]
    tally = Tally()
    for i, (operation, mode) in enumerate(shares):
        left = cases - sum(tally.statuses.values())
        share = max(1, left // (len(shares) - i))
        send_cases(operation.as_strategy(mode), share, seed, base, headers, tally)
    return tally


def send_cases(strategy, n: int, seed: int, base: str, headers: dict, tally: Tally) -> None:
    """Send ``n`` cases drawn from ``strategy`` (fewer where it has fewer), counting each."""
    import hypothesis
    from hypothesis import HealthCheck, Phase, given

    @hypothesis.settings(
        max_examples=n,
        phases=[Phase.generate],  # no shrinking: every case is sent once
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @hypothesis.seed(seed)
    @given(case=strategy)
    def send(case) -> None:
        label = f"{case.operation.method.upper()} {case.operation.path}"
        try:
            response = case.call(base_url=base, headers=headers, timeout=TIMEOUT_S)
        except Exception as exc:  # no answer at all is reported with the 5xx
            tally.add(label, 0)
            tally.errors.append(f"no answer ({exc!r}): {curl(case, headers, base)}")
            return
        tally.add(label, response.status_code)
        if response.status_code >= 500:
            text = response.text[:300]
            tally.errors.append(f"{response.status_code} {text}: {curl(case, headers, base)}")

    with contextlib.suppress(hypothesis.errors.Unsatisfiable):  # e.g. no negative form of a GET
        send()


def curl(case, headers: dict[str, str], base: str) -> str:
    """A curl command that repeats ``case``, cut to a readable length."""
    command = case.as_curl_command(headers, base_url=base)
    return command if len(command) <= 2000 else command[:2000] + f"... ({len(command)} chars)"


def report(tally: Tally, after: int, seconds: float) -> None:
    """The tally as Markdown tables, then the 5xx."""
    total = sum(tally.statuses.values())
    print(f"{total} cases in {seconds:.0f} s")
    codes = sorted(tally.statuses)
    print("| operation | " + " | ".join(str(c) for c in codes) + " |")
    print("|---|" + "---|" * len(codes))
    for label, counts in tally.by_operation.items():
        print(f"| {label} | " + " | ".join(str(counts[c]) for c in codes) + " |")
    print("| all | " + " | ".join(str(tally.statuses[c]) for c in codes) + " |")
    print(f"5xx or no answer: {len(tally.errors)}")
    for line in tally.errors:
        print("  " + line)
    print(f"an ordinary request after the run: {after}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="builtin:demo")
    parser.add_argument("--url", help="a running server (default: start one)")
    parser.add_argument("--header", action="append", default=[], metavar="NAME: VALUE")
    args = parser.parse_args()
    headers = dict(h.split(":", 1) for h in args.header)
    headers = {k.strip(): v.strip() for k, v in headers.items()}
    base = args.url.rstrip("/") if args.url else start_app(args.model)
    start = time.perf_counter()
    tally = fuzz(base, args.cases, args.seed, headers)
    report(tally, ordinary(base, headers), time.perf_counter() - start)
    sys.exit(1 if tally.errors else 0)


if __name__ == "__main__":
    main()
