"""Evaluation: the finding classifier, metrics, physical measurements, label verification and
the cohort QC report. It reads cohorts and datasets; nothing in ``factory`` imports it back
except the pipeline's optional verification step."""
