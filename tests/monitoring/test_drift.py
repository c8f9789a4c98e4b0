"""Drift statistics: zero for equal distributions, large for different ones, and the textbook values."""

from __future__ import annotations

import numpy as np
import pytest

from signpost.monitoring.drift import histogram, jensen_shannon, ks_test, psi, wasserstein_normed


def test_equal_distributions_have_no_drift_and_disjoint_ones_the_most() -> None:
    counts = np.array([10, 20, 30, 40])
    assert psi(counts, counts * 3) == pytest.approx(0.0, abs=1e-12)
    assert jensen_shannon(counts, counts) == pytest.approx(0.0, abs=1e-6)
    assert jensen_shannon([1, 0], [0, 1]) == pytest.approx(1.0, abs=1e-3)
    assert psi([50, 50], [90, 10]) == pytest.approx(0.4 * np.log(0.9 / 0.5) - 0.4 * np.log(0.1 / 0.5))


def test_ks_and_wasserstein_see_a_shift_and_not_noise() -> None:
    rng = np.random.default_rng(0)
    reference = rng.normal(0, 1, 5000)
    same = rng.normal(0, 1, 800)
    shifted = rng.normal(0.5, 1, 800)
    assert ks_test(reference, same)[1] > 0.05 and ks_test(reference, shifted)[1] < 1e-6
    # scipy (installed with MLflow) as the reference implementation: the same statistic, a close p-value.
    from scipy import stats

    expected = stats.ks_2samp(reference, shifted, method="asymp")
    statistic, p_value = ks_test(reference, shifted)
    assert statistic == pytest.approx(expected.statistic, abs=1e-12)
    assert p_value == pytest.approx(expected.pvalue, rel=0.1, abs=1e-12)
    assert wasserstein_normed(reference, shifted) == pytest.approx(
        stats.wasserstein_distance(reference, shifted) / reference.std(), rel=0.02)
    assert wasserstein_normed(reference, rng.normal(0, 1, 50000)) < 0.03
    assert wasserstein_normed(reference, rng.normal(0.5, 1, 50000)) == pytest.approx(0.5, abs=0.05)


def test_values_beyond_the_reference_range_land_in_the_outer_bins() -> None:
    edges = np.array([0.0, 1.0, 2.0])
    assert histogram(np.array([-5.0, 0.5, 1.5, 9.0]), edges).tolist() == [2, 2]
