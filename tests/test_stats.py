"""regbench.stats: the intervals cover the true mean as often as they say (synthetic normal data, known mean), Holm's
correction against a hand-computed example, a planted effect is "different" and a null "within noise", one seed
gives no interval, and the power figure matches the textbook's."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as st

from regbench.stats import (bootstrap_interval, compare, holm, interval_text, seeds_for_power, t_interval,
                            with_holm)

DRAWS = 400


def _coverage(interval, n: int) -> float:
    """The fraction of DRAWS samples of n normal values (mean 3, SD 2) whose interval holds the true mean 3."""
    rng = np.random.default_rng(29)
    hits = 0
    for i in range(DRAWS):
        lo, hi = interval(rng.normal(3.0, 2.0, n), i)[:2]
        hits += lo <= 3.0 <= hi
    return hits / DRAWS


def _bounds(low_p: float, high_p: float = 0.95) -> tuple[float, float]:
    """Binomial acceptance bounds (99.8 %) for DRAWS draws: at least what low_p would give, at most high_p's."""
    return st.binom.ppf(0.001, DRAWS, low_p) / DRAWS, st.binom.isf(0.001, DRAWS, high_p) / DRAWS


def test_the_t_interval_covers_the_true_mean_95_percent_of_the_time():
    lo, hi = _bounds(0.95)
    assert lo <= _coverage(lambda x, i: t_interval(x), 8) <= hi  # exact for normal data, even with 8 values


def test_the_bootstrap_interval_covers_the_true_mean_about_95_percent_of_the_time():
    # BCa is first-order correct: with 30 values it undercovers by a point or two (0.93-0.94 over many draws)
    lo, hi = _bounds(0.93)
    coverage = _coverage(lambda x, i: bootstrap_interval(x, seed=i, n_resamples=2000), 30)
    assert lo <= coverage <= hi


def test_the_bootstrap_is_seeded_names_its_method_and_handles_degenerate_data():
    x = [0.71, 0.69, 0.74, 0.70, 0.72]
    assert bootstrap_interval(x, seed=3) == bootstrap_interval(x, seed=3)
    assert bootstrap_interval(x).method == "BCa"
    assert bootstrap_interval([0.5, 0.5, 0.5]) == (0.5, 0.5, "all values equal")
    two = bootstrap_interval([1.0, 2.0])  # too few distinct values for BCa's jackknife: still an interval
    assert two is not None and 1.0 <= two.lo <= two.hi <= 2.0


def test_one_value_gives_no_interval_and_no_test():
    assert t_interval([0.7]) is None and bootstrap_interval([0.7]) is None
    assert t_interval([0.7, None]) is None  # None is a missing value, not a value
    assert t_interval([0.7, math.nan, 0.8]) is None  # a NaN among them: no interval pretending otherwise
    c = compare({0: 0.7}, {0: 0.6}, higher_is_better=False)
    assert c.decision == "no test" and c.t_ci is None and c.boot_ci is None and c.p is None
    assert c.verdict == "no test: the baseline has fewer than 2 seeds: no interval can be given"


def test_holm_against_a_hand_computed_example():
    # sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 -> 0.06 (never below a smaller p's)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == [1.0, 1.0]  # 0.5·2 = 1.0, capped at 1; 0.6 raised to it
    assert holm([0.02, None, math.nan]) == [0.02, None, None]  # not tests: not counted in m
    assert holm([]) == []


def _seeds(rng, n: int, shift: float) -> tuple[dict, dict]:
    """A baseline and another configuration over n seeds, paired: a shared per-seed part (init, data order), the
    configuration's own noise, and ``shift`` planted in the other."""
    shared = rng.normal(1.0, 0.1, n)
    return ({s: float(shared[s] + rng.normal(0, 0.02)) for s in range(n)},
            {s: float(shared[s] + shift + rng.normal(0, 0.02)) for s in range(n)})


def test_a_planted_effect_is_different_and_a_null_is_within_noise():
    rng = np.random.default_rng(0)
    rows = [compare(*_seeds(rng, 5, -0.1), higher_is_better=False), compare(*_seeds(rng, 5, 0.0), False)]
    planted, null = with_holm(rows)
    assert planted.paired and planted.decision == "different"
    assert planted.verdict == f"lower than the baseline (p_holm = {planted.p_holm:.3f})"
    assert planted.p_holm == pytest.approx(min(1.0, 2 * planted.p)) and planted.t_ci[1] < 0
    assert null.decision == "within noise" and null.t_ci[0] < 0 < null.t_ci[1]
    assert null.verdict.startswith(f"within noise (95 % CI of Δ: {interval_text(*null.t_ci)}); 80 % power would "
                                   f"need ≈ {null.seeds_needed} seeds")
    assert null.seeds_needed == seeds_for_power(null.effect, paired=True) > 5


def test_paired_numbers_are_scipys():
    base, other = _seeds(np.random.default_rng(1), 6, 0.05)
    c = compare(base, other, higher_is_better=True)
    b, o = np.array(list(base.values())), np.array(list(other.values()))
    d = o - b
    assert c.p == pytest.approx(st.ttest_rel(o, b).pvalue)
    assert c.delta == pytest.approx(d.mean()) and c.effect == pytest.approx(d.mean() / d.std(ddof=1))
    assert c.effect_name == "d_z" and c.n == 6 and c.why_unpaired is None
    assert c.t_ci == pytest.approx(st.t.interval(0.95, 5, loc=d.mean(), scale=st.sem(d)))
    assert c.boot_ci.method == "BCa" and c.boot_ci.lo < c.delta < c.boot_ci.hi


def test_unpaired_configurations_use_welch_and_say_so():
    base, other = _seeds(np.random.default_rng(2), 5, 0.3)
    c = compare(base, other, higher_is_better=False, pairable=False, why_unpaired="different architectures")
    b, o = list(base.values()), list(other.values())
    assert not c.paired and c.why_unpaired == "different architectures" and c.effect_name == "Hedges' g"
    assert c.p == pytest.approx(st.ttest_ind(o, b, equal_var=False).pvalue)
    assert c.verdict.startswith("higher than the baseline")
    # seeds that do not overlap make no pairs: Welch, and why
    moved = compare(base, {s + 10: v for s, v in other.items()}, higher_is_better=False)
    assert not moved.paired and moved.why_unpaired == "0 seeds in common (a pair needs both runs)"


def test_missing_seeds_are_left_out_of_the_pairs_and_named():
    base, other = _seeds(np.random.default_rng(3), 5, 0.0)
    del other[4]
    c = compare(base, other, higher_is_better=False)
    assert c.paired and c.n == 4 and "1 run(s) without a partner seed left out" in c.note


def test_runs_equal_up_to_float_rounding_are_within_noise_without_a_test():
    base = {0: 1.8799932861328126, 1: 1.7185456848144531, 2: 1.7361842346191407}
    other = {0: 1.8799932861328126, 1: 1.7185455322265626, 2: 1.7361842346191407}  # trainer.num_threads=2
    c = compare(base, other, higher_is_better=False)
    assert c.decision == "within noise" and c.p == 1.0
    assert c.verdict == "within noise: equal on every seed up to float32 rounding"


def test_a_non_finite_value_is_no_test():
    c = compare({0: 1.0, 1: 1.1}, {0: math.nan, 1: 1.0}, higher_is_better=False)
    assert c.decision == "no test" and "NaN or infinite" in c.verdict


def test_seeds_for_power_matches_the_textbook():
    # G*Power / Cohen (1988): d = 0.5, α = 0.05 two-sided, 80 % power: 34 pairs; 64 per group for two samples
    assert seeds_for_power(0.5, paired=True) == 34
    assert seeds_for_power(-0.5, paired=True) == 34
    assert seeds_for_power(0.5, paired=False) == 64
    assert seeds_for_power(0.0, paired=True) is None
    assert seeds_for_power(1e-4, paired=True) == 10_001  # "more than 10,000"
