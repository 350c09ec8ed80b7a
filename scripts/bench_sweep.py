#!/usr/bin/env python
"""The sweep benchmark of issue 14: the same sweep with the basic launcher and with ``hydra/launcher=stacked``.

Each scenario's two commands (``regbench -m ...`` as fresh subprocesses, each into its own temporary sweep folder)
take turns repetition by repetition (the order alternates), so machine noise hits both alike. Reported per
scenario: the range over repetitions of each command's wall clock and peak RSS (``os.wait4`` of the child), and of
the per-repetition ratio basic/stacked (> 1: stacked is faster). Then the limit: the matmul FLOPs of one stacked
training step (forward + backward = 3x the forward's, counted from the model's Linear/Conv2d shapes) times the
steps of an epoch, over the members' measured training time per epoch (metrics.csv ``epoch_time_s``), as a
fraction of this machine's large float32 matmul FLOP/s (2048x2048, same threads); and with ``--profile`` where
one stacked epoch's time goes (torch.profiler, grouped).

    python scripts/bench_sweep.py                 # every scenario, 3 repetitions, the experiments' own epochs
    python scripts/bench_sweep.py --quick         # smoke: 1 epoch, 1 repetition, small data
    python scripts/bench_sweep.py --scenarios seeds8 grid16 --repeats 5
    python scripts/bench_sweep.py --scenarios seeds8 --profile   # where one stacked epoch's time goes, only
    python scripts/bench_sweep.py --launchers basic basic         # an A/A run: the machine's noise

The members' ``epoch_time_s`` runs from the start of the stack's epoch to that member's own record (after the
evaluations of the members recorded before it), so the achieved FLOP/s below is a conservative figure.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LECTURE = ["experiment=mnist_mlp_dropout", "data=mnist5k"]  # batch 32 (the lecture's), Keras convention
SCENARIOS = {
    "seeds8": (LECTURE + ["seed=0,1,2,3,4,5,6,7"], "8 seeds, lecture MLP + dropout, batch 32"),
    "grid16": (LECTURE + ["regularizer=[dropout,l2]", "regularizer.l2.lam=0,0.0001,0.001,0.01",
                          "regularizer.dropout.rate=0.2,0.5", "seed=0,1"],
               "4 L2 x 2 dropout x 2 seeds, lecture MLP, batch 32"),
    "default4": (["seed=0,1,2,3"], "default experiment (MLP 784-256-128-10, batch 128), 4 seeds"),
    "cnn4": (["experiment=mnist_cnn", "data=mnist5k", "data.train_size=1000", "seed=0,1,2,3"],
             "lecture CNN on 1,000 digits, 4 seeds"),
}


def run(overrides: list[str], launcher: str, sweep_dir: Path, extra: list[str]) -> dict:
    """One ``regbench -m`` command: wall clock, peak RSS (MiB), and the members' mean epoch_time_s."""
    replaced = {e.partition("=")[0] for e in extra}  # --quick / --epochs replace a scenario's own value
    overrides = [o for o in overrides if o.partition("=")[0] not in replaced]
    cmd = [sys.executable, "-m", "regbench", "-m", f"hydra/launcher={launcher}", *overrides, *extra,
           "trainer.progress_bar=false", f"hydra.sweep.dir={sweep_dir}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=sweep_dir.parent, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{err[-3000:]}")
    epochs = [float(r["epoch_time_s"]) for f in sweep_dir.rglob("metrics.csv") for r in csv.DictReader(open(f))]
    return {"wall": wall, "rss": usage.ru_maxrss / 1024, "epoch": statistics.mean(epochs) if epochs else 0.0,
            "runs": len(list(sweep_dir.rglob("metrics.csv")))}


def mlp_step_flops(widths: list[int], batch: int) -> int:
    """Matmul FLOPs of one training step of an MLP with these layer widths (input first): forward 2·B·in·out per
    layer, backward twice that (input and weight gradients)."""
    return 3 * sum(2 * batch * a * b for a, b in zip(widths, widths[1:]))


def scenario_config(overrides: list[str]):
    """The first job's composed config of a scenario (its batch size, training-set size)."""
    sys.path.insert(0, str(ROOT / "src"))
    sys.path.insert(0, str(ROOT))
    from tests.conftest import compose_cfg

    return compose_cfg(*[_first(o) for o in overrides])


def _first(override: str) -> str:
    """A sweep override's first value (``seed=0,1`` -> ``seed=0``; a list ``[a,b]`` is one value)."""
    key, _, value = override.partition("=")
    return override if value.startswith("[") else f"{key}={value.split(',')[0]}"


def model_step_flops(overrides: list[str], batch: int, with_size: bool = False):
    """The matmul/conv FLOPs of one training step of the scenario's model (torch.utils.flop_counter on one
    forward + backward of a member, built by regbench from the scenario's config)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(ROOT / "src"))
    sys.path.insert(0, str(ROOT))
    from regbench.experiment import build_experiment
    from tests.conftest import compose_cfg

    cfg = compose_cfg(*[_first(o) for o in overrides])
    exp = build_experiment(cfg, torch.device("cpu"))
    x = exp.data.train_x[:batch]
    with FlopCounterMode(display=False) as counter:
        exp.model(x).sum().backward()
    flops = counter.get_total_flops()
    return (flops, len(exp.data.train_y)) if with_size else flops  # the training-set size as loaded


def alternate(launchers: list[str], repeats: int, measure) -> tuple[list, list]:
    """Both sides' measurements, taking turns (the order flips every repetition), kept by side — so an A/A run
    (``--launchers basic basic``) gives two separate lists."""
    res: tuple[list, list] = ([], [])
    for rep in range(repeats):
        for side in ((0, 1) if rep % 2 == 0 else (1, 0)):
            res[side].append(measure(launchers[side]))
    return res


def profile_epoch(overrides: list[str], extra: list[str]) -> str:
    """torch.profiler over the second epoch of one stack of the scenario's jobs (in this process), grouped."""
    from torch.profiler import profile

    sys.path.insert(0, str(ROOT / "src"))
    sys.path.insert(0, str(ROOT))
    import regbench.stacked.engine as engine
    from tests.conftest import compose_cfg

    replaced = {e.partition("=")[0] for e in extra}
    jobs = _jobs([o for o in overrides if o.partition("=")[0] not in replaced] + extra)
    seen, out = [0], {}
    original = engine.Stack.train_epoch

    def train_epoch(self):
        seen[0] += 1
        if seen[0] != 2:
            return original(self)
        with profile() as prof:
            result = original(self)
        out["table"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
        return result

    engine.Stack.train_epoch = train_epoch
    try:
        with tempfile.TemporaryDirectory() as tmp:
            engine.fit_stack([compose_cfg(*j, "trainer.max_epochs=2", "trainer.progress_bar=false") for j in jobs],
                             [Path(tmp) / str(k) for k in range(len(jobs))])
    finally:
        engine.Stack.train_epoch = original
    return out.get("table", "(no second epoch)")


def _jobs(overrides: list[str]) -> list[list[str]]:
    """Every combination of a scenario's swept values (``a=1,2 b=x,y`` -> 4 override lists)."""
    import itertools

    options = []
    for o in overrides:
        key, _, value = o.partition("=")
        values = [value] if value.startswith("[") else value.split(",")
        options.append([f"{key}={v}" for v in values])
    return [list(c) for c in itertools.product(*options)]


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times)


def _cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def rng(values: list[float], fmt: str = "{:.2f}") -> str:
    return fmt.format(min(values)) if len(values) == 1 else f"{fmt.format(min(values))}–{fmt.format(max(values))}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=None, help="trainer.max_epochs (default: the experiment's)")
    ap.add_argument("--quick", action="store_true", help="1 epoch, 1 repetition, 512 training images")
    ap.add_argument("--launchers", nargs=2, default=["basic", "stacked"], help="the two launchers compared")
    ap.add_argument("--profile", action="store_true", help="only profile one stacked epoch of each scenario")
    args = ap.parse_args(argv)
    extra = [f"trainer.max_epochs={args.epochs}"] if args.epochs else []
    if args.quick:
        args.repeats, extra = 1, ["trainer.max_epochs=1", "data.train_size=512"]
    import torch

    if args.profile:
        for name in args.scenarios:
            print(f"{name}: one stacked epoch (torch.profiler, self CPU time)\n"
                  f"{profile_epoch(SCENARIOS[name][0], ['data.train_size=512'] if args.quick else [])}")
        return
    print(f"machine: {_cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {time.strftime('%Y-%m-%d %H:%M')}")
    peak = matmul_peak()
    print(f"large float32 matmul: {peak / 1e9:.1f} GFLOP/s\n")
    rows = []
    for name in args.scenarios:
        overrides, what = SCENARIOS[name]
        def measure(launcher: str) -> dict:
            with tempfile.TemporaryDirectory() as tmp:
                return run(overrides, launcher, Path(tmp) / "sweep", extra)

        basic, stacked = alternate(args.launchers, args.repeats, measure)
        ratios = [b["wall"] / s["wall"] for b, s in zip(basic, stacked)]
        rows.append((name, what, basic, stacked, ratios))
        print(f"{name}: basic {rng([r['wall'] for r in basic])} s, stacked {rng([r['wall'] for r in stacked])} s, "
              f"ratio {rng(ratios)}", flush=True)
    print("\n| scenario | jobs | basic: wall s | stacked: wall s | basic / stacked | peak RSS MiB basic / stacked "
          "| epoch s (member mean) basic / stacked |")
    print("|---|---|---|---|---|---|---|")
    for name, what, basic, stacked, ratios in rows:
        print(f"| {what} | {basic[0]['runs']} | {rng([r['wall'] for r in basic])} | {rng([r['wall'] for r in stacked])} "
              f"| {rng(ratios)}× | {rng([r['rss'] for r in basic], '{:.0f}')} / {rng([r['rss'] for r in stacked], '{:.0f}')} "
              f"| {rng([r['epoch'] for r in basic], '{:.3f}')} / {rng([r['epoch'] for r in stacked], '{:.3f}')} |")
    for name, what, basic, stacked, ratios in rows:
        overrides = [o for o in SCENARIOS[name][0] if not (args.quick and o.startswith("data.train_size="))]
        overrides += ["data.train_size=512"] if args.quick else []
        cfg = scenario_config(overrides)
        cfg_batch = cfg.data.batch_size
        flops, n_train = model_step_flops(overrides, cfg_batch, with_size=True)
        steps = -(-n_train // cfg_batch)
        members = stacked[0]["runs"]
        achieved = [flops * steps * members / r["epoch"] for r in stacked if r["epoch"]]
        print(f"{name}: one member's step {flops / 1e6:.1f} MFLOP; stacked epoch of {members} members "
              f"{rng([r['epoch'] for r in stacked], '{:.3f}')} s -> {rng([a / 1e9 for a in achieved], '{:.1f}')} "
              f"GFLOP/s = {rng([a / peak * 100 for a in achieved], '{:.0f}')} % of the large-matmul peak")


if __name__ == "__main__":
    main()
