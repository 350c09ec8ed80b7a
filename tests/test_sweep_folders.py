"""Sweep job folders, fast (no job runs): named by what the jobs vary, the stack in its fixed order, one folder
per job, no earlier command's folder taken over, data checked once before launching."""

from __future__ import annotations

import json

import pytest

from regbench.cli import check
from regbench.errors import RegbenchError
from regbench.sweep_names import canonical_name, naming, sweep_jobs

LADDER_QUICK = ["sweep=cifar10_ladder", "data=mnist5k", "data.train_size=1000", "data.batch_size=50",
                "trainer.max_epochs=10", "augmentation=none,digits"]


def names(overrides, params=None):
    return naming(sweep_jobs(overrides, params or {}))


def test_folders_are_named_by_the_overrides_that_differ_between_jobs():
    exclude, folder = names(["regularizer=[],[l2]", "seed=0,1", "optimizer=sgd", "data.train_size=500"])
    assert sorted(set(folder)) == ["regularizer=[]", "regularizer=[l2]"]
    assert set(exclude) == {"seed", "optimizer", "data.train_size"}
    # keys left out of names by default (bookkeeping) are named when they are what the sweep varies
    assert sorted(set(names(["trainer.num_threads=1,2"])[1])) == ["trainer.num_threads=1", "trainer.num_threads=2"]
    assert names(["seed=0,1,2", "optimizer=sgd"])[1] == ["default"] * 3


def test_the_cifar10_ladder_quick_form_gets_short_names():
    cfg = check(LADDER_QUICK, multirun=True, runs=False)[0]
    _, folder = names(LADDER_QUICK, dict(cfg.hydra.sweeper.params))
    assert len(folder) == 36 and len(set(folder)) == 12
    assert max(len(n) for n in folder) <= 80, max(folder, key=len)
    assert "augmentation=digits,model.pooling=max,regularizer=[lecture_dropout,batchnorm]" in folder
    assert not any("data" in n or "trainer" in n or "sweep=" in n for n in folder)


def test_the_stack_is_named_in_its_fixed_order():
    assert canonical_name("optimizer=sgd,regularizer=[dropout,l2]") == "optimizer=sgd,regularizer=[l2,dropout]"
    assert canonical_name("regularizer=[batchnorm,dropout,transfer]") == "regularizer=[transfer,dropout,batchnorm]"
    assert canonical_name("regularizer=[]") == "regularizer=[]" and canonical_name("") == "default"
    assert names(["regularizer=[dropout,l2],[]"])[1] == ["regularizer=[l2,dropout]", "regularizer=[]"]


def test_jobs_that_map_to_one_folder_are_refused(tmp_path):
    with pytest.raises(RegbenchError, match=r"two jobs of this sweep map to one folder, regularizer=\[l2,dropout\]/"
                                            r"seed=0: regularizer=\[l2,dropout\] and regularizer=\[dropout,l2\] are"):
        check(["regularizer=[l2,dropout],[dropout,l2]", f"hydra.sweep.dir={tmp_path}/s"], multirun=True)
    with pytest.raises(RegbenchError, match="is listed twice"):
        check(["seed=1,1", f"hydra.sweep.dir={tmp_path}/s"], multirun=True)
    assert not (tmp_path / "s").exists()


def _earlier_job(folder, overrides, status):
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (folder / "summary.json").write_text(json.dumps({"status": status}))
    if status == "completed":
        (folder / "COMPLETED").write_text("{}")


def test_a_folder_of_an_earlier_command_with_other_overrides_is_refused(tmp_path):
    sweep = tmp_path / "s"
    _earlier_job(sweep / "regularizer=[]" / "seed=0", ["regularizer=[]", "optimizer.lr=0.1"], "completed")
    with pytest.raises(RegbenchError, match=r"regularizer=\[\]/seed=0: holds a job of an earlier command with other "
                                            r"overrides \(optimizer.lr=0.1; now: optimizer.lr=0.01\); this sweep "
                                            r"would skip it as its own"):
        check(["regularizer=[],[l2]", "optimizer.lr=0.01", f"hydra.sweep.dir={sweep}"], multirun=True)
    # the same overrides (in another order, another num_threads): its own job, skipped when it runs
    check(["trainer.num_threads=1", "optimizer.lr=0.1", "regularizer=[],[l2]", f"hydra.sweep.dir={sweep}"],
          multirun=True)
    # an earlier failed job is retried (its attempt kept under attempts/), whatever its overrides
    _earlier_job(sweep / "regularizer=[l2]" / "seed=0", ["regularizer=[l2]", "optimizer.lr=5"], "failed")
    check(["regularizer=[],[l2]", "optimizer.lr=0.1", f"hydra.sweep.dir={sweep}"], multirun=True)


def test_a_missing_dataset_fails_the_sweep_once_before_any_job(tmp_path, monkeypatch):
    monkeypatch.setenv("REGBENCH_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("REGBENCH_DOWNLOAD", "false")
    import dataclasses

    from regbench.registry import DATASETS

    calls = []
    entry = DATASETS["mnist"]
    counted = dataclasses.replace(entry.obj, load=lambda cfg: calls.append(1) or entry.obj.load(cfg))
    monkeypatch.setitem(DATASETS._entries, "mnist", dataclasses.replace(entry, obj=counted))
    with pytest.raises(RegbenchError, match=r"data=mnist: dataset files missing or corrupt in .*data.download=false"):
        check(["data=mnist5k,mnist", "regularizer=[],[dropout],[l2]", "seed=0,1,2", f"hydra.sweep.dir={tmp_path}/s"],
              multirun=True)
    assert len(calls) == 1
    assert not (tmp_path / "s").exists() and not (tmp_path / "data").exists()


def test_a_failed_download_leaves_no_empty_data_root(tmp_path, monkeypatch):
    from urllib.error import URLError

    import torchvision.datasets.mnist as tv_mnist
    from omegaconf import OmegaConf

    from regbench.datasets import DATASETS
    from regbench.errors import DataError

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", offline)
    cfg = OmegaConf.create({"name": "mnist", "root": str(tmp_path / "new" / "data"), "download": True})
    with pytest.raises(DataError, match="download failed"):
        DATASETS["mnist"].load(cfg)
    assert not (tmp_path / "new").exists()


def test_the_retry_hint_is_the_exact_command_with_the_sweep_folder(tmp_path, monkeypatch):
    from regbench.sweep import retry_command
    from regbench.sweep_names import NAMING_KEY

    sweep = tmp_path / "outputs" / "sweeps" / "2026-01-01" / "10-00-00"  # an ad-hoc sweep's timestamped folder
    monkeypatch.setattr("sys.argv", ["regbench", "-m", "regularizer=[],[l2]", "optimizer.lr=0.1",
                                     f"{NAMING_KEY}=['seed']"])
    assert retry_command(sweep) == f"regbench -m 'regularizer=[],[l2]' optimizer.lr=0.1 hydra.sweep.dir={sweep}"
    monkeypatch.setattr("sys.argv", ["regbench", "-m", "seed=0,1", "hydra.sweep.dir=elsewhere/../x"])
    assert retry_command(tmp_path / "x") == f"regbench -m seed=0,1 hydra.sweep.dir={tmp_path / 'x'}"


def test_a_diverging_sweep_job_fails_with_its_one_line_reason_and_no_traceback(tmp_path, caplog):
    import math

    from regbench.sweep import OUTCOME, run_job
    from regbench.train import fit
    from tests.conftest import TINY, compose_cfg

    cfg = compose_cfg(*TINY, "optimizer=sgd", "optimizer.lr=1e30")
    with caplog.at_level("ERROR"):
        assert math.isnan(run_job(cfg, tmp_path / "job", fit, None))
    record = json.loads((tmp_path / "job" / OUTCOME).read_text())
    assert record["outcome"] == "failed" and record["reason"].startswith("training diverged: non-finite training loss")
    logged = [r.getMessage() for r in caplog.records if r.name == "regbench.sweep"]
    assert logged == [f"job failed: {record['reason']}"]  # the one line, no traceback


def test_status_counts_only_the_jobs_this_command_ran(tmp_path, monkeypatch):
    import os
    import time

    from regbench.sweep import OUTCOME, SWEEP_ID, collect

    def job(name, outcome, sweep_id, age):
        d = tmp_path / name / "seed=0"
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text("[]\n")
        (d / OUTCOME).write_text(json.dumps({"outcome": outcome, "reason": "", "value": None, "sweep_id": sweep_id}))
        stamp = time.time() - age
        os.utime(d / ".hydra" / "overrides.yaml", (stamp, stamp))

    job("mine_ok", "ok", "now", 0)
    job("old_failed", "failed", "before", 3600)
    job("old_no_id", "failed", None, 3600)
    job("killed_now", "ok", "before", 0)  # set up now, killed before its record: the "ok" is an earlier one's
    jobs = {j["run"].split("/")[0]: j for j in collect(tmp_path, "now", time.time() - 60)}
    assert {k for k, j in jobs.items() if j["current"]} == {"mine_ok", "killed_now"}
    assert jobs["killed_now"]["outcome"] == "not run"
    assert all(j["current"] for j in collect(tmp_path))  # no command given: every folder
