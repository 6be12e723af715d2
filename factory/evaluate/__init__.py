"""Evaluation: the finding classifier, metrics, physical measurements, label verification, the
run summary a generation writes (``run_summary``) and the cohort QC report (``qc``). It reads
cohorts and datasets; in ``factory`` the pipeline's verification step (``verify``), the
``generate`` command (``run_summary``) and the phantom's ground-truth measurements (``measure``,
plain numpy) import it."""
