"""``ctfactory eval``: measure a generated cohort against a real reference dataset."""

from __future__ import annotations

import argparse
import json
import math

from factory.console import HelpFormatter, collected, keep_log, libraries_to_log, log_line, run_log
from factory.errors import UsageError
from factory.store.cli import add_storage_args, storage_options

EVAL_EXAMPLES = """\
examples:
  ctfactory eval demo-out/cohort --reference build/demo-data --split valid
  ctfactory eval s3://bucket/cohorts/effusion --reference /data/ct-rate --split valid \\
      --classifier s3://bucket/models/classifier --limit 2000 --endpoint-url http://host:9000

The classifier (default builtin:demo-classifier) scores both sets: its macro AUC on the
cohort's labels, divided by the same on the real reference, is the headline (factual
correctness). FID (3D and 2.5D) and MMD use the classifier's own features: no weights are
downloaded. Physical measurements (effusion mL, %LAA-950, cardiothoracic ratio) need anatomy
masks in the reference. The results go to {cohort}/report/eval.json unless --out is given.
"""

REPORT_EXAMPLES = """\
examples:
  ctfactory eval demo-out/cohort --reference build/demo-data && ctfactory report demo-out/cohort
  ctfactory report s3://bucket/cohorts/effusion --out qc/ --endpoint-url http://host:9000

report.html inlines every picture, so it can be mailed or attached to a paper as one file.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="measure a cohort against a real reference: factual correctness, FID, MMD, "
        "physical measurements",
        description="Measure a generated cohort against a real CT-RATE-layout reference: the "
        "finding classifier's AUC on both, FID and MMD of its features, physical measurements.",
        epilog=EVAL_EXAMPLES,
        formatter_class=HelpFormatter,
    )
    p.add_argument("url", metavar="COHORT_URL", help="the cohort: a path, file:// or s3:// URL")
    p.add_argument("--reference", required=True, help="real dataset root (CT-RATE layout)")
    p.add_argument("--split", default="valid", help="the reference split to read")
    p.add_argument(
        "--classifier", default="builtin:demo-classifier", help="finding classifier checkpoint"
    )
    p.add_argument(
        "--clip",
        default="model",
        help="3D CLIP checkpoint for CLIP score, retrieval and zero-shot metrics: 'model' (the "
        "cohort's model, when it has one) or 'none'",
    )
    p.add_argument("--limit", type=int, default=1000, help="at most this many volumes per set")
    p.add_argument("--threshold", type=float, default=0.5, help="probability called positive")
    p.add_argument("--out", help="where to write eval.json (default: the cohort's report/)")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show the libraries' messages here, not in the cohort's logs/",
    )
    add_storage_args(p)
    p.set_defaults(func=run_eval)

    r = sub.add_parser(
        "report",
        help="write a cohort's QC report: one self-contained HTML file and its figures as PNG",
        description="The QC report of a cohort: requested vs planned vs stored vs verified "
        "prevalence, co-occurrence, demographics, the metrics of `ctfactory eval` beside the "
        "real reference, a montage per finding and the model's prompt pairs.",
        epilog=REPORT_EXAMPLES,
        formatter_class=HelpFormatter,
    )
    r.add_argument("url", metavar="COHORT_URL", help="the cohort: a path, file:// or s3:// URL")
    r.add_argument("--out", help="a local folder for report.html and the PNGs (default: the "
                   "cohort's report/)")  # fmt: skip
    add_storage_args(r)
    r.set_defaults(func=run_report)


def run_eval(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from factory.evaluate.evaluation import (
        ClipModel,
        cohort_items,
        compare,
        reference_items,
        score,
    )
    from factory.evaluate.measure import zones_from
    from factory.models.checkpoint import load_checkpoint
    from factory.models.classifier import load_classifier
    from factory.models.text import PromptTruncated, prompts_cut
    from factory.refs import ref_options
    from factory.store.fs import write_url
    from factory.store.reader import open_cohort

    if args.limit < 2:
        raise UsageError(f"--limit: {args.limit} is not valid; expected at least 2 volumes")
    if not 0 < args.threshold < 1:
        raise UsageError(f"--threshold: {args.threshold} is not valid; expected 0 < t < 1")
    options = storage_options(args)
    checkpoint = load_checkpoint(args.classifier)
    if "classifier" not in checkpoint.weights:
        raise UsageError(
            f"--classifier {args.classifier}: this checkpoint has no classifier network "
            f"(it has {', '.join(sorted(checkpoint.weights))})"
        )
    classifier = load_classifier(args.classifier)
    cohort = open_cohort(args.url, options)
    config = checkpoint.config
    n_gen, gen_items = cohort_items(cohort, classifier, config, args.limit)
    n_real, has_masks, real_items = reference_items(
        args.reference, args.split, classifier, config, args.limit
    )
    clip_ref = cohort.settings().model if args.clip == "model" else args.clip
    clip = None
    log = None if args.verbose else run_log(args.url, "eval")
    with libraries_to_log(log) as console, collected(PromptTruncated) as cut:
        if clip_ref and clip_ref != "none":
            clip_options = ref_options(clip_ref, options)
            clip_checkpoint = load_checkpoint(clip_ref, storage_options=clip_options)
            if "clip" in clip_checkpoint.weights:
                clip = ClipModel.load(clip_checkpoint)
            elif args.clip != "model":
                raise UsageError(f"--clip {clip_ref}: this checkpoint has no clip network")

        spacing = tuple(config.spacing_mm)
        zones = zones_from(i.anatomy for i in real_items()) if has_masks else None
        total = n_gen + n_real
        with tqdm(total=total, unit="vol", desc="eval", mininterval=1.0, file=console) as bar:
            generated = score(gen_items(), classifier, zones, spacing, bar.update, clip)
            real = score(real_items(), classifier, zones, spacing, bar.update, clip)
    result = compare(generated, real, classifier, args.threshold, clip)
    result.update(
        cohort=args.url,
        reference={"root": args.reference, "split": args.split, "anatomy_masks": has_masks},
        classifier={"ref": args.classifier, "hash": checkpoint.hash, "name": checkpoint.card.name},
        clip_model=clip_ref if clip is not None else None,
        feature_extractor=(
            f"the finding classifier's vision tower ({args.classifier}, "
            f"{classifier.encoder.out_channels} channels): pooled for 3D, per slab for 2.5D"
        ),
    )
    out = args.out or f"{args.url.rstrip('/')}/report/eval.json"
    write_url(out, json.dumps(finite(result), indent=2, allow_nan=False).encode(), options)
    print(summary(result))
    if cut:
        print(
            "warning: CLIP scoring: "
            + prompts_cut(
                sum(w.cut for w in cut),
                sum(w.of for w in cut),
                cut[0].max_tokens,
                max(w.most for w in cut),
            )
        )
    print(f"eval: {out}")
    if log is not None:

        def put(name: str, data: bytes) -> None:
            write_url(f"{args.url.rstrip('/')}/{name}", data, options)

        print(log_line(keep_log(log, args.url, put)))
    return 0


def finite(value):
    """``value`` with NaN and infinities as None and tuples as lists: strict JSON."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _f(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}g}"


def summary(result: dict) -> str:
    """The headline numbers as a few lines of text."""
    fc = result["factual_correctness"]
    d = result["distances"]
    lines = [
        f"volumes: {result['volumes']['generated']} generated, {result['volumes']['real']} real",
        f"factual correctness (macro AUC): generated {_f(fc['generated']['macro_auc'])}, "
        f"real {_f(fc['real']['macro_auc'])}, ratio {_f(fc['auc_ratio'])}",
        f"FID 3D {_f(d.get('fid_volume'))}, 2.5D {_f(d.get('fid_2_5d'))}; "
        f"MMD 3D {_f(d.get('mmd_volume'))}",
    ]
    clip = result.get("clip")
    if clip:
        r = clip["real_retrieval"]
        lines.append(
            f"CLIP score: generated {_f(clip['score']['generated'])}, real "
            f"{_f(clip['score']['real'])}; real report-to-volume R@1 "
            f"{_f(r.get('text_to_image_r1'))}, R@5 {_f(r.get('text_to_image_r5'))}; "
            f"zero-shot macro AUC {_f(clip['real_zero_shot']['macro_auc'])}"
        )
    gen_m = result["measurements"]["generated"]
    real_m = result["measurements"]["real"]
    for column, g in gen_m.items():
        r = real_m.get(column, {})
        lines.append(
            f"{column} ({g['measure']}): with - without = {_f(g['difference'])} generated "
            f"(p {_f(g['p_value'], 2)}, n {g['n_with']}/{g['n_without']}), "
            f"{_f(r.get('difference'))} real"
        )
    return "\n".join(lines)


def run_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from factory.evaluate.qc import build_report, model_images
    from factory.store.cohort import REPORT, CohortStore
    from factory.store.reader import open_cohort

    options = storage_options(args)
    store: CohortStore = open_cohort(args.url, options)
    report = build_report(store, model_images(store.settings().model, options))
    files = {"report.html": report["html"].encode(), **report["figures"]}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (out / name).write_bytes(data)
        where = str(out)
    else:
        for name, data in files.items():
            store.put(f"{REPORT}/{name}", data)
        where = f"{store.url}/{REPORT}"
    print(f"report: {where}/report.html ({len(files) - 1} figures beside it)")
    return 0
