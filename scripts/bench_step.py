#!/usr/bin/env python
"""Seconds per epoch of the lecture MLP: regbench (unfused, autograd, direct step, compiled) vs minimal torch vs Keras 3.

The issue-17 benchmark: regbench's mnist5k split, the lecture's seed-000 MLP 784-128-128-64-10 (ReLU), Adam
(lr 1e-3, eps 1e-7: ``experiment=mnist_mlp data=mnist5k``, Keras convention), batch 32. Every contender
trains for ``--epochs`` epochs per repetition; the table gives the range over repetitions of each
repetition's median epoch time over epochs 2..N (epoch 1 holds compilation and warm-up), and each repetition's
ratio to a base contender of the same repetition (``--base``: the minimal torch loop, else Keras; the table
gives the median ratio and their range). Contenders
take turns, repetition by repetition, so that machine noise hits them alike.

    python scripts/bench_step.py                      # everything (installs Keras 3 + JAX into a venv first)
    python scripts/bench_step.py --quick              # smoke: 3 epochs, 1 repetition, no Keras, no compile
    python scripts/bench_step.py --contenders minimal regbench_autograd regbench
    python scripts/bench_step.py --contenders regbench_autograd regbench keras   # ratios to Keras
    python scripts/bench_step.py --default-experiment # the default experiment (batch 128), regbench contenders

Contenders:
- minimal / minimal_fused: a permutation of the in-memory tensors, ``x[idx]``, forward, cross-entropy,
  backward, ``Adam.step`` (torch's default for-loop implementation / ``fused=True``); training only.
- regbench_unfused (``trainer.fused=false trainer.fast_step=false``: before issue 17), regbench_autograd
  (fused optimizer, autograd step), regbench (the default: fused, direct step), regbench_val_only (the default
  with ``trainer.clean_subset=0``: validation only, like a Keras epoch), regbench_eval10 (the default evaluated
  and checkpointed every 10th epoch and the last: ``trainer.eval_every=10 trainer.checkpoint_every=10``),
  regbench_compile_model,
  regbench_compile_step: ``python -m regbench`` runs; the epoch time is metrics.csv's ``epoch_time_s``
  (training + validation + clean-train evaluation + weight norms); ``training`` and ``overhead`` come from
  summary.json's ``timing`` (overhead = evaluation + the epoch's bookkeeping, relative to training);
  ``outside`` is the rest of the run's wall clock per epoch (set-up, the last epoch's writes, the final test).
  Compiled runs use a fresh compile cache in the first repetition (cold) and the same cache afterwards (warm);
  ``run_s`` is the whole run's wall clock, compilation included.
- keras: Keras 3 on JAX (``jit_compile`` on by default) in a separate virtual environment this script
  creates from PyPI (``python -m venv``; ``pip install keras jax[cpu]``; not a regbench dependency),
  ``model.fit(batch_size=32, validation_data=...)`` on the same normalised split; per-epoch times from a
  callback (training + validation, like regbench's ``epoch_time_s``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONTENDERS = ("minimal", "minimal_fused", "regbench_unfused", "regbench_autograd", "regbench", "regbench_val_only",
              "regbench_eval10", "regbench_compile_model", "regbench_compile_step", "keras")
QUICK = ("minimal", "minimal_fused", "regbench_unfused", "regbench_autograd", "regbench")
DEFAULT_CONTENDERS = ("regbench_unfused", "regbench_autograd", "regbench")
REGBENCH_ARGS = {"regbench_unfused": ["trainer.fused=false", "trainer.fast_step=false"],
                 "regbench_autograd": ["trainer.fast_step=false"], "regbench": [],
                 "regbench_val_only": ["trainer.clean_subset=0"],
                 "regbench_eval10": ["trainer.eval_every=10", "trainer.checkpoint_every=10"],
                 "regbench_compile_model": ["trainer.compile=model"], "regbench_compile_step": ["trainer.compile=step"]}
LECTURE = ["experiment=mnist_mlp", "data=mnist5k", "seed=0"]
DEFAULT = ["data=mnist5k", "seed=0"]  # the default experiment: MLP 784-256-128-10, Adam, batch 128

KERAS_CHILD = r"""
import json, os, sys, time
os.environ["KERAS_BACKEND"] = "jax"
import numpy as np, keras
d = np.load(sys.argv[1]); epochs = int(sys.argv[2])
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input(d["train_x"].shape[1:]), keras.layers.Flatten(),
                          keras.layers.Dense(128, activation="relu"), keras.layers.Dense(128, activation="relu"),
                          keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10)])
model.compile(optimizer=keras.optimizers.Adam(1e-3, epsilon=1e-7),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
class T(keras.callbacks.Callback):
    def on_epoch_begin(self, e, logs=None): self.t = time.perf_counter()
    def on_epoch_end(self, e, logs=None): times.append(time.perf_counter() - self.t)
times = []; start = time.perf_counter()
model.fit(d["train_x"], d["train_y"], batch_size=32, epochs=epochs, shuffle=True, verbose=0,
          validation_data=(d["val_x"], d["val_y"]), callbacks=[T()])
print(json.dumps({"epochs": times, "run_s": time.perf_counter() - start,
                  "versions": {"keras": keras.__version__, "jax": __import__("jax").__version__}}))
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=None,
                   help="which to run (default: all; with --quick: " + ", ".join(QUICK) + ")")
    p.add_argument("--epochs", type=int, default=None, help="epochs per repetition (default 20; --quick: 3)")
    p.add_argument("--repetitions", type=int, default=None, help="repetitions (default 5; --quick: 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores this process may use)")
    p.add_argument("--venv", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                   / "regbench" / "bench-keras-venv", help="where the Keras/JAX virtual environment is created")
    p.add_argument("--quick", action="store_true", help="smoke run: 3 epochs, 1 repetition, no Keras, no compile")
    p.add_argument("--default-experiment", action="store_true",
                   help="the default experiment (batch 128) instead of the lecture MLP; regbench contenders only")
    p.add_argument("--base", choices=CONTENDERS, default=None,
                   help="the contender the ratio column divides by, per repetition (default: minimal, else keras, "
                        "else the first contender; regbench_unfused with --default-experiment)")
    args = p.parse_args(argv)
    if args.default_experiment and args.contenders and not set(args.contenders) <= set(REGBENCH_ARGS):
        p.error("--default-experiment compares regbench contenders only")
    args.experiment = DEFAULT if args.default_experiment else LECTURE
    args.contenders = args.contenders or list(DEFAULT_CONTENDERS if args.default_experiment
                                              else QUICK if args.quick else CONTENDERS)
    if args.base is None:
        args.base = "regbench_unfused" if args.default_experiment else \
            next((b for b in ("minimal", "keras") if b in args.contenders), args.contenders[0])
    if args.base not in args.contenders:
        p.error(f"--base {args.base} is not among the contenders")
    args.epochs = args.epochs or (3 if args.quick else 20)
    args.repetitions = args.repetitions or (1 if args.quick else 5)
    if args.epochs < 2:
        p.error("--epochs must be >= 2 (epoch 1 is warm-up and is not timed)")
    return args


# --------------------------------------------------------------------------------------------- torch


def _regbench_data(threads: int, experiment: list[str] = LECTURE):
    sys.path.insert(0, str(ROOT / "src"))
    import torch
    from hydra import compose, initialize_config_dir

    import regbench.cli  # noqa: F401  (registers the schemas)
    from regbench.cli import CONFIG_DIR
    from regbench.data import load_data

    torch.set_num_threads(threads)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", experiment)
    return cfg, load_data(cfg.data, torch.device("cpu"))


def minimal(cfg, data, epochs: int, fused: bool) -> dict:
    import torch

    from regbench.models import build_model

    torch.manual_seed(0)
    model = build_model(cfg.model, data.input_shape, 10)
    o = cfg.optimizer
    opt = torch.optim.Adam(model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=fused)
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_loop import minimal_epoch  # the same minimal loop bench_loop.py measures

    x, y, bs, g = data.train_x, data.train_y, cfg.data.batch_size, torch.Generator().manual_seed(0)
    times, start = [], time.perf_counter()
    for _ in range(epochs):
        t0 = time.perf_counter()
        minimal_epoch(model, opt, x, y, bs, g)
        times.append(time.perf_counter() - t0)
    return {"epochs": times, "run_s": time.perf_counter() - start}


def regbench_run(name: str, epochs: int, threads: int, cache: Path, work: Path, experiment: list[str] = LECTURE) -> dict:
    run_dir = work / f"{name}-{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "regbench", *experiment, *REGBENCH_ARGS[name], f"trainer.max_epochs={epochs}",
           "trainer.progress_bar=false", f"trainer.num_threads={threads}", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "XDG_CACHE_HOME": str(cache)}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    with open(run_dir / "metrics.csv") as f:
        times = [float(r["epoch_time_s"]) for r in csv.DictReader(f)]
    summary = json.loads((run_dir / "summary.json").read_text())
    timing = summary["timing"]
    return {"epochs": times, "run_s": summary["time_s"], "impl": summary["optimizer_impl"],
            "compile": summary["compile"], "step": summary["step_impl"], "train": timing["train_s"] / len(times),
            "overhead": timing["overhead"], "outside": (summary["time_s"] - sum(times)) / len(times)}


# --------------------------------------------------------------------------------------------- keras


def keras_python(venv: Path) -> Path:
    """The venv's interpreter, creating the venv and installing Keras 3 + JAX (CPU) from PyPI when missing."""
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    ok = python.exists() and subprocess.run([str(python), "-c", "import keras, jax"], capture_output=True,
                                            env={**os.environ, "KERAS_BACKEND": "jax"}).returncode == 0
    if not ok:
        print(f"creating {venv} with keras and jax[cpu] from PyPI ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip", "keras", "jax[cpu]"],
                       check=True)
    return python


def keras_run(python: Path, arrays: Path, epochs: int, threads: int) -> dict:
    """XLA has no thread-count setting: the child is pinned to ``threads`` of this process's cores instead."""
    cores = sorted(os.sched_getaffinity(0))[:threads]
    proc = subprocess.run([str(python), "-c", KERAS_CHILD, str(arrays), str(epochs)], capture_output=True, text=True,
                          env={**os.environ, "KERAS_BACKEND": "jax"}, preexec_fn=lambda: os.sched_setaffinity(0, cores))
    if proc.returncode != 0:
        raise SystemExit(f"keras failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def save_arrays(data, path: Path) -> None:
    import numpy as np

    np.savez(path, train_x=data.train_x.permute(0, 2, 3, 1).numpy(), train_y=data.train_y.numpy(),
             val_x=data.val_x.permute(0, 2, 3, 1).numpy(), val_y=data.val_y.numpy())


# --------------------------------------------------------------------------------------------- table


def steady(times: list[float]) -> float:
    return statistics.median(times[1:])  # epochs 2..N


def table(results: dict[str, list[dict]], base: str) -> str:
    def rng(values, fmt="{:.3f}"):
        lo, hi = min(values), max(values)
        return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}–{fmt.format(hi)}"

    # Ratios per repetition: each contender against the base of the same repetition (they ran back to back).
    refs = [steady(r["epochs"]) for r in results[base]] if base in results else None
    lines = ["| contender | s / epoch (epochs 2..N) | vs " + base + " | first epoch s | run s | training s/epoch "
             "| overhead | outside s/epoch |", "|---|---|---|---|---|---|---|---|"]
    for name, reps in results.items():
        per = [steady(r["epochs"]) for r in reps]
        ratios = [p / r for p, r in zip(per, refs)] if refs else []
        ratio = f"{statistics.median(ratios):.2f} ({rng(ratios, '{:.2f}')})" if len(set(ratios)) > 1 else \
            rng(ratios, "{:.2f}") if ratios else "-"
        outside = rng([r["outside"] for r in reps]) if "outside" in reps[0] else "-"
        train = rng([r["train"] for r in reps]) if "train" in reps[0] else "-"
        overheads = [100 * r["overhead"] for r in reps] if "overhead" in reps[0] else []
        overhead = f"{statistics.median(overheads):.1f} % ({rng(overheads, '{:.1f}')})" if overheads else "-"
        label = name + (f" ({reps[0]['impl']}, {reps[0]['step']} step, compile {reps[0]['compile']})"
                        if "impl" in reps[0] else "")
        lines.append(f"| {label} | {rng(per)} | {ratio} | {rng([r['epochs'][0] for r in reps], '{:.2f}')} "
                     f"| {rng([r['run_s'] for r in reps], '{:.1f}')} | {train} | {overhead} | {outside} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    cfg, data = _regbench_data(threads, args.experiment)
    import torch

    python = keras_python(args.venv) if "keras" in args.contenders else None
    results: dict[str, list[dict]] = {c: [] for c in args.contenders}
    with tempfile.TemporaryDirectory(prefix="bench_step-") as tmp:
        work, cache, arrays = Path(tmp), Path(tmp) / "cache", Path(tmp) / "split.npz"
        save_arrays(data, arrays)
        for rep in range(args.repetitions):
            order = args.contenders if rep % 2 == 0 else list(reversed(args.contenders))
            for name in order:
                print(f"repetition {rep + 1}/{args.repetitions}: {name}", file=sys.stderr, flush=True)
                if name.startswith("minimal"):
                    results[name].append(minimal(cfg, data, args.epochs, fused=name == "minimal_fused"))
                elif name == "keras":
                    results[name].append(keras_run(python, arrays, args.epochs, threads))
                else:  # the first repetition compiles into an empty cache, later ones reuse it
                    results[name].append(regbench_run(name, args.epochs, threads, cache, work, args.experiment))
    versions = f"torch {torch.__version__}" + (f", keras {results['keras'][0]['versions']['keras']} on jax "
                                              f"{results['keras'][0]['versions']['jax']}" if results.get("keras") else "")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {threads} threads; "
          f"Python {platform.python_version()}, {versions}")
    model = "-".join(str(w) for w in [data.input_shape[0] * data.input_shape[1] * data.input_shape[2],
                                      *cfg.model.hidden, 10])
    print(f"{'default experiment' if args.default_experiment else 'lecture'} MLP {model}, Adam, batch "
          f"{cfg.data.batch_size}, mnist5k ({len(data.train_y)} training images), {args.epochs} epochs x "
          f"{args.repetitions} repetitions; ranges over repetitions\n")
    print(table(results, args.base))


if __name__ == "__main__":
    main()
