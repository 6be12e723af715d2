"""Evaluation: the finding classifier, metrics, physical measurements, label verification and
the cohort QC report. It reads cohorts and datasets; in ``factory`` only the pipeline's
verification step (``verify``) and the phantom's ground-truth measurements (``measure``, plain
numpy) import it."""
