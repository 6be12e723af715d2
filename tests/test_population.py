"""The co-occurrence model reproduces the reference label statistics."""

from __future__ import annotations

import numpy as np
import pytest

from factory import vocab
from factory.population import sample_population

N = 40_000


@pytest.fixture(scope="module")
def population():
    return sample_population(N, seed=11)


def test_marginals_match_reference_prevalence(population):
    observed = population.labels.mean(axis=0)
    for f, p in zip(vocab.FINDINGS, observed, strict=True):
        sd = np.sqrt(f.prevalence * (1 - f.prevalence) / N)
        assert abs(p - f.prevalence) < 5 * sd, f.column


def test_no_finding_rate_and_associations(population):
    labels = population.labels.astype(float)
    assert abs((labels.sum(axis=1) == 0).mean() - vocab.NO_FINDING_RATE) < 0.01
    corr = np.corrcoef(labels.T)
    index = {fid: i for i, fid in enumerate(vocab.FINDING_IDS)}
    for (a, b), phi in vocab.REFERENCE_PHI.items():
        assert abs(corr[index[a], index[b]] - phi) < 0.03, (a, b)
    independent = np.prod(1 - np.array([f.prevalence for f in vocab.FINDINGS]))
    assert (labels.sum(axis=1) == 0).mean() > 5 * independent  # not sampled independently


def test_demographics_and_age_effect(population):
    assert population.age.min() >= 18 and population.age.max() <= 102
    assert abs((population.sex == "M").mean() - vocab.MALE_FRACTION) < 0.015
    calc = population.labels[:, vocab.FINDING_IDS.index("arterial_wall_calcification")]
    assert calc[population.age >= 70].mean() > 2 * calc[population.age < 45].mean()


def test_rows_depend_only_on_seed_and_index():
    small, large = sample_population(10, seed=3), sample_population(500, seed=3)
    assert (small.labels == large.labels[:10]).all() and (small.age == large.age[:10]).all()
    assert (small.sex == large.sex[:10]).all()
    assert not (sample_population(10, seed=4).labels == small.labels).all()
