"""Is a difference between two table cells larger than the seed noise?

A cell of an ablation table is a mean over seeds of a number that one training run gives
(the overall % error of a leave-one-model-out cross-validation). The folds are the same for
every row, so the seed is the only source of randomness in a cell; the unit of replication
is the seed. Two cells are compared with a two-sided Welch t-test on their per-seed values
(unequal variances, Welch-Satterthwaite degrees of freedom), taken as logarithms: errors are
positive and their spread over seeds is multiplicative (free weights give 9,000-460,000 %
over five seeds), and on the raw scale one such seed inflates the variance until 145,000 %
cannot be told from 7 %. A configuration whose result does not depend on the seed is one
value with no noise: the test against it is the one-sample t-test of the other row; two such
values differ exactly when they are unequal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ALPHA = 0.05  # two-sided significance level of every comparison
EXACT_RTOL = 1e-9  # two noise-free values closer than this (relative) are the same value


@dataclass(frozen=True)
class SeedSample:
    """The per-seed values of one table cell.

    Attributes:
        values: one value per seed, in seed order.
        deterministic: the configuration does not depend on the seed (fit once; no noise).
    """

    values: tuple[float, ...]
    deterministic: bool = False

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def sd(self) -> float:
        """Sample standard deviation over seeds (ddof 1): 0 when deterministic, NaN for a
        single seeded value (no estimate of the noise)."""
        if self.noise_free:
            return 0.0
        return float(np.std(self.values, ddof=1)) if self.n > 1 else math.nan

    @property
    def noise_free(self) -> bool:
        """No spread: deterministic, or every seed gave the same value (to ``EXACT_RTOL``)."""
        if self.deterministic:
            return True
        return self.n > 1 and float(np.ptp(self.values)) <= EXACT_RTOL * abs(self.mean)


def _moments(sample: SeedSample, log: bool) -> tuple[float, float]:
    """Mean and variance of the mean (σ²/n) of the per-seed values (or their logarithms)."""
    values = np.log(sample.values) if log else np.asarray(sample.values, dtype=float)
    variance = 0.0 if sample.noise_free else float(np.var(values, ddof=1))
    return float(np.mean(values)), variance / sample.n


def welch_p(a: SeedSample, b: SeedSample, *, log: bool = True) -> float:
    """Two-sided p-value that ``a`` and ``b`` have the same mean over seeds (Welch's t-test
    on the logarithms of the values when ``log`` and every value is positive).

    Returns 0.0 when both are noise-free and differ, 1.0 when both are noise-free and equal,
    and NaN when a seeded sample has a single value (its noise is unknown)."""
    from scipy.stats import t as student_t

    if any(not s.deterministic and s.n < 2 for s in (a, b)):
        return math.nan
    if a.noise_free and b.noise_free:
        same = math.isclose(a.mean, b.mean, rel_tol=EXACT_RTOL, abs_tol=0.0)
        return 1.0 if same else 0.0
    log = log and min(a.values + b.values) > 0
    (mean_a, va), (mean_b, vb) = _moments(a, log), _moments(b, log)
    t = (mean_a - mean_b) / math.sqrt(va + vb)
    # Welch-Satterthwaite; a noise-free side contributes no variance and no degrees of freedom
    df = (va + vb) ** 2 / sum(v**2 / (s.n - 1) for v, s in ((va, a), (vb, b)) if v > 0)
    return float(2.0 * student_t.sf(abs(t), df))


@dataclass(frozen=True)
class ColumnVerdict:
    """Which rows of one column stand out (positions in the order given).

    Attributes:
        best: position of the lowest mean.
        bold: rows shown as the best: the lowest mean (with the rows holding the very same
            noise-free value) when every other row is distinguishable from it; else empty.
        tied: rows other than the best that are within seed noise of it (p ≥ alpha).
        p: per row, the p-value against the best (NaN for the best itself).
    """

    best: int
    bold: tuple[int, ...]
    tied: tuple[int, ...]
    p: tuple[float, ...]


def compare_to_best(samples: Sequence[SeedSample | None], alpha: float = ALPHA) -> ColumnVerdict | None:
    """Test every row of a column against the row with the lowest mean (lower is better);
    ``None`` entries are missing cells. ``None`` when no row has a value."""
    present = [i for i, s in enumerate(samples) if s is not None]
    if not present:
        return None
    best = min(present, key=lambda i: samples[i].mean)  # first on equal means
    p = [math.nan] * len(samples)
    same, tied = [best], []
    for i in present:
        if i == best:
            continue
        p[i] = welch_p(samples[i], samples[best])
        if samples[i].noise_free and samples[best].noise_free and p[i] == 1.0:
            same.append(i)  # the very same noise-free value: tied for best, as without seeds
        elif not p[i] < alpha:  # NaN (unknown noise) counts as indistinguishable
            tied.append(i)
    return ColumnVerdict(best=best, bold=tuple(sorted(same)) if not tied else (),
                         tied=tuple(tied), p=tuple(p))


def prediction_z(reference: float, sample: SeedSample) -> float:
    """How many standard deviations (over seeds) ``reference`` lies from the mean:
    (reference − mean) / sd; NaN without a spread."""
    sd = sample.sd
    return (reference - sample.mean) / sd if sd and not math.isnan(sd) else math.nan


def prediction_bound(n: int, level: float = 1 - ALPHA) -> float:
    """Half-width, in standard deviations, of the ``level`` prediction interval of one more
    seed's value from ``n`` seeds: t(1 − (1 − level)/2, n − 1) · √(1 + 1/n). A single run of
    the same procedure (e.g. the reference's) falls outside with probability 1 − level."""
    from scipy.stats import t as student_t

    if n < 2:
        return math.nan
    return float(student_t.ppf(1 - (1 - level) / 2, n - 1) * math.sqrt(1 + 1 / n))
