#!/usr/bin/env python
"""Torch's CPU threads on an idle and on a loaded machine (issue 30, item 2): the lecture MLP's epoch time with 1 and
with every-core threads, under OpenMP's default (active) wait policy and under ``OMP_WAIT_POLICY=PASSIVE``.

Each contender is a fresh ``regbench`` process (the wait policy is read once, when torch's OpenMP runtime starts)
training the lecture MLP (mnist5k, batch 32, ``trainer.fast_step`` as configured) for a few epochs; its epoch time is
the median of ``metrics.csv``'s ``epoch_time_s`` after the first epoch. "Loaded" runs ``--load`` busy Python
processes beside it (a browser, another job, a CI neighbour). Contenders take turns, round after round, so machine
noise hits them alike; the table gives the median over rounds and each one's ratio to the best on that load.

    python scripts/bench_threads.py                    # 3 rounds, idle and with 2x cores busy processes
    python scripts/bench_threads.py --rounds 5 --load 6
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _burn() -> None:  # a busy neighbour
    while True:
        pass


def epoch_time(threads: int, policy: str, epochs: int, extra: list[str]) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    env["PYTHONPATH"] = str(REPO / "src")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "regbench", "experiment=mnist_mlp", "data=mnist5k",
                        f"trainer.max_epochs={epochs}", f"trainer.num_threads={threads}", "trainer.progress_bar=false",
                        "trainer.save_checkpoints=false", f"hydra.run.dir={tmp}/run", *extra],
                       check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(Path(tmp) / "run" / "metrics.csv") as f:
            times = [float(r["epoch_time_s"]) for r in csv.DictReader(f)]
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--load", type=int, default=2 * (os.cpu_count() or 1), help="busy processes when loaded")
    ap.add_argument("extra", nargs="*", help="more overrides for every run, e.g. trainer.fast_step=false")
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    contenders = [(t, p) for t in sorted({1, cores}) for p in ("default", "PASSIVE")]
    print(f"{platform.processor() or platform.machine()}, {cores} cores; lecture MLP, mnist5k, batch 32; "
          f"{args.rounds} rounds; loaded = {args.load} busy processes")
    for load in (0, args.load):
        burners = [mp.Process(target=_burn, daemon=True) for _ in range(load)]
        for b in burners:
            b.start()
        try:
            times: dict = {c: [] for c in contenders}
            for _ in range(args.rounds):
                for c in contenders:
                    times[c].append(epoch_time(*c, args.epochs, args.extra))
        finally:
            for b in burners:
                b.terminate()
        best = min(statistics.median(v) for v in times.values())
        print(f"\n{'idle' if load == 0 else f'loaded ({load} busy processes)'}")
        print("| threads | OMP_WAIT_POLICY | epoch s (median, min-max) | vs best |")
        print("|---|---|---|---|")
        for (t, p), v in times.items():
            m = statistics.median(v)
            print(f"| {t} | {p} | {m:.3f} ({min(v):.3f}-{max(v):.3f}) | {m / best:.2f}x |")


if __name__ == "__main__":
    main()
