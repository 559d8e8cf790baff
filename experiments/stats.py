"""The statistics of every comparison the experiments print, in one place, so that `results`,
`ablate` and anything else that sets numbers side by side agree on what "beyond noise" means.

- Two sets of per-seed numbers are compared by a **paired t-test** when they pair up (the same
  seeds, and, as the caller judges from the runs' configs, the same split and scoring orders: seed
  s of one row then saw the same initialisation and data order as seed s of the other), by
  **Welch's t-test** otherwise.
- A paired test is the one-sample test of the per-seed differences (scipy's ttest_rel is that
  test), so a difference of differences uses the same code. When the differences are all equal
  the t statistic is 0/0: a constant non-zero difference is as certain as a difference gets
  (p = 0), a constant zero one is no difference (p = 1).
- Several rows against one reference are several tests: p-values are **Holm-corrected**.
- A difference is "beyond noise" when its corrected p is below P_NOISE.
"""

from __future__ import annotations

import math

import numpy as np

P_NOISE = 0.05
# differences closer than this are equal: per-seed metrics are ratios of counts, and their
# floating-point differences wobble in the last bits even when the counts differ by the same number
_EQUAL = 1e-12


def pairs(samples: list[dict[int, float]], same_conditions: bool = True) -> bool:
    """Whether per-seed numbers {seed: value} pair up: the same seeds, at least two, under the same conditions."""
    first = samples[0]
    return same_conditions and len(first) >= 2 and all(set(s) == set(first) for s in samples[1:])


def one_sample(diffs) -> float:
    """p of the two-sided one-sample t-test of mean zero (the paired test, given the differences)."""
    from scipy.stats import ttest_1samp

    diffs = np.asarray(diffs, dtype=float)
    if len(diffs) < 2:
        return float("nan")
    if np.ptp(diffs) <= _EQUAL:  # constant differences: the statistic is 0/0, the answer is not
        return 1.0 if abs(diffs.mean()) <= _EQUAL else 0.0
    return float(ttest_1samp(diffs, 0.0).pvalue)


def t_test(x: dict[int, float], y: dict[int, float], paired: bool) -> tuple[float, float, str]:
    """(mean of x minus mean of y, p, "paired" or "welch"); `paired` is the caller's verdict of `pairs`."""
    if paired:
        diffs = np.array([x[s] - y[s] for s in sorted(x)])
        return float(diffs.mean()), one_sample(diffs), "paired"
    from scipy.stats import ttest_ind

    a, b = list(x.values()), list(y.values())
    delta = float(np.mean(a) - np.mean(b))
    if len(a) < 2 or len(b) < 2:
        return delta, float("nan"), "welch"
    return delta, float(ttest_ind(a, b, equal_var=False).pvalue), "welch"


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down correction (NaN stays NaN and does not count as a test)."""
    idx = [i for i, p in enumerate(pvalues) if not math.isnan(p)]
    order = sorted(idx, key=lambda i: pvalues[i])
    m, out, running = len(idx), list(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def beyond_noise(p_holm: float) -> str:
    """The table's verdict: '' when untested, else yes / no."""
    return "" if math.isnan(p_holm) else ("yes" if p_holm < P_NOISE else "no")
