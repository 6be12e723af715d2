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


def test_an_actor_that_cannot_reach_the_model_names_its_node_and_the_path(tmp_path):
    """A model path that only the driver's machine has, another model or another ct-factory
    version fails at actor start, naming the node."""
    import dataclasses
    import socket

    from factory.pipeline import ActorStartError, VolumeWriter, prepare_run
    from tests.store_helpers import small_model, write_spec

    model = small_model(tmp_path / "model")
    run = prepare_run(str(write_spec(tmp_path / "spec.yaml", model, output=str(tmp_path / "c"))))
    elsewhere = dataclasses.replace(run.settings, model=str(tmp_path / "only-on-the-driver"))
    with pytest.raises(ActorStartError) as caught:
        VolumeWriter(run.url, {}, elsewhere)
    message = str(caught.value)
    host = f"(host {socket.gethostname()})"  # after the node id when Ray runs here
    assert "cannot be loaded on " in message and host in message
    assert str(tmp_path / "only-on-the-driver") in message

    class Other:
        model_hash = "0" * 64

    with pytest.raises(ActorStartError) as caught:
        VolumeWriter(run.url, {}, run.settings, loader=lambda ref, options: Other())
    assert "hash 0000000000000000 on " in str(caught.value) and host in str(caught.value)

    # A node with another ct-factory than the driver's is refused before it loads anything.
    older = dataclasses.replace(run.settings, ct_factory_version="0.0.1")
    with pytest.raises(ActorStartError) as caught:
        VolumeWriter(run.url, {}, older, loader=lambda ref, options: pytest.fail("loaded"))
    assert "but 0.0.1 on the driver" in str(caught.value) and host in str(caught.value)
