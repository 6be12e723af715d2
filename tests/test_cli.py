"""``ctfactory --help`` lists the subcommands; each has --help with examples."""

from __future__ import annotations

import re

from factory.cli import build_parser


def subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return list(action.choices)


def test_help_lists_every_subcommand(run_cli):
    proc = run_cli("--help", check=True)
    names = subcommands()
    assert "phantom" in names
    for name in names:
        assert re.search(rf"^\s+{name}\s", proc.stdout, re.MULTILINE), name


def test_every_subcommand_has_help_with_examples(run_cli):
    for name in subcommands():
        proc = run_cli(name, "--help", check=True)
        assert "examples:" in proc.stdout and f"ctfactory {name}" in proc.stdout, name


def test_missing_subcommand_is_a_usage_error(run_cli):
    proc = run_cli()
    assert proc.returncode == 2 and "COMMAND" in proc.stderr


def test_generate_refuses_a_bad_worker_range_naming_the_flag(capsys):
    from factory.cli import main

    for bad, why in (("0-2", "need 1 <= MIN <= MAX"), ("3-1", "need 1 <= MIN <= MAX"),
                     ("two", "expected N or MIN-MAX")):  # fmt: skip
        assert main(["generate", "cohorts/demo.yaml", "--workers", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"ctfactory generate: error: --workers {bad!r}: {why}" + (
            ", e.g. 4 or 2-8" if "expected" in why else ""
        ), err
