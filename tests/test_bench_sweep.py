"""scripts/bench_sweep.py's arithmetic (the measurements themselves run by hand: docs/benchmarks.md)."""

from __future__ import annotations

import importlib.util

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("bench_sweep", REPO / "scripts" / "bench_sweep.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_mlp_step_flops_by_hand():
    # the lecture MLP 784-128-128-64-10 at batch 32: forward 2·B·Σ in·out, backward twice that
    forward = 2 * 32 * (784 * 128 + 128 * 128 + 128 * 64 + 64 * 10)
    assert bench.mlp_step_flops([784, 128, 128, 64, 10], 32) == 3 * forward == 24_109_056


def test_model_step_flops_counts_what_autograd_runs():
    """torch's FlopCounterMode on a regbench MLP: forward plus the weight gradients, and the input gradients of
    every layer but the first (the images need none)."""
    flops = bench.model_step_flops(["model.hidden=[128,64]"], 32)
    fwd = [2 * 32 * a * b for a, b in ((784, 128), (128, 64), (64, 10))]
    assert flops == sum(fwd) + sum(fwd) + sum(fwd[1:])


def test_ranges_are_printed_as_min_to_max():
    assert bench.rng([2.0]) == "2.00" and bench.rng([3.0, 1.0, 2.0]) == "1.00–3.00"


def test_an_a_a_run_keeps_both_sides_apart_and_alternates():
    calls = iter(range(1, 7))
    a, b = bench.alternate(["basic", "basic"], 3, lambda launcher: next(calls))
    assert (a, b) == ([1, 4, 5], [2, 3, 6])


def test_a_scenarios_jobs_are_every_combination():
    jobs = bench._jobs(["regularizer=[dropout,l2]", "seed=0,1", "regularizer.l2.lam=0,0.1"])
    assert len(jobs) == 4 and ["regularizer=[dropout,l2]", "seed=1", "regularizer.l2.lam=0.1"] in jobs
