"""The stacked engine (regbench.stacked.engine.fit_stack) against the single runs it stands for.

Every member writes the run folder an ordinary run writes, and computes what its single run computes: the same
data order, the same random draws (dropout masks, augmentation: each member's own RNG stream), its own optimizer
state and hyperparameters, its own regularizer strengths — and, on a CPU, the same arithmetic: each member runs its
single run's kernels on its own rows (regbench.stacked.model's ``loop``, step.py's per-member rules, one optimizer
over the members' rows), so every metric is bitwise its single run's (issue 25: batched kernels had left one ulp per
step, which Adam turned into 7e-3 relative by epoch 5 for one seed of the default experiment).
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from regbench.stacked.engine import fit_stack
from regbench.train import fit
from tests.conftest import REPO, compose_cfg

BASE = ["data.train_size=256", "data.batch_size=32", "data.val_fraction=0.05", "data.test_size=100",
        "trainer.progress_bar=false", "trainer.clean_subset=64"]
SMALL_MLP = ["model.hidden=[32,16]"]
COMPARED = ("train_loss", "train_penalty", "clean_train_loss", "val_loss", "weight_l1", "weight_l2")  # not ECE: binned


def rows(run_dir) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def composed(overrides):
    small = [] if any(o.startswith("model=") for o in overrides) else SMALL_MLP
    return compose_cfg(*BASE, *small, *overrides)


def single(tmp_path, name, *overrides):
    run_dir = tmp_path / name
    fit(composed(overrides), run_dir)
    return run_dir


def stacked(tmp_path, name, members, **kw):
    dirs = [tmp_path / name / str(k) for k in range(len(members))]
    values = fit_stack([composed(m) for m in members], dirs, **kw)
    return dirs, values


# Every column a run writes but the wall-clock time.
EXACT = ("train_loss", "train_penalty", "train_acc", "clean_train_loss", "clean_train_acc", "val_loss", "val_acc",
         "val_ece", "clean_gap_loss", "clean_gap_acc", "weight_l1", "weight_l2", "lr", "step")


def assert_equal_rows(a, b):
    """Bitwise equal metrics, epoch by epoch (issue 25): every column but the wall-clock time, the epoch's training
    loss and penalty sums included (Stack._sums sums each member's steps in the single run's order)."""
    ra, rb = rows(a), rows(b)
    assert len(ra) == len(rb)
    for i, (x, y) in enumerate(zip(ra, rb)):
        for c in EXACT:
            assert x[c] == y[c], (c, i + 1, x[c], y[c])


def summary(run_dir) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def untimed(row: dict) -> dict:
    """A metrics row without its wall-clock time (the one column a rerun never repeats)."""
    return {k: v for k, v in row.items() if k != "epoch_time_s"}


OPTIMIZERS = ["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw"]
# Members of one stack: a plain run, penalties + label smoothing, clipping + elastic net + dropout.
MEMBERS = [["seed=0"],
           ["seed=1", "regularizer=[l2,label_smoothing]", "regularizer.l2.lam=0.001",
            "regularizer.label_smoothing.alpha=0.1"],
           ["seed=2", "regularizer=[elastic_net,grad_clip,dropout]", "regularizer.grad_clip.max=0.5",
            "regularizer.elastic_net.lam=0.0005", "regularizer.dropout.rate=0.2"]]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_members_equal_their_single_runs(tmp_path, optimizer):
    """Each member of a stack (different seeds, regularizers, strengths; the lr differs per member too) equals its
    single run, every epoch; its summary names the stack."""
    lrs = {"sgd": 0.05, "momentum": 0.02, "nesterov": 0.02, "adagrad": 0.02, "rmsprop": 0.001, "adam": 0.002,
           "adamw": 0.002}
    members = [[f"optimizer={optimizer}", f"optimizer.lr={lrs[optimizer] * (1 + 0.5 * k)}",
                "trainer.max_epochs=3", *m] for k, m in enumerate(MEMBERS)]
    dirs, values = stacked(tmp_path, "stack", members)
    for k, m in enumerate(members):
        alone = single(tmp_path, f"single{k}", *m)
        assert_equal_rows(dirs[k], alone)
        s = summary(dirs[k])
        assert s["status"] == "completed" and s["stacked"]["index"] == k and s["stacked"]["members"] == 3
        assert s["step_impl"] == "stacked"
        assert s["test"] == summary(alone)["test"] and untimed(s["best"]) == untimed(summary(alone)["best"])
        assert values[k] == summary(alone)["best"]["val_loss"]
        for name in ("tb", "checkpoints", "metrics.csv", "COMPLETED", "regbench.log"):
            assert (dirs[k] / name).exists(), name


@pytest.mark.parametrize("model", [["model=lecture_cnn", "model.widths=[4,8]", "model.dense=16"],
                                   ["model=lecture_cnn", "model.widths=[4,8]", "model.dense=16",
                                    "regularizer=[batchnorm]", "model.pooling=avg", "model.global_pool=avg"]],
                         ids=["cnn", "cnn_bn"])
def test_cnn_members_equal_their_single_runs(tmp_path, model):
    """The lecture CNN with and without batch norm (per-member running statistics): bitwise too (the members'
    convolutions run one by one on a CPU); the pools are averages with batch norm, as before issue 25."""
    members = [[*model, "optimizer=momentum", "trainer.max_epochs=2", "seed=0"],
               [*model, "optimizer=momentum", "trainer.max_epochs=2", "seed=1", "optimizer.lr=0.02"]]
    dirs, _ = stacked(tmp_path, "stack", members)
    for k, m in enumerate(members):
        assert_equal_rows(dirs[k], single(tmp_path, f"single{k}", *m))


def test_weight_decay_members(tmp_path):
    """regbench's own decoupled decay (Adam) with a different rate per member; AdamW's native decay likewise."""
    for opt in ("adam", "adamw"):
        members = [[f"optimizer={opt}", "optimizer.weight_decay=0", "regularizer=[weight_decay]",
                    f"regularizer.weight_decay.rate={r}",
                    "trainer.max_epochs=2", f"seed={k}"] for k, r in enumerate((0.0, 0.01, 0.1))]
        dirs, _ = stacked(tmp_path, f"stack_{opt}", members)
        for k, m in enumerate(members):
            assert_equal_rows(dirs[k], single(tmp_path, f"{opt}{k}", *m))


def test_a_member_does_not_depend_on_its_group_mates(tmp_path):
    """The same configuration stacked alone and with 3 others gives the same metrics, bitwise (each member's
    arithmetic is its own: its rows, its kernels)."""
    me = ["seed=5", "regularizer=[dropout]", "trainer.max_epochs=2"]
    alone, _ = stacked(tmp_path, "alone", [me])
    two = "trainer.max_epochs=2"
    crowd, _ = stacked(tmp_path, "crowd", [["seed=1", two], me, ["seed=2", "optimizer.lr=0.01", two], ["seed=3", two]])
    assert_equal_rows(alone[0], crowd[1])


def test_stacked_sweep_reruns_bitwise(tmp_path):
    members = [["seed=0", "regularizer=[dropout]", "trainer.max_epochs=2"], ["seed=1", "trainer.max_epochs=2"]]
    a, _ = stacked(tmp_path, "a", members)
    b, _ = stacked(tmp_path, "b", members)
    for x, y in zip(a, b):
        ra, rb = rows(x), rows(y)
        for r in ra + rb:
            r.pop("epoch_time_s")
        assert ra == rb


def test_early_stopping_stops_one_member_and_restores_its_best_weights(tmp_path):
    """A member that stops early leaves the stack; the others go on; its results equal its single run's."""
    stopper = ["seed=0", "regularizer=[early_stopping]", "regularizer.early_stopping.patience=1",
               "regularizer.early_stopping.min_delta=0.5", "trainer.max_epochs=4"]
    other = ["seed=1", "trainer.max_epochs=4"]
    dirs, _ = stacked(tmp_path, "stack", [stopper, other])
    assert len(rows(dirs[0])) == 2 and len(rows(dirs[1])) == 4
    alone = single(tmp_path, "alone", *stopper)
    assert_equal_rows(dirs[0], alone)
    assert summary(dirs[0])["test"] == summary(alone)["test"]


def test_a_diverging_member_fails_alone(tmp_path):
    """lr=1e6 in a stack of 4: that member fails with the single run's one-line error in its own folder; the other
    three complete with the results of a stack without it."""
    good = [[f"seed={k}", "trainer.max_epochs=2", "optimizer=sgd"] for k in range(3)]
    bad = ["seed=3", "trainer.max_epochs=2", "optimizer=sgd", "optimizer.lr=1e6"]
    dirs, values = stacked(tmp_path, "with", [good[0], bad, good[1], good[2]])
    s = summary(dirs[1])
    assert s["status"] == "failed" and s["error"].startswith("training diverged: non-finite") and math.isnan(values[1])
    without, _ = stacked(tmp_path, "without", good)
    for d, w in zip([dirs[0], dirs[2], dirs[3]], without):
        assert summary(d)["status"] == "completed"
        assert_equal_rows(d, w)


KILLED = """
import sys
from pathlib import Path
from tests.conftest import compose_cfg
from regbench.stacked.engine import fit_stack
import tests.test_stacked_engine as t
members = [["seed=0", "regularizer=[dropout]", "trainer.max_epochs=3"], ["seed=1", "trainer.max_epochs=3"],
           ["seed=2", "optimizer.lr=0.003", "trainer.max_epochs=3"]]
root = Path(sys.argv[1])
fit_stack([t.composed(m) for m in members], [root / str(k) for k in range(3)], resume=True)
"""


@pytest.mark.slow
def test_sigkill_of_a_stack_resumes_every_member_bitwise(tmp_path):
    """Killed after the first member wrote its epoch-2 checkpoint (the others had not): the stack resumes every
    member from epoch 1 and ends bitwise equal to the uninterrupted stack."""
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"}
    run = lambda root, fault=None: subprocess.run(  # noqa: E731
        [sys.executable, "-c", KILLED, str(root)], cwd=REPO, capture_output=True, text=True,
        env={**env, **({"REGBENCH_FAULT": fault} if fault else {})})
    whole = run(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = run(tmp_path / "killed", "after_checkpoint:2")
    assert killed.returncode == -9
    resumed = run(tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for k in range(3):
        a, b = rows(tmp_path / "whole" / str(k)), rows(tmp_path / "killed" / str(k))
        for r in a + b:
            r.pop("epoch_time_s")
        assert a == b
        wa = torch.load(tmp_path / "whole" / str(k) / "checkpoints" / "last.pt", weights_only=True)["model"]
        wb = torch.load(tmp_path / "killed" / str(k) / "checkpoints" / "last.pt", weights_only=True)["model"]
        assert all(torch.equal(wa[n], wb[n]) for n in wa)


@pytest.mark.parametrize("augmentation", ["digits", "mixup"])
def test_members_with_augmentation_equal_their_single_runs(tmp_path, augmentation):
    """Augmented batches come from each member's own policy under its own RNG stream (swapped in around its
    draws): per-image affine ops, MixUp partners and λ are drawn as in its single run."""
    members = [[f"augmentation={augmentation}", "trainer.max_epochs=2", "seed=0", "regularizer=[dropout]"],
               [f"augmentation={augmentation}", "trainer.max_epochs=2", "seed=1", "optimizer.lr=0.002"]]
    dirs, _ = stacked(tmp_path, "stack", members)
    for k, m in enumerate(members):
        assert_equal_rows(dirs[k], single(tmp_path, f"single{k}", *m))


def test_members_with_their_own_eval_every_equal_their_single_runs(tmp_path):
    """trainer.eval_every is each member's own: a member skips the evaluations its single run skips."""
    members = [["seed=0", "trainer.max_epochs=3", "trainer.eval_every=2"], ["seed=1", "trainer.max_epochs=3"]]
    dirs, _ = stacked(tmp_path, "stack", members)
    for k, m in enumerate(members):
        alone = single(tmp_path, f"single{k}", *m)
        assert [r["val_loss"] == "" for r in rows(dirs[k])] == [r["val_loss"] == "" for r in rows(alone)]
        assert_equal_rows(dirs[k], alone)
    assert [r["val_loss"] == "" for r in rows(dirs[0])] == [True, False, False]


@pytest.mark.parametrize("override, key", [("trainer.amp=bf16", "trainer.amp=bf16"),
                                           ("regularizer=[stochastic_depth]", "regularizer=stochastic_depth: it draws")])
def test_fit_stack_refuses_what_cannot_be_stacked_in_one_line(override, key, tmp_path):
    """The engine asks the same stack-wide refusals the launcher's grouping and bagging ask (the members' own
    declarations, the trainer's amp/compile): one line naming the key, nothing trained."""
    from regbench.errors import RegbenchError

    extra = ["model=resnet", "model.depth=8"] if "stochastic_depth" in override else []
    with pytest.raises(RegbenchError) as e:
        fit_stack([composed([*extra, override])] * 2, [tmp_path / "a", tmp_path / "b"])
    line = str(e.value)
    assert line.startswith(key) and "fix:" in line and "\n" not in line, line
    assert not (tmp_path / "a" / "metrics.csv").exists()
