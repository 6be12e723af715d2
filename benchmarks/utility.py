"""The utility experiment (docs/benchmarks.md, "Evaluation"): does a synthetic cohort help a
finding classifier?

    .venv/bin/python benchmarks/utility.py [--data build/demo-data] [--n 192] [--steps 300]
        [--model builtin:demo] [--out build/utility]

1. ``ctfactory generate`` a cohort (cohorts/utility.yaml: the four large findings enriched as
   in the demo model's training data), exported as NIfTI into the dataset as split
   ``synthetic`` (``ctfactory export --nifti``);
2. the finding classifier (train/configs/demo-classifier.yaml) trained three times with the
   same budget (steps, batch, seed): on the real phantom splits only, on the synthetic split
   only, and on both;
3. each evaluated on the same held-out real phantoms: macro AUC and the AUC of the four large
   findings, printed as a table and written to ``{out}/utility.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CTFACTORY = [sys.executable, "-m", "factory.cli"]
REAL_SPLITS = ["train", "effusion", "cardiomegaly", "emphysema", "consolidation"]
LARGE = ["Pleural effusion", "Cardiomegaly", "Emphysema", "Consolidation"]


def run(*args: str) -> None:
    print("$ ctfactory " + " ".join(args), flush=True)
    subprocess.run([*CTFACTORY, *args], check=True, cwd=ROOT)


def synthetic_split(data: Path, out: Path, n: int, model: str) -> float:
    """Generate the cohort and export it into ``data`` as split ``synthetic``; seconds taken."""
    spec = yaml.safe_load((ROOT / "cohorts" / "utility.yaml").read_text())
    spec["cohort"]["n"], spec["model"], spec["output"] = n, model, str(out / "cohort")
    path = out / "utility.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    start = time.perf_counter()
    run("generate", str(path), "--workers", "1", "--batch-size", "8")
    run("export", str(out / "cohort"), "--nifti", str(data), "--split", "synthetic")
    return time.perf_counter() - start


def train(data: Path, out: Path, name: str, splits: list[str], steps: int) -> dict:
    """Train the classifier on ``splits``; its last held-out evaluation."""
    run(
        "train", "classifier", "--config", "train/configs/demo-classifier.yaml",
        "--storage", str(out / "runs"), "--name", name, "--steps", str(steps),
        "--set", f"data.root={data}", "--set", f"data.split={json.dumps(splits)}",
        "--set", f"checkpoint_every={steps}",
    )  # fmt: skip
    history = [json.loads(line) for line in (out / "runs" / name / "metrics.jsonl").open()]
    return next(r for r in reversed(history) if "eval/macro_auc" in r)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="build/demo-data", help="the phantom dataset")
    parser.add_argument("--n", type=int, default=192, help="synthetic volumes")
    parser.add_argument("--steps", type=int, default=300, help="classifier steps per setting")
    parser.add_argument("--model", default="builtin:demo")
    parser.add_argument("--out", default="build/utility")
    args = parser.parse_args(argv)
    data, out = (ROOT / args.data).resolve(), (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    seconds = synthetic_split(data, out, args.n, args.model)
    settings = {
        "real": REAL_SPLITS,
        "synthetic": ["synthetic"],
        "real + synthetic": [*REAL_SPLITS, "synthetic"],
    }
    results = {}
    for label, splits in settings.items():
        final = train(data, out, f"utility-{label.replace(' + ', '-')}", splits, args.steps)
        results[label] = {
            "macro_auc": final["eval/macro_auc"],
            **{c: final.get(f"eval/auc/{c}") for c in LARGE},
        }
    print(f"\nsynthetic split: {args.n} volumes of {args.model} in {seconds:.0f} s")
    print(f"{'trained on':<18}{'macro AUC':>10}" + "".join(f"{c[:12]:>14}" for c in LARGE))
    for label, r in results.items():
        cells = "".join(f"{r[c]:>14.3f}" if r[c] is not None else f"{'-':>14}" for c in LARGE)
        print(f"{label:<18}{r['macro_auc']:>10.3f}{cells}")
    report = {"n_synthetic": args.n, "model": args.model, "steps": args.steps, "auc": results}
    (out / "utility.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
