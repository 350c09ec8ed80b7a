"""hydra/launcher=stacked: which jobs share a stack (regbench.stacked.grouping), and sweeps end to end: every
member writes an ordinary run folder, re-runs skip finished members, unstackable jobs train the ordinary way,
a diverging member fails alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from regbench.stacked.grouping import group_jobs, stack_key
from tests.conftest import F32_REL, REPO, compose_cfg

SMALL = ["data.train_size=96", "data.batch_size=32", "data.val_fraction=0.05", "data.test_size=100",
         "trainer.max_epochs=2", "trainer.progress_bar=false", "model.hidden=[16]"]


def key(*overrides):
    return stack_key(compose_cfg(*overrides))


@pytest.mark.parametrize("a, b", [
    (["seed=0"], ["seed=1"]),
    (["optimizer.lr=0.001"], ["optimizer.lr=0.01"]),
    (["optimizer=momentum"], ["optimizer=momentum", "optimizer.momentum=0.5"]),
    (["regularizer=[]"], ["regularizer=[l2]"]),
    (["regularizer=[]"], ["regularizer=[dropout]"]),
    (["regularizer=[dropout]", "regularizer.dropout.rate=0.2"], ["regularizer=[dropout]"]),
    (["regularizer=[label_smoothing,grad_clip]"], ["regularizer=[early_stopping]"]),
    (["scheduler=cosine"], ["scheduler=constant"]),
    (["trainer.num_threads=1"], ["trainer.checkpoint_every=2"]),
])
def test_what_may_differ_inside_one_stack(a, b):
    assert key(*a)[0] is not None and key(*a)[0] == key(*b)[0]


@pytest.mark.parametrize("a, b", [
    (["model.hidden=[32]"], ["model.hidden=[64]"]),
    (["optimizer=adam"], ["optimizer=sgd"]),
    (["optimizer=adam"], ["optimizer=adam", "optimizer.amsgrad=true"]),
    (["data.batch_size=32"], ["data.batch_size=64"]),
    (["trainer.max_epochs=2"], ["trainer.max_epochs=3"]),
    (["regularizer=[]"], ["regularizer=[batchnorm]"]),
    (["regularizer=[dropout]"], ["regularizer=[dropout]", "regularizer.dropout.placement=before_activation"]),
    (["augmentation=none"], ["augmentation=digits"]),
])
def test_what_splits_a_sweep_into_stacks(a, b):
    assert key(*a)[0] != key(*b)[0]


@pytest.mark.parametrize("overrides, why", [
    (["model=resnet", "model.depth=8", "regularizer=[stochastic_depth]"], "stochastic_depth"),
    (["trainer.amp=bf16"], "trainer.amp=bf16"),
    (["trainer.compile=model"], "trainer.compile=model"),
])
def test_jobs_that_cannot_be_stacked_say_why(overrides, why):
    k, reason = key(*overrides)
    assert k is None and why in reason


def test_groups_keep_job_order_and_respect_max_members():
    assert group_jobs(["a", "b", "a", None, "a", "b"], 2) == [[0, 2], [4], [1, 5]]


def regbench(args, cwd):
    return subprocess.run([sys.executable, "-m", "regbench", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(REPO / "src")})


@pytest.mark.slow
def test_a_stacked_sweep_end_to_end(tmp_path):
    """3 stackable jobs and 1 unstackable one; every member's folder is an ordinary run folder naming its stack;
    a re-run skips them all; max_members cuts a group into stacks."""
    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=stacked", "regularizer=[],[l2],[stochastic_depth]", "seed=0,1", "model=resnet",
            "model.depth=8", *[s for s in SMALL if not s.startswith("model.hidden")], f"hydra.sweep.dir={sweep}"]
    first = regbench(args, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    status = {e["run"]: e for e in json.loads((sweep / "sweep_status.json").read_text())}
    assert len(status) == 6 and all(e["outcome"] == "ok" for e in status.values())
    stacked = [r for r, e in status.items() if "stack" in e]
    assert sorted(stacked) == sorted(r for r in status if "stochastic_depth" not in r)
    assert {status[r]["stack"]["members"] for r in stacked} == {4}
    for run in status:
        folder = sweep / run
        for name in (".hydra/config.yaml", ".hydra/overrides.yaml", "tb", "metrics.csv", "summary.json",
                     "checkpoints/last.pt", "COMPLETED"):
            assert (folder / name).exists(), (run, name)
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["status"] == "completed" and ("stacked" in summary) == (run in stacked)
    assert "1 stacks, 4 members, 2 jobs not in a stack" in first.stdout
    again = regbench(args, tmp_path)
    assert "0 ok, 0 resumed, 6 skipped, 0 failed" in again.stdout, again.stdout[-2000:]
    split = regbench(["-m", "hydra/launcher=stacked", "hydra.launcher.max_members=2", "seed=0,1,2", *SMALL,
                      f"hydra.sweep.dir={tmp_path / 'split'}"], tmp_path)
    assert split.returncode == 0 and "2 stacks, 3 members" in split.stdout, split.stdout[-2000:]


@pytest.mark.slow
def test_a_diverging_member_fails_alone_in_the_status_table(tmp_path):
    sweep = tmp_path / "sweep"
    proc = regbench(["-m", "hydra/launcher=stacked", "optimizer=sgd", "optimizer.lr=0.01,1e30", *SMALL,
                     f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 1
    assert "regbench: error: training diverged: non-finite" in proc.stderr and "Traceback" not in proc.stderr
    status = {e["run"]: e["outcome"] for e in json.loads((sweep / "sweep_status.json").read_text())}
    assert sorted(status.values()) == ["failed", "ok"]


@pytest.mark.slow
def test_rerun_of_a_member_trains_it_as_a_stack_of_one(tmp_path):
    """`regbench rerun <member>` computes what its stack computed for it (a member does not depend on its
    group-mates: equal to 1e-6 relative; bitwise on this machine, every member's slice of a batched product being
    computed alike)."""
    import csv

    sweep = tmp_path / "sweep"
    proc = regbench(["-m", "hydra/launcher=stacked", "seed=0,1", "regularizer=[dropout]", *SMALL,
                     f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    member = next(sweep.rglob("seed=1"))
    again = regbench(["rerun", str(member), f"hydra.run.dir={tmp_path / 'again'}"], tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    a, b = (list(csv.DictReader(open(d / "metrics.csv"))) for d in (member, tmp_path / "again"))
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        for c in ("train_loss", "val_loss", "clean_train_loss", "weight_l2"):
            assert float(x[c]) == pytest.approx(float(y[c]), rel=F32_REL), c  # bitwise on this machine
    assert json.loads((tmp_path / "again" / "summary.json").read_text())["stacked"]["members"] == 1
