"""Drift statistics between a reference distribution and a current window, in plain numpy.

The choices follow Evidently's defaults for numerical features: the two-sample Kolmogorov-Smirnov test when the
current window is small (≤ 1,000 values; drift when p < 0.05), the Wasserstein distance normed by the reference's
standard deviation when it is large (drift when ≥ 0.1); the population stability index (PSI, drift when ≥ 0.1) over
the reference's histogram bins for any feature; Jensen-Shannon distance (base 2, drift when ≥ 0.1) and PSI for the
class distribution. Every threshold is configurable (``MonitorConfig``).
"""

from __future__ import annotations

import math

import numpy as np

EPS = 1e-4  # floor for empty bins: PSI and JS are undefined on zero probabilities


def psi(reference: np.ndarray, current: np.ndarray) -> float:
    """Population stability index of two count (or probability) vectors over the same bins."""
    p = _probabilities(reference)
    q = _probabilities(current)
    return float(np.sum((q - p) * np.log(q / p)))


def jensen_shannon(reference: np.ndarray, current: np.ndarray) -> float:
    """Jensen-Shannon distance (the square root of the divergence, base 2: 0 same, 1 disjoint)."""
    p = _probabilities(reference)
    q = _probabilities(current)
    m = (p + q) / 2
    divergence = 0.5 * np.sum(p * np.log2(p / m)) + 0.5 * np.sum(q * np.log2(q / m))
    return float(math.sqrt(max(divergence, 0.0)))


def chi_square_p(reference: np.ndarray, current: np.ndarray) -> float:
    """p-value of Pearson's chi-square test that ``current`` counts follow ``reference``'s proportions.

    Small windows over many classes have PSI and Jensen-Shannon values well above 0.1 from sampling noise alone
    (43 classes, 400 predictions: PSI ~0.1, JS ~0.14), so a class shift must also be significant. The survival
    function uses the Wilson-Hilferty normal approximation (good to ~1e-3 for the p-values that matter here).
    """
    expected = _probabilities(reference) * float(np.sum(current))
    observed = np.asarray(current, dtype=np.float64)
    statistic = float(np.sum((observed - expected) ** 2 / expected))
    dof = len(observed) - 1
    if dof < 1:
        return 1.0
    z = ((statistic / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def histogram(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts of ``values`` in the bins of ``edges``, values outside the range counted in the outer bins (a shift
    beyond the reference's range must show up, not fall off the ends)."""
    inner = np.clip(values, edges[0], edges[-1])
    return np.histogram(inner, bins=edges)[0]


def ks_test(reference: np.ndarray, current: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic and its asymptotic p-value."""
    a = np.sort(np.asarray(reference, dtype=np.float64))
    b = np.sort(np.asarray(current, dtype=np.float64))
    both = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, both, side="right") / len(a)
    cdf_b = np.searchsorted(b, both, side="right") / len(b)
    d = float(np.max(np.abs(cdf_a - cdf_b)))
    n = len(a) * len(b) / (len(a) + len(b))
    return d, _kolmogorov_sf((math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * d)


def wasserstein_normed(reference: np.ndarray, current: np.ndarray) -> float:
    """Wasserstein-1 distance between the two samples divided by the reference's standard deviation."""
    a = np.sort(np.asarray(reference, dtype=np.float64))
    b = np.sort(np.asarray(current, dtype=np.float64))
    quantiles = np.linspace(0, 1, 513)[1:-1]  # the distance as the integral of |F_a^-1 - F_b^-1|
    distance = float(np.mean(np.abs(np.quantile(a, quantiles) - np.quantile(b, quantiles))))
    scale = float(np.std(a))
    return distance / scale if scale > 0 else (0.0 if distance == 0 else math.inf)


def _probabilities(counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    p = counts / total if total > 0 else np.full_like(counts, 1 / len(counts))
    p = np.maximum(p, EPS)
    return p / p.sum()


def _kolmogorov_sf(x: float) -> float:
    """P(K > x) for the Kolmogorov distribution (the series converges fast for x > 0.2)."""
    if x < 0.2:
        return 1.0
    terms = [(-1) ** (k - 1) * math.exp(-2 * k * k * x * x) for k in range(1, 101)]
    return float(min(1.0, max(0.0, 2 * sum(terms))))
