"""The driver's loop over results, without Ray: a cluster that stops answering is noticed."""

from __future__ import annotations

import threading
import time

import pytest

from factory.pipeline import GenerationError, watched


def test_items_flow_and_check_runs_only_while_none_arrives():
    checks = []
    got = list(watched(iter(range(5)), lambda: checks.append(1), every=0.05))
    assert got == [0, 1, 2, 3, 4] and checks == []


def test_a_stalled_source_is_stopped_by_its_check():
    released = threading.Event()

    def stalled():
        yield "first"
        released.wait()  # a cluster with no node left: the next item never comes
        yield "never"

    calls = []

    def check():
        calls.append(time.monotonic())
        if len(calls) >= 3:
            raise GenerationError("no node can run an actor")

    out = []
    with pytest.raises(GenerationError, match="no node"):
        for item in watched(stalled(), check, every=0.05):
            out.append(item)
    assert out == ["first"] and len(calls) == 3
    released.set()


def test_an_error_of_the_source_reaches_the_consumer():
    def failing():
        yield 1
        raise ValueError("a write failed")

    with pytest.raises(ValueError, match="a write failed"):
        list(watched(failing(), lambda: None, every=0.05))


def test_leaving_early_closes_the_source():
    closed = threading.Event()

    def source():
        try:
            yield from range(1000)
        finally:
            closed.set()

    for item in watched(source(), lambda: None, every=0.05):
        if item == 2:
            break
    assert closed.wait(5)
