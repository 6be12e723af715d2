"""Population contract: label sets and demographics with realistic co-occurrence.

The phantom draws its subjects from it and cohort specs use it as ``reference: phantom``.

A calibrated Gaussian copula: each person has a latent normal score per finding plus one for
age. Thresholds give the reference prevalences exactly; the latent correlations are solved so
the named pairs reach their phi coefficients, a shared factor reproduces the reference
no-finding rate, and the age loadings make calcifications (and a few others) more likely with
age.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import optimize, stats

from factory import vocab

_N = len(vocab.FINDING_IDS)


@dataclass(frozen=True)
class Population:
    """``n`` people: labels (n, 18) uint8 in vocabulary order, age (n,) int, sex (n,) 'M'/'F'."""

    labels: np.ndarray
    age: np.ndarray
    sex: np.ndarray


def _phi_to_rho(p1: float, p2: float, phi: float) -> float:
    """Latent correlation whose thresholded pair has the given phi coefficient."""
    t1, t2 = stats.norm.ppf(1 - p1), stats.norm.ppf(1 - p2)
    p11 = p1 * p2 + phi * np.sqrt(p1 * (1 - p1) * p2 * (1 - p2))

    def gap(rho: float) -> float:
        cov = [[1.0, rho], [rho, 1.0]]
        return stats.multivariate_normal(mean=[0, 0], cov=cov).cdf([-t1, -t2]) - p11

    return float(optimize.brentq(gap, -0.95, 0.98, xtol=1e-4))


def _nearest_correlation(c: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(c)
    c = v @ np.diag(np.maximum(w, 1e-4)) @ v.T
    d = np.sqrt(np.diag(c))
    return c / np.outer(d, d)


@lru_cache(maxsize=1)
def copula() -> tuple[np.ndarray, np.ndarray]:
    """(thresholds (18,), Cholesky factor (19, 19)) of the calibrated latent model; cached."""
    prev = np.array([f.prevalence for f in vocab.FINDINGS])
    thresholds = stats.norm.ppf(1 - prev)
    index = {fid: i for i, fid in enumerate(vocab.FINDING_IDS)}
    pairs = {
        (index[a], index[b]): _phi_to_rho(prev[index[a]], prev[index[b]], phi)
        for (a, b), phi in vocab.REFERENCE_PHI.items()
    }
    age = np.zeros(_N)
    for fid, loading in vocab.AGE_LOADING.items():
        age[index[fid]] = loading
    probe = np.random.default_rng(12345).standard_normal((60_000, _N + 1))

    def build(lam: float) -> np.ndarray:
        c = np.full((_N + 1, _N + 1), lam * lam)
        c[:_N, _N] = c[_N, :_N] = age
        for (i, j), rho in pairs.items():
            c[i, j] = c[j, i] = rho
        np.fill_diagonal(c, 1.0)
        return _nearest_correlation(c)

    def none_rate(lam: float) -> float:
        z = probe @ np.linalg.cholesky(build(lam)).T
        return float(np.mean(np.all(z[:, :_N] <= thresholds, axis=1)))

    lam = optimize.brentq(lambda x: none_rate(x) - vocab.NO_FINDING_RATE, 0.0, 0.9, xtol=1e-3)
    return thresholds, np.linalg.cholesky(build(lam))


def sample_population(n: int, seed: int) -> Population:
    """Draw ``n`` people; the same (n, seed) always gives the same arrays."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xC0FFEE]))
    return population_from_normals(rng.standard_normal((n, _N + 2)))


def population_from_normals(normals: np.ndarray) -> Population:
    """Map iid normals (n, 20) to labels, ages and sexes; row i depends on row i only."""
    thresholds, chol = copula()
    z = normals[:, : _N + 1] @ chol.T
    labels = (z[:, :_N] > thresholds).astype(np.uint8)
    age = np.rint(vocab.AGE_MEAN + vocab.AGE_SD * z[:, _N])
    age = np.clip(age, *vocab.AGE_RANGE).astype(np.int16)
    sex = np.where(stats.norm.cdf(normals[:, _N + 1]) < vocab.MALE_FRACTION, "M", "F")
    return Population(labels=labels, age=age, sex=sex)
