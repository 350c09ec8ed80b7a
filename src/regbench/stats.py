"""The statistics of a sweep's seeds (issue 29): the confidence interval of a mean (t and bootstrap), the
comparison of two configurations over their seeds (paired by seed where it can be, Welch otherwise), Holm's
correction across the rows of a table, and the seeds a within-noise effect would need for 80 % power.

Every distribution is scipy.stats' (t, non-central t, the t-tests, the bootstrap); only Holm's step-down, a
procedure, is written here. Foundation level: imports numpy and scipy, nothing of regbench.
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass, replace
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import numpy as np
from scipy import stats as st

LEVEL = 0.95  # every interval's confidence level
ALPHA = 0.05  # a row is "different" when its Holm-adjusted p is below this
POWER = 0.80  # the power the seeds-needed figure is for
MAX_SEEDS = 10_000  # the seeds-needed search stops here ("more than 10,000")
N_RESAMPLES = 9999  # bootstrap resamples
# Two runs whose values agree to ROUNDING · max(1, |value|) on every seed are equal up to float32 rounding (e.g.
# trainer.num_threads changes the order of a sum, nothing else): no test is run on rounding noise.
ROUNDING = 1e-6
_RNG = "rng" if "rng" in inspect.signature(st.bootstrap).parameters else "random_state"  # scipy >= 1.15 : older
PAIRED_EFFECT = "d_z"  # mean of the per-seed differences / their SD
WELCH_EFFECT = "Hedges' g"  # difference of the means / pooled SD, small-sample corrected


def sample(values: Sequence[Optional[float]]) -> Optional[np.ndarray]:
    """The values as an array, None (a missing value) left out; None if any value is NaN or infinite (the mean of
    a sample with a diverged run is not finite, and an interval that pretends otherwise would be wrong)."""
    x = np.array([float(v) for v in values if v is not None], dtype=float)
    return x if np.all(np.isfinite(x)) else None


def mean_sd(values: Sequence[float]) -> tuple[float, Optional[float]]:
    """Mean and sample SD (None for one value: one seed has no spread, which is not a spread of 0); a NaN or inf
    among the values gives a NaN / inf mean and a NaN SD, as they are (never dropped)."""
    x = sample(values)
    if x is None:
        return sum(float(v) for v in values) / len(values), (math.nan if len(values) > 1 else None)
    return float(x.mean()), (float(x.std(ddof=1)) if len(x) > 1 else None)


def t_interval(values: Sequence[Optional[float]], level: float = LEVEL) -> Optional[tuple[float, float]]:
    """The two-sided t confidence interval of the mean (mean ± t(n−1) · s/√n); None with fewer than 2 values or
    a non-finite one (see :func:`sample`). Equal values give the interval of width 0 at their value."""
    x = sample(values)
    if x is None or len(x) < 2:
        return None
    mean, se = float(np.mean(x)), float(np.std(x, ddof=1)) / math.sqrt(len(x))
    if se == 0:
        return mean, mean
    lo, hi = st.t.interval(level, len(x) - 1, loc=mean, scale=se)
    return float(lo), float(hi)


class BootstrapCI(NamedTuple):
    lo: float
    hi: float
    method: str  # "BCa", "percentile (BCa undefined here)" or "all values equal" (no resampling needed)


def bootstrap_interval(values: Sequence[Optional[float]], level: float = LEVEL, seed: int = 0,
                       n_resamples: int = N_RESAMPLES) -> Optional[BootstrapCI]:
    """The bootstrap confidence interval of the mean (scipy.stats.bootstrap, BCa; the percentile method where BCa
    is undefined, e.g. too few distinct values), seeded by ``seed``: the same values give the same interval. None
    with fewer than 2 values or a non-finite one. With few values (< ~20) bootstrap intervals are too narrow
    (they ignore that s is estimated); the t interval is the one the verdicts use."""
    x = sample(values)
    if x is None or len(x) < 2:
        return None
    return _bootstrap((x,), _mean_stat, level, seed, n_resamples)


def _mean_stat(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis)


def _diff_stat(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(y, axis=axis) - np.mean(x, axis=axis)


def _bootstrap(data: tuple, statistic, level: float, seed: int, n_resamples: int) -> Optional[BootstrapCI]:
    if all(np.all(d == d[0]) for d in data):  # every resample gives the same statistic
        value = float(statistic(*data))
        return BootstrapCI(value, value, "all values equal")
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # BCa's NaN on degenerate resamples (checked below)
            warnings.simplefilter("ignore", getattr(st, "DegenerateDataWarning", RuntimeWarning))
            lo, hi = st.bootstrap(data, statistic, confidence_level=level, method=method, n_resamples=n_resamples,
                                  vectorized=True, **{_RNG: np.random.default_rng(seed)}).confidence_interval
        if math.isfinite(lo) and math.isfinite(hi):
            return BootstrapCI(float(lo), float(hi), "BCa" if method == "BCa" else "percentile (BCa undefined here)")
    return None


def holm(pvalues: Sequence[Optional[float]]) -> list[Optional[float]]:
    """Holm's step-down adjustment of a family of p-values (the rows of one table): the i-th smallest of m times
    (m − i + 1), made monotone (never below a smaller p's), capped at 1. None / NaN entries are not tests: they
    stay None and do not count in m."""
    idx = [i for i, p in enumerate(pvalues) if p is not None and not math.isnan(p)]
    out: list[Optional[float]] = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (len(idx) - rank) * float(pvalues[i])))
        out[i] = running
    return out


def seeds_for_power(effect: Optional[float], paired: bool, alpha: float = ALPHA, power: float = POWER
                    ) -> Optional[int]:
    """The smallest number of seeds at which a two-sided t-test at ``alpha`` detects a standardised ``effect``
    with probability ``power`` (scipy.stats.nct: the t statistic's distribution under the effect). Paired: n
    pairs, df n − 1, noncentrality d_z·√n; Welch: n seeds per configuration, df 2n − 2, noncentrality d·√(n/2).
    Assumes the effect is the true one. None: no effect (0, or not finite); MAX_SEEDS + 1: more than MAX_SEEDS."""
    if effect is None or not math.isfinite(effect) or effect == 0:
        return None

    def reached(n: int) -> bool:
        df, nc = (n - 1, abs(effect) * math.sqrt(n)) if paired else (2 * n - 2, abs(effect) * math.sqrt(n / 2))
        crit = st.t.ppf(1 - alpha / 2, df)
        return st.nct.sf(crit, df, nc) + st.nct.cdf(-crit, df, nc) >= power

    lo, hi = 2, 2
    while not reached(hi):  # power grows with n: double, then bisect
        if hi > MAX_SEEDS:
            return MAX_SEEDS + 1
        lo, hi = hi, hi * 2
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if reached(mid) else (mid + 1, hi)
    return hi


@dataclass(frozen=True)
class Comparison:
    """One configuration against the baseline on one metric, over seeds. Δ = other − baseline."""

    n: int  # pairs (paired); seeds of the other configuration (Welch)
    n_baseline: int  # the baseline's seeds used (paired: = n)
    delta: Optional[float]  # the mean Δ (paired: of the per-seed differences; Welch: difference of the means)
    t_ci: Optional[tuple[float, float]]  # t interval of Δ (paired t / Welch–Satterthwaite)
    boot_ci: Optional[BootstrapCI]  # bootstrap interval of Δ, its method named
    p: Optional[float]  # the paired t-test's (scipy.stats.ttest_rel) or Welch's (ttest_ind(equal_var=False)) p
    effect: Optional[float]  # d_z (paired) or Hedges' g (Welch): effect_name says which
    effect_name: str
    paired: bool
    why_unpaired: Optional[str]  # why Welch (None when paired)
    higher_is_better: bool
    seeds_needed: Optional[int]  # seeds for 80 % power at α = 0.05 if the observed Δ and SD are the true ones
    note: str = ""  # what the test could not use or did not need (seeds without a partner, float rounding)
    no_test: Optional[str] = None  # why no test could be run (one seed, a NaN), or None
    p_holm: Optional[float] = None  # filled by with_holm across the rows of one table
    level: float = LEVEL
    against: str = "the baseline"  # what the verdict compares with

    @property
    def decision(self) -> str:
        """"different", "within noise" or "no test"."""
        if self.no_test:
            return "no test"
        p = self.p_holm if self.p_holm is not None else self.p
        return "different" if p is not None and p < ALPHA else "within noise"

    @property
    def verdict(self) -> str:
        """One plain sentence: "lower than the baseline (p_holm = 0.004)", "within noise (95 % CI of Δ: −0.012 …
        +0.020); 80 % power needs ≈ 23 seeds", or why there is no test."""
        if self.no_test:
            return f"no test: {self.no_test}"
        p_name, p = ("p_holm", self.p_holm) if self.p_holm is not None else ("p", self.p)
        if self.decision == "different":
            side = "higher" if self.delta > 0 else "lower"
            return f"{side} than {self.against} ({p_name} {format_p(p)})"
        ci = (f"{self.level * 100:g} % CI of Δ: {interval_text(*self.t_ci)}" if self.t_ci else "no interval")
        head = "within noise"
        if self.p is not None and self.p < ALPHA and self.p_holm is not None:
            head = f"within noise after Holm's correction (p {format_p(self.p)}, p_holm {format_p(self.p_holm)}; "
            return head + ci + ")" + self._power_text()
        if self.note.startswith("equal"):
            return f"within noise: {self.note}"
        return f"{head} ({ci})" + self._power_text()

    def _power_text(self) -> str:
        if self.seeds_needed is None:
            return "; the observed Δ is 0: no number of seeds would resolve it" if self.delta == 0 else ""
        per = "" if self.paired else " per configuration"
        if self.seeds_needed > MAX_SEEDS:
            return f"; 80 % power would need more than {MAX_SEEDS:,} seeds{per}"
        return f"; 80 % power would need ≈ {self.seeds_needed} seeds{per}"

    def with_holm(self, p_holm: Optional[float]) -> "Comparison":
        return replace(self, p_holm=p_holm)


def with_holm(rows: Sequence[Comparison]) -> list[Comparison]:
    """The rows of one table with their Holm-adjusted p-values (the family: these rows)."""
    return [c.with_holm(p) for c, p in zip(rows, holm([c.p for c in rows]))]


def format_p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"= {p:.3f}"


def signed(x: float, decimals: Optional[int] = None) -> str:
    """A number with its sign and a true minus sign (−): ``decimals`` places, or 3 significant digits."""
    text = f"{x:+.{decimals}f}" if decimals is not None else f"{x:+#.3g}"
    return text.replace("-", "−")


def interval_text(lo: float, hi: float) -> str:
    """"−0.0120 … +0.0200": both ends to the same decimals, 3 significant digits of the larger end."""
    big = max(abs(lo), abs(hi))
    if big == 0 or not math.isfinite(big) or big < 1e-4:
        return f"{signed(lo)} … {signed(hi)}"
    decimals = max(0, 2 - math.floor(math.log10(big)))
    return f"{signed(lo, decimals)} … {signed(hi, decimals)}"


def compare(baseline: Mapping[Any, Optional[float]], other: Mapping[Any, Optional[float]], higher_is_better: bool,
            pairable: bool = True, why_unpaired: Optional[str] = None, seed: int = 0,
            against: str = "the baseline") -> Comparison:
    """``other`` against ``baseline`` ({seed: value}; None: no value). Paired over the seeds both have when
    ``pairable`` (the same seed gave both runs the same initial weights: the caller knows) and at least 2 seeds
    are shared; otherwise Welch's test, ``why_unpaired`` saying why. ``seed`` seeds the bootstrap."""
    common = sorted(set(k for k, v in baseline.items() if v is not None)
                    & set(k for k, v in other.items() if v is not None), key=str)
    b_all, o_all = sample(list(baseline.values())), sample(list(other.values()))
    if b_all is None or o_all is None:
        return Comparison(**_fields(0, 0, None, None, None, None, None, "", False, None),
                          higher_is_better=higher_is_better, seeds_needed=None, against=against,
                          no_test="a NaN or infinite value among the seeds (a diverged run?)")
    if pairable and len(common) >= 2:
        c = _paired(np.array([float(baseline[s]) for s in common]), np.array([float(other[s]) for s in common]),
                    seed)
        left = len(b_all) + len(o_all) - 2 * len(common)
        if left:
            c["note"] = "; ".join(x for x in (c.get("note"), f"{left} run(s) without a partner seed left out") if x)
    else:
        if pairable:
            why_unpaired = f"{len(common)} seed{'s' if len(common) != 1 else ''} in common (a pair needs both runs)"
        c = _welch(b_all, o_all, why_unpaired or "not paired", seed)
    return Comparison(**c, higher_is_better=higher_is_better, against=against)


def _fields(n, n_baseline, delta, t_ci, boot, p, effect, effect_name, paired, why_unpaired) -> dict:
    return dict(n=n, n_baseline=n_baseline, delta=None if delta is None else float(delta), t_ci=t_ci, boot_ci=boot,
                p=p, effect=effect, effect_name=effect_name, paired=paired, why_unpaired=why_unpaired)


def _paired(b: np.ndarray, o: np.ndarray, seed: int) -> dict:
    """The paired comparison's fields: the per-seed differences d = o − b, their t and bootstrap intervals, the
    paired t-test (scipy.stats.ttest_rel) and d_z = mean(d) / SD(d)."""
    d = o - b
    t_ci, boot = t_interval(d), _bootstrap((d,), _mean_stat, LEVEL, seed, N_RESAMPLES)
    if np.all(np.abs(d) <= ROUNDING * np.maximum(1.0, np.maximum(np.abs(b), np.abs(o)))):
        return {**_fields(len(d), len(d), d.mean(), t_ci, boot, 1.0, None, PAIRED_EFFECT, True, None),
                "seeds_needed": None, "note": "equal on every seed up to float32 rounding"}
    sd, note = float(np.std(d, ddof=1)), ""
    if sd == 0:  # the same nonzero difference on every seed: the t statistic is infinite
        p, effect, note = 0.0, math.copysign(math.inf, float(d.mean())), "the same Δ on every seed"
    else:
        with warnings.catch_warnings():  # scipy's "precision loss" on nearly equal differences: p is still right
            warnings.simplefilter("ignore", RuntimeWarning)
            p = float(st.ttest_rel(o, b).pvalue)
        effect = float(d.mean()) / sd
    return {**_fields(len(d), len(d), d.mean(), t_ci, boot, p, effect, PAIRED_EFFECT, True, None),
            "seeds_needed": seeds_for_power(effect, True), "note": note}


def _welch(b: np.ndarray, o: np.ndarray, why: str, seed: int) -> dict:
    """Welch's comparison's fields: difference of the means, its Welch–Satterthwaite t interval (the interval that
    matches ttest_ind(equal_var=False)'s p), a bootstrap interval resampling each configuration on its own, and
    Hedges' g (pooled SD, small-sample corrected)."""
    if len(b) < 2 or len(o) < 2:
        one = "the baseline has" if len(b) < 2 else "this configuration has"
        delta = float(o.mean() - b.mean()) if len(b) and len(o) else None
        return {**_fields(len(o), len(b), delta, None, None, None, None, WELCH_EFFECT, False, why),
                "seeds_needed": None, "no_test": f"{one} fewer than 2 seeds: no interval can be given"}
    vb, vo = float(np.var(b, ddof=1)), float(np.var(o, ddof=1))
    delta, se2 = float(o.mean() - b.mean()), vb / len(b) + vo / len(o)
    boot = _bootstrap((b, o), _diff_stat, LEVEL, seed, N_RESAMPLES)
    if se2 == 0:  # every seed gave the same value in each configuration
        return {**_fields(len(o), len(b), delta, (delta, delta), boot, 1.0 if delta == 0 else 0.0, None,
                          WELCH_EFFECT, False, why), "seeds_needed": None,
                "note": "every seed gave the same value in each configuration"}
    df = se2 ** 2 / ((vb / len(b)) ** 2 / (len(b) - 1) + (vo / len(o)) ** 2 / (len(o) - 1))
    lo, hi = st.t.interval(LEVEL, df, loc=delta, scale=math.sqrt(se2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(st.ttest_ind(o, b, equal_var=False).pvalue)
    pooled = math.sqrt(((len(b) - 1) * vb + (len(o) - 1) * vo) / (len(b) + len(o) - 2))
    d = delta / pooled if pooled > 0 else math.copysign(math.inf, delta)
    g = d * (1 - 3 / (4 * (len(b) + len(o)) - 9))  # Hedges' correction J
    return {**_fields(len(o), len(b), delta, (float(lo), float(hi)), boot, p, g, WELCH_EFFECT, False, why),
            "seeds_needed": seeds_for_power(d, False)}
