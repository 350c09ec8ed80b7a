"""Sweeps end to end: folder names, failures that do not stop the sweep, re-runs that skip / resume / retry,
the real launchers (joblib, submitit), named studies, and the report."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from regbench.cli import check, main
from regbench.report import report
from regbench.report_plots import BARS_SIZE, CURVES_SIZE, GAP_SIZE
from tests.conftest import TINY, compose_cfg, make_mnist_like

pytestmark = pytest.mark.slow

SMALL = ["data.train_size=64", "data.batch_size=32", "data.val_fraction=0.025", "data.test_size=100",
         "trainer.max_epochs=2", "trainer.progress_bar=false"]


def regbench(args, cwd, env=None, check=True):
    proc = subprocess.run([sys.executable, "-m", "regbench", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def outcomes(sweep: Path) -> dict[str, str]:
    return {e["run"]: e["outcome"] for e in json.loads((sweep / "sweep_status.json").read_text())}


def test_failed_jobs_do_not_stop_the_sweep_and_only_they_run_again(tmp_path):
    sweep = tmp_path / "sweep"
    # lr=1e30 diverges: a failure inside the job (a RegbenchError), reported as its one line, no traceback
    args = ["-m", "optimizer=sgd", "optimizer.lr=0.01,1e30", "regularizer=[],[dropout]", *SMALL,
            f"hydra.sweep.dir={sweep}"]
    first = regbench(args, tmp_path, check=False)
    assert first.returncode == 1
    assert "2 of 4 sweep jobs failed" in first.stderr
    assert "Traceback" not in first.stdout + first.stderr
    assert "regbench: error: training diverged: non-finite training loss" in first.stderr
    status = outcomes(sweep)
    ok = sorted(k for k, v in status.items() if v == "ok")
    failed = sorted(k for k, v in status.items() if v == "failed")
    # folders are named by what the jobs vary only (not the shared optimizer=sgd, data.*, trainer.*)
    assert ok == ["optimizer.lr=0.01,regularizer=[]/seed=0", "optimizer.lr=0.01,regularizer=[dropout]/seed=0"]
    assert failed == ["optimizer.lr=1e+30,regularizer=[]/seed=0", "optimizer.lr=1e+30,regularizer=[dropout]/seed=0"]
    table = first.stdout[first.stdout.index("sweep "):]
    assert re.search(r"^optimizer\.lr=1e\+30,regularizer=\[\]/seed=0 +failed +training diverged: non-finite", table,
                     flags=re.M)
    stamps = {k: (sweep / k / "COMPLETED").stat().st_mtime_ns for k in ok}
    # the hint is the exact command, with the folder (as given here; an ad-hoc sweep gets its timestamped one)
    hint = first.stderr.strip().splitlines()[-1]
    assert hint.endswith("run: regbench -m optimizer=sgd optimizer.lr=0.01,1e30 'regularizer=[],[dropout]' "
                         + " ".join(SMALL) + f" hydra.sweep.dir={sweep}")

    second = regbench(args, tmp_path, check=False)  # the same command: only the failed jobs run again
    status = outcomes(sweep)
    assert sorted(k for k, v in status.items() if v == "skipped") == ok
    assert sorted(k for k, v in status.items() if v == "failed") == failed
    assert {k: (sweep / k / "COMPLETED").stat().st_mtime_ns for k in ok} == stamps  # not touched
    assert all((sweep / k / "attempts" / "1" / "summary.json").exists() for k in failed)
    assert "0 ok, 0 resumed, 2 skipped, 2 failed" in second.stdout


def test_status_and_exit_code_describe_this_commands_jobs_only(tmp_path):
    """A different command into the same sweep folder (a study's quick form after its full form failed):
    the earlier command's failed job folders are listed apart, not counted."""
    sweep = tmp_path / "sweep"
    earlier = regbench(["-m", "optimizer=sgd", "optimizer.lr=1e30", "model.hidden=[8],[16]", *SMALL,
                        f"hydra.sweep.dir={sweep}"], tmp_path, check=False)
    assert earlier.returncode == 1 and "2 of 2 sweep jobs failed" in earlier.stderr
    proc = regbench(["-m", "regularizer=[],[l2]", "seed=0,1", *SMALL, "trainer.max_epochs=1",
                     f"hydra.sweep.dir={sweep}"], tmp_path)
    assert "4 ok, 0 resumed, 0 skipped, 0 failed" in proc.stdout and "sweep jobs failed" not in proc.stderr
    assert "not part of this command (2 job folders an earlier command left here; not counted)" in proc.stdout
    entries = json.loads((sweep / "sweep_status.json").read_text())
    assert sorted((e["run"], e["outcome"]) for e in entries if not e["current"]) == [
        ("model.hidden=[16]/seed=0", "failed"), ("model.hidden=[8]/seed=0", "failed")]
    current = sorted((e["run"], e["outcome"]) for e in entries if e["current"])
    assert [o for _, o in current] == ["ok"] * 4


def test_a_killed_sweep_resumes_its_interrupted_job_and_matches_an_uninterrupted_one(tmp_path):
    args = ["-m", "regularizer=[],[dropout]", *SMALL, "trainer.max_epochs=3"]
    regbench([*args, f"hydra.sweep.dir={tmp_path}/ref"], tmp_path)
    killed = regbench([*args, f"hydra.sweep.dir={tmp_path}/s"], tmp_path, {"REGBENCH_FAULT": "after_metrics:2"},
                      check=False)
    assert killed.returncode == -signal.SIGKILL
    regbench([*args, f"hydra.sweep.dir={tmp_path}/s"], tmp_path)
    status = outcomes(tmp_path / "s")
    assert sorted(status.values()) == ["ok", "resumed"]
    for run in status:
        a = (tmp_path / "ref" / run / "metrics.csv").read_text().splitlines()
        b = (tmp_path / "s" / run / "metrics.csv").read_text().splitlines()
        assert [r.rsplit(",", 1)[0] for r in a] == [r.rsplit(",", 1)[0] for r in b]  # all but epoch_time_s


@pytest.mark.parametrize("launcher,threads", [("parallel", 1), ("processes", 1)])
def test_real_launchers_run_a_two_job_sweep(launcher, threads, tmp_path):
    sweep = tmp_path / "sweep"
    regbench(["-m", f"hydra/launcher={launcher}", "regularizer=[],[l2]", *SMALL, f"hydra.sweep.dir={sweep}"],
             tmp_path)
    summaries = [json.loads(p.read_text()) for p in sweep.glob("*/seed=0/summary.json")]
    assert len(summaries) == 2 and all(s["status"] == "completed" for s in summaries)
    assert all(s["num_threads"] == threads for s in summaries)  # parallel jobs do not oversubscribe 2 cores
    assert sorted(outcomes(sweep).values()) == ["ok", "ok"]


def test_slurm_launcher_config_composes_and_rejects_a_typo(tmp_path, capsys):
    cfgs = check(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "seed=0,1"], multirun=True, runs=False)
    launcher = cfgs[0].hydra.launcher
    assert launcher._target_ == "hydra_plugins.regbench_launcher.slurm_launcher.SlurmLauncher"
    assert launcher.partition == "gpu" and launcher.max_num_timeout == 3
    assert launcher.cpus_per_task == 2 and launcher.mem_gb == 4  # fits a small node
    with pytest.raises(SystemExit) as e:
        main(["-m", "hydra/launcher=slurm", "hydra.launcher.partiton=gpu", f"hydra.sweep.dir={tmp_path}/s"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hydra.launcher.partiton: no such key" in err and "did you mean" in err


def test_named_study_expands_its_params_and_is_validated():
    cfgs = check(["sweep=regularizer_ladder"], multirun=True, runs=False)
    stacks = {tuple(c.regularizer) for c in cfgs}
    assert stacks == {(), ("dropout",), ("l2",), ("batchnorm",), ("l2", "dropout")}
    assert {c.seed for c in cfgs} == {0, 1, 2}
    assert cfgs[0].hydra.sweep.dir == "outputs/sweeps/regularizer_ladder"
    cfgs = check(["sweep=regularizer_ladder", "seed=7"], multirun=True, runs=False)  # the command line wins for a key
    assert {c.seed for c in cfgs} == {7}


def test_report_numbers_plots_and_failed_runs(tmp_path):
    sweep = tmp_path / "sweep"
    regbench(["-m", "regularizer=[],[dropout]", "seed=0,1", *SMALL, f"hydra.sweep.dir={sweep}"], tmp_path)
    # one more run that failed, to be listed apart
    bad = sweep / "regularizer=[l2]" / "seed=0"
    bad.mkdir(parents=True)
    (bad / "summary.json").write_text(json.dumps({"status": "failed", "error": "training diverged: boom"}))
    out = report(sweep)
    table = {row["label"]: row for row in out["table"]}
    assert set(table) == {"regularizer=[]", "regularizer=[dropout]"}
    for label, row in table.items():
        summaries = [json.loads(p.read_text()) for p in (sweep / row["config"]).glob("seed=*/summary.json")]
        assert row["n"] == 2
        accs = [s["test"]["acc"] for s in summaries]
        assert row["test_acc"] == pytest.approx(np.mean(accs)) and row["test_acc_std"] == pytest.approx(np.std(accs, ddof=1))
        assert row["best_val_loss"] == pytest.approx(np.mean([s["best"]["val_loss"] for s in summaries]))
        assert row["final_gap"] == pytest.approx(np.mean([s["final"]["clean_gap_loss"] for s in summaries]))
    assert table["regularizer=[]"]["baseline"]
    d = table["regularizer=[dropout]"]
    assert d["test_acc_delta"] == pytest.approx(d["test_acc"] - table["regularizer=[]"]["test_acc"])
    md = (sweep / "report.md").read_text()
    # folder names are escaped for Markdown (no link or image can be made of them): brackets as \[ \]
    assert "| **regularizer=\\[\\]** (baseline) | 2 |" in md
    assert "regularizer=\\[l2\\]/seed=0 | failed | training diverged: boom" in md
    csv_text = (sweep / "report.csv").read_text()
    assert csv_text.splitlines()[0].startswith("label,config,regularizers,n,best_val_loss")
    import matplotlib.image

    for name, (w, h) in (("curves.png", CURVES_SIZE), ("gap.png", GAP_SIZE), ("final_gap.png", BARS_SIZE)):
        data = (sweep / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.image.imread(sweep / name).shape[:2] == (h, w)
    proc = regbench(["report", str(sweep), "--sort", "test_acc"], tmp_path)
    assert "report.md" in proc.stdout


def test_report_of_an_empty_folder_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path)])
    assert e.value.code == 2
    assert "no completed run below it" in capsys.readouterr().err


def test_tensorboard_hparams_have_the_stack_as_a_column(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from regbench.train import fit

    fit(compose_cfg(*TINY, "regularizer=[l2,dropout]"), tmp_path)
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    data = plugin_data_pb2.HParamsPluginData.FromString(content)
    assert data.session_start_info.hparams["regularizer"].string_value == "[l2,dropout]"


def test_a_members_key_can_be_set_next_to_a_swept_stack(tmp_path):
    # Hydra composes the master config without the swept group (default stack []): the plain override is handed
    # to it as a force-add; every job still gets exactly the plain override (the jobs were checked with it).
    sweep = tmp_path / "sweep"
    regbench(["-m", "regularizer=[l2],[dropout,l2]", "regularizer.l2.lam=0.1", *SMALL, "trainer.max_epochs=1",
              f"hydra.sweep.dir={sweep}"], tmp_path)
    assert sorted(outcomes(sweep).values()) == ["ok", "ok"]
    for run in outcomes(sweep):
        saved = (sweep / run / ".hydra" / "config.yaml").read_text()
        assert "lam: 0.1" in saved and json.loads((sweep / run / "summary.json").read_text())["status"] == "completed"
    refused = regbench(["-m", "regularizer=[l2],[dropout]", "regularizer.l2.lam=0.1", *SMALL,
                        f"hydra.sweep.dir={tmp_path}/refused"], tmp_path, check=False)
    assert refused.returncode == 2 and not (tmp_path / "refused").exists()
    assert refused.stderr.strip() == ("regbench: error: regularizer.l2: l2 is not in the regularizer stack; add it "
                                      "first: regularizer=[l2] (or append it to the list you already use)")


def test_master_safe_rewrites_only_plain_overrides_inside_swept_groups():
    from regbench.cli_check import master_safe

    argv = ["-m", "regularizer=[l2],[dropout,l2]", "regularizer.l2.lam=0.1", "model=mlp,lecture_cnn",
            "model.init=default", "optimizer.lr=0.1", "+regularizer.x=1", "trainer.max_epochs=2"]
    assert master_safe(argv, argv[1:]) == ["-m", "regularizer=[l2],[dropout,l2]", "++regularizer.l2.lam=0.1",
                                           "model=mlp,lecture_cnn", "++model.init=default", "optimizer.lr=0.1",
                                           "+regularizer.x=1", "trainer.max_epochs=2"]
