"""``ctfactory plan``: validate a cohort spec, plan every volume, show requested vs planned."""

from __future__ import annotations

import argparse

from factory.console import HelpFormatter
from factory.errors import UsageError

EXAMPLES = """examples:
  ctfactory plan cohorts/demo.yaml
  ctfactory plan cohorts/effusion-enriched.yaml --out plan.parquet --plot plan.png
  ctfactory plan cohorts/match-reference.yaml --out /tmp/match.parquet

A bad spec exits with status 2 and one line: file:line:column: key.path: what is wrong and
what is valid. The model, classifier and output are checked as far as plan can without
loading a model (a remote model is named as not checked). See docs/cohort-spec.md."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``plan`` command."""
    parser = subparsers.add_parser(
        "plan",
        help="validate a cohort spec and plan every volume",
        description=(
            "Validate a cohort spec (YAML) and plan its volumes: labels, attributes,\n"
            "demographics, prompt and seed per volume. Prints requested vs planned counts\n"
            "per finding, profiles, constraints, attributes, demographics and warnings, and\n"
            "what was checked of the model, classifier and output."
        ),
        formatter_class=HelpFormatter,
        epilog=EXAMPLES,
    )
    parser.add_argument("spec", metavar="SPEC.yaml", help="the cohort spec")
    parser.add_argument("--out", metavar="PLAN.parquet", help="write the plan as Parquet")
    parser.add_argument(
        "--plot", metavar="PNG", help="write planned prevalence and the co-occurrence matrix"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Plan the spec; bad input raises UsageError (one line, exit status 2)."""
    from factory.cohort.plan import make_plan
    from factory.cohort.spec import load_spec
    from factory.cohort.summary import summary_text
    from factory.preflight import check_references

    spec = load_spec(args.spec)
    checks = check_references(spec).lines
    plan = make_plan(spec)
    print(summary_text(plan))
    print("\nreferences:\n" + "\n".join(f"  {line}" for line in checks))
    if args.out:
        try:
            plan.write(args.out)
        except OSError as exc:
            raise UsageError(f"--out {args.out}: cannot write the plan: {exc}") from None
        print(f"\nwrote {args.out}: {plan.n:,} rows, plan hash {plan.plan_hash[:16]}")
    if args.plot:
        from factory.cohort.plot import plot_plan

        try:
            plot_plan(plan, args.plot)
        except OSError as exc:
            raise UsageError(f"--plot {args.plot}: cannot write the picture: {exc}") from None
        print(f"wrote {args.plot}")
    return 0
