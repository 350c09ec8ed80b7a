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
