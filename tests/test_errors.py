"""One test per row of docs/errors.md: every bad input and fault gives the documented one-line message."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from urllib.error import URLError

import pytest
import torch

from regbench.cli import main
from regbench.train import fit
from tests.conftest import one_line_error, REPO, TINY, compose_cfg, make_cifar

DOC = REPO / "docs" / "errors.md"


run_cli = one_line_error


def completed_run(tmp_path: Path) -> Path:
    run = tmp_path / "done"
    fit(compose_cfg(*TINY), run)
    return run


def unfinished_run(tmp_path: Path, status="failed", *extra) -> Path:
    run = tmp_path / "unfinished"
    fit(compose_cfg(*TINY, "trainer.max_epochs=2", *extra), run)
    summary = json.loads((run / "summary.json").read_text())
    summary["status"] = status
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def case_missing_dataset_download_fails(tmp_path, monkeypatch, capsys):
    import torchvision.datasets.mnist as tv_mnist

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", offline)
    return run_cli(capsys, *TINY, "data=mnist", f"data.root={tmp_path}/d", f"hydra.run.dir={tmp_path}/r")


def case_corrupt_dataset(tmp_path, monkeypatch, capsys):
    make_cifar(tmp_path / "d", monkeypatch)
    (tmp_path / "d" / "cifar-10-batches-py" / "test_batch").write_bytes(b"garbage")
    return run_cli(capsys, *TINY, "data=cifar10", f"data.root={tmp_path}/d", "data.download=false",
                   f"hydra.run.dir={tmp_path}/r")


def case_unwritable_run_folder(tmp_path, monkeypatch, capsys):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "checkpoints").write_text("a file where a folder should be")
    return run_cli(capsys, *TINY, f"hydra.run.dir={tmp_path}/r")


def case_divergence(tmp_path, monkeypatch, capsys):
    return run_cli(capsys, *TINY, "optimizer=sgd", "optimizer.lr=1e30", f"hydra.run.dir={tmp_path}/r")


def case_corrupt_checkpoint_on_resume(tmp_path, monkeypatch, capsys):
    run = unfinished_run(tmp_path)
    newest = run / "checkpoints" / "epoch_0002.pt"
    newest.write_bytes(newest.read_bytes()[:500])
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("regbench").addHandler(handler)
    try:
        fit(compose_cfg(*TINY, "trainer.max_epochs=2", "trainer.resume=true"), run)
    finally:
        logging.getLogger("regbench").removeHandler(handler)
    return next(r.getMessage() for r in records if "falling back" in r.getMessage())


def case_malicious_checkpoint(tmp_path, monkeypatch, capsys):
    import os

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))

    torch.save({"model": Payload()}, tmp_path / "evil.pt")
    msg = run_cli(capsys, *TINY, "regularizer=[transfer]", f"regularizer.transfer.init_from={tmp_path}/evil.pt",
                  f"hydra.run.dir={tmp_path}/r")
    assert not (tmp_path / "pwned").exists()
    return msg


def case_resume_other_config(tmp_path, monkeypatch, capsys):
    run = unfinished_run(tmp_path)
    return run_cli(capsys, *TINY, "trainer.max_epochs=2", "model.hidden=[16]", "trainer.resume=true",
                   f"hydra.run.dir={run}")


def case_transfer_shapes(tmp_path, monkeypatch, capsys):
    src = completed_run(tmp_path)
    return run_cli(capsys, *TINY, "model.hidden=[32]", "regularizer=[transfer]",
                   f"regularizer.transfer.init_from={src}", f"hydra.run.dir={tmp_path}/r")


def case_torchvision_weights_offline(tmp_path, monkeypatch, capsys):
    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    return run_cli(capsys, *TINY, "model=torchvision", "model.arch=mobilenet_v3_small", "data.normalize=none",
                   "model.download=false", f"hydra.run.dir={tmp_path}/r")


def case_report_unwritable(tmp_path, monkeypatch, capsys):
    import errno
    import os

    from tests.test_report import completed

    completed(tmp_path / "s" / "regularizer=[]" / "seed=0")
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    return run_cli(capsys, "report", str(tmp_path / "s"))


def case_report_option(tmp_path, capsys, *option):
    from tests.test_report import completed

    completed(tmp_path / "s" / "regularizer=[]" / "seed=0")
    completed(tmp_path / "s" / "regularizer=[l2]" / "seed=0", stack=["l2"])
    msg = run_cli(capsys, "report", str(tmp_path / "s"), *option)
    assert not list((tmp_path / "s").glob("report*"))  # nothing written
    return msg


def case_download_env_invalid(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("REGBENCH_DOWNLOAD", "maybe")
    msg = run_cli(capsys, *TINY, "data=mnist", f"data.root={tmp_path}/d", f"hydra.run.dir={tmp_path}/r")
    assert not (tmp_path / "d").exists() and not (tmp_path / "r").exists()
    return msg


def case_sweep_earlier_folder(tmp_path, monkeypatch, capsys):
    job = tmp_path / "s" / "regularizer=[]" / "seed=0"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("- regularizer=[]\n- optimizer.lr=0.1\n")
    (job / "COMPLETED").write_text("{}")
    return run_cli(capsys, "-m", "regularizer=[],[l2]", "optimizer.lr=0.01", f"hydra.sweep.dir={tmp_path}/s")


def case_sweep_dataset_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("REGBENCH_DATA", str(tmp_path / "d"))  # mnist5k has no data.root: the environment serves both
    monkeypatch.setenv("REGBENCH_DOWNLOAD", "false")
    msg = run_cli(capsys, "-m", "data=mnist5k,mnist", "seed=0,1", f"hydra.sweep.dir={tmp_path}/s")
    assert not (tmp_path / "s").exists() and not (tmp_path / "d").exists()
    return msg


def fake_slurm(tmp_path, monkeypatch, sbatch_error: str | None) -> None:
    """SLURM commands on PATH that answer like a cluster whose default partition has 4-CPU, 8 GB nodes; sbatch
    refuses with ``sbatch_error`` (None: no sbatch and no srun at all)."""
    bin_dir = tmp_path / "slurm-bin"
    bin_dir.mkdir()
    (bin_dir / "sinfo").write_text("#!/bin/sh\necho 'debug*|4|8192|(null)'\n")
    if sbatch_error is not None:
        (bin_dir / "sbatch").write_text(f"#!/bin/sh\necho 'sbatch: error: {sbatch_error}' >&2\nexit 1\n")
        (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir) if sbatch_error is None else f"{bin_dir}:{os.environ['PATH']}")


def case_slurm_resources(tmp_path, monkeypatch, capsys):
    fake_slurm(tmp_path, monkeypatch, "never called")
    msg = run_cli(capsys, "-m", *TINY, "hydra/launcher=slurm", "hydra.launcher.cpus_per_task=8",
                  f"hydra.sweep.dir={tmp_path}/s")
    assert not (tmp_path / "s").exists()
    return msg


def case_slurm_sbatch_refused(tmp_path, monkeypatch, capsys):
    fake_slurm(tmp_path, monkeypatch, "Batch job submission failed: Requested time limit is invalid (missing or "
                                      "exceeds some limit)")
    return run_cli(capsys, "-m", *TINY, "hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path}/s")


def case_slurm_no_sbatch(tmp_path, monkeypatch, capsys):
    fake_slurm(tmp_path, monkeypatch, None)
    msg = run_cli(capsys, "-m", *TINY, "hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path}/s")
    assert not (tmp_path / "s").exists()
    return msg
def saved_config_with(tmp_path: Path, **nodes) -> Path:
    from omegaconf import OmegaConf

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    cfg = OmegaConf.to_container(compose_cfg(*TINY))
    cfg.update(nodes)
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    return run


def case_rerun_foreign_key(tmp_path, monkeypatch, capsys):
    run = saved_config_with(tmp_path, hydra={"callbacks": {"x": {"_target_": "os.makedirs", "name": f"{tmp_path}/pwned"}}})
    msg = run_cli(capsys, "rerun", str(run))
    assert not (tmp_path / "pwned").exists()
    return msg


def case_rerun_foreign_model(tmp_path, monkeypatch, capsys):
    return run_cli(capsys, "rerun", str(saved_config_with(tmp_path, model={"name": "vgg"})))


def case_yaml_syntax(tmp_path, monkeypatch, capsys):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "broken.yaml").write_text("# @package _global_\ntrainer:\n  max_epochs: [1, 2\n")
    return run_cli(capsys, "--config-dir", str(tmp_path), "experiment=broken", f"hydra.run.dir={tmp_path}/r")


def case_raw_pickle_checkpoint(tmp_path, monkeypatch, capsys):
    import pickle

    (tmp_path / "epoch_0001.pt").write_bytes(pickle.dumps({"model": {}}, protocol=4))
    return run_cli(capsys, *TINY, "regularizer=[transfer]", f"regularizer.transfer.init_from={tmp_path}/epoch_0001.pt",
                   f"hydra.run.dir={tmp_path}/r")
# --- one folder per run, I/O faults (issue 11 items 4, 5, 10, 11, 12) ---------------------------------------

def hold_lock(folder: Path, kind: str = "run"):
    """Another live process holding ``folder``'s lock (as a run or sweep would); returns it (kill it to end)."""
    import subprocess
    import sys

    code = ("import sys, time; from pathlib import Path; from regbench.rundir import claim; "
            "claim(Path(sys.argv[1]), False, sys.argv[2]); print('held', flush=True); time.sleep(300)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder), kind], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def case_run_dir_in_use(tmp_path, monkeypatch, capsys):
    import signal
    import socket

    run = tmp_path / "r"
    holder = hold_lock(run)
    try:
        msg = run_cli(capsys, *TINY, "trainer.resume=true", f"hydra.run.dir={run}")
        assert f"(pid {holder.pid} on host {socket.gethostname()}, since " in msg
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    main([*TINY, f"hydra.run.dir={run}"])  # the dead process's lock is taken over
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    assert not (run / ".regbench.lock").exists()
    return msg


def case_sweep_dir_in_use(tmp_path, monkeypatch, capsys):
    holder = hold_lock(tmp_path / "s", "sweep")
    try:
        msg = run_cli(capsys, "-m", *TINY, "seed=0,1", f"hydra.sweep.dir={tmp_path}/s")
        inside = run_cli(capsys, *TINY, f"hydra.run.dir={tmp_path}/s/job")  # nor a run inside a live sweep
        assert inside == msg
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [".regbench.lock"]
    return msg


def case_outputs_is_a_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").write_text("a file where the outputs folder should be")
    return run_cli(capsys, *TINY)


def case_read_only_file_system(tmp_path, monkeypatch, capsys):
    import errno
    import os

    real = os.mkdir

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only)
    return run_cli(capsys, *TINY, f"hydra.run.dir={tmp_path}/ro/r")


def case_run_log_symlink(tmp_path, monkeypatch, capsys):
    run = unfinished_run(tmp_path)
    outside = tmp_path / "outside.txt"
    outside.write_text("not regbench's\n")
    (run / "regbench.log").symlink_to(outside)
    msg = run_cli(capsys, *TINY, "trainer.max_epochs=2", "trainer.resume=true", f"hydra.run.dir={run}")
    assert outside.read_text() == "not regbench's\n"
    return msg


def case_disk_full_during_checkpoint(tmp_path, monkeypatch, capsys):
    import errno
    import io

    class FullDisk(io.RawIOBase):  # the checkpoint file, on a disk that fills up after 1000 bytes
        def __init__(self, f):
            self.f, self.n = f, 0

        def writable(self):
            return True

        def write(self, b):
            self.n += len(b)
            if self.n > 1000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

    from regbench import checkpoint

    real_write = checkpoint.atomic_write  # a checkpoint's bytes go to the file through the full disk
    monkeypatch.setattr(checkpoint, "atomic_write", lambda path, write: real_write(path, lambda f: write(FullDisk(f))))
    msg = run_cli(capsys, *TINY, f"hydra.run.dir={tmp_path}/r")
    assert not [p.name for p in (tmp_path / "r" / "checkpoints").iterdir()]  # no temp file left behind
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "failed" and "No space left on device" in summary["error"]
    return msg


def case_resume_metrics_gap(tmp_path, monkeypatch, capsys):
    run = unfinished_run(tmp_path)
    ckpt = run / "checkpoints" / "epoch_0002.pt"
    state = torch.load(ckpt, weights_only=True)
    del state["history"]  # a checkpoint of a regbench that kept no copy of the rows
    torch.save(state, ckpt)
    metrics = run / "metrics.csv"
    metrics.write_text(metrics.read_text().splitlines()[0] + "\r\n")  # the rows are lost
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    msg = run_cli(capsys, *TINY, "trainer.max_epochs=2", "trainer.resume=true", f"hydra.run.dir={run}")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # refused: nothing written
    return msg


BAGGING = [*TINY, "regularizer=[bagging]", "regularizer.bagging.members=2", "trainer.max_epochs=2"]


def unfinished_bagging_run(tmp_path: Path) -> Path:
    run = tmp_path / "bagging"
    fit(compose_cfg(*BAGGING), run)
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    (run / "COMPLETED").unlink()
    return run


def case_bagging_members_symlink(tmp_path, monkeypatch, capsys):
    run = unfinished_bagging_run(tmp_path)
    (run / "members").rename(tmp_path / "outside")
    (run / "members").symlink_to(tmp_path / "outside", target_is_directory=True)
    before = {p: p.read_bytes() for p in (tmp_path / "outside").rglob("*") if p.is_file()}
    msg = run_cli(capsys, *BAGGING, "trainer.resume=true", f"hydra.run.dir={run}")
    assert {p: p.read_bytes() for p in (tmp_path / "outside").rglob("*") if p.is_file()} == before
    return msg


def case_bagging_ensemble_rows_lost(tmp_path, monkeypatch, capsys):
    run = unfinished_bagging_run(tmp_path)
    lines = (run / "metrics.csv").read_text().splitlines(keepends=True)
    (run / "metrics.csv").write_text(lines[0] + lines[2])  # epoch 1's ensemble row lost (an older regbench)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    msg = run_cli(capsys, *BAGGING, "trainer.resume=true", f"hydra.run.dir={run}")
    assert {p: p.read_bytes() for p in before} == before  # refused: nothing rewritten
    return msg


# --- helper H-B: binary files from someone else, test hooks (issue 25) -----------------------------------------

def case_compressed_checkpoint(tmp_path, monkeypatch, capsys):
    import io
    import zipfile

    buf, out = io.BytesIO(), io.BytesIO()
    torch.save({"model": {}, "epoch": 1}, buf)
    with zipfile.ZipFile(buf) as z, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as w:
        for info in z.infolist():
            w.writestr(info.filename, z.read(info))
    (tmp_path / "bomb.pt").write_bytes(out.getvalue())
    return run_cli(capsys, *TINY, "regularizer=[transfer]", f"regularizer.transfer.init_from={tmp_path}/bomb.pt",
                   f"hydra.run.dir={tmp_path}/r")


def case_checkpoint_fifo(tmp_path, monkeypatch, capsys):
    os.mkfifo(tmp_path / "fifo.pt")  # opened non-blocking, refused by fstat: it cannot hang the run
    return run_cli(capsys, *TINY, "regularizer=[transfer]", f"regularizer.transfer.init_from={tmp_path}/fifo.pt",
                   f"hydra.run.dir={tmp_path}/r")


def case_malicious_weights(tmp_path, monkeypatch, capsys):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))

    torch.save({"features.0.0.weight": Payload()}, tmp_path / "evil.pth", pickle_protocol=4)
    msg = run_cli(capsys, *TINY, "model=torchvision", "model.arch=mobilenet_v3_small", "model.input_size=32",
                  f"model.weights={tmp_path}/evil.pth", f"hydra.run.dir={tmp_path}/r")
    assert not (tmp_path / "pwned").exists() and "weights_only=False" not in msg
    return msg


def case_test_hook_malformed(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("REGBENCH_FAULT", "after_metrics")
    msg = run_cli(capsys, *TINY, f"hydra.run.dir={tmp_path}/r")
    assert not (tmp_path / "r").exists()  # refused by the pre-run check, not at the first hook mid-run
    return msg


def case_slurm_unreachable(tmp_path, monkeypatch, capsys):
    """sbatch and srun are there, but sinfo cannot reach the controller: refused before anything is written (it
    left multirun.yaml and a pickle per job when sinfo's failure was skipped)."""
    fake_slurm(tmp_path, monkeypatch, "never called")
    (tmp_path / "slurm-bin" / "sinfo").write_text("#!/bin/sh\necho 'slurm_load_partitions: Unable to contact slurm "
                                                  "controller (connect failure)' >&2\nexit 1\n")
    msg = run_cli(capsys, "-m", *TINY, "hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path}/s")
    assert not (tmp_path / "s").exists()
    return msg


def case_read_only_mid_run(tmp_path, monkeypatch, capsys):
    import errno

    from tests.conftest import writes_fail_after_epoch

    writes_fail_after_epoch(monkeypatch, 1, errno.EROFS)
    return run_cli(capsys, *TINY, "trainer.max_epochs=2", f"hydra.run.dir={tmp_path}/r")


def case_file_size_limit(tmp_path, monkeypatch, capsys):
    import errno

    from tests.conftest import writes_fail_after_epoch

    writes_fail_after_epoch(monkeypatch, 1, errno.EFBIG)
    return run_cli(capsys, *TINY, "trainer.max_epochs=2", f"hydra.run.dir={tmp_path}/r")


def _saved_run(tmp_path: Path) -> Path:
    from omegaconf import OmegaConf

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(compose_cfg(*TINY)))
    return run


def case_saved_config_interpolation(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VAR", "mnist5k")
    run = _saved_run(tmp_path)
    path = run / ".hydra" / "config.yaml"
    path.write_text(path.read_text().replace("name: mnist5k", "name: ${oc.env:VAR}"))
    return run_cli(capsys, "rerun", str(run))


def case_folder_file_not_regular(tmp_path, monkeypatch, capsys):
    run = _saved_run(tmp_path)
    (run / ".hydra" / "config.yaml").unlink()
    os.mkfifo(run / ".hydra" / "config.yaml")
    return run_cli(capsys, "rerun", str(run))


def case_folder_yaml_unbounded(tmp_path, monkeypatch, capsys):
    run = _saved_run(tmp_path)
    (run / ".hydra" / "config.yaml").write_text("a: &a [lol, lol]\nb: [*a, *a, *a]\n")
    return run_cli(capsys, "resume", str(run))


def case_run_dir_special_file(tmp_path, monkeypatch, capsys):
    run = unfinished_run(tmp_path, "running")
    (run / "checkpoints" / "last.pt").unlink()
    os.mkfifo(run / "checkpoints" / "last.pt")
    return run_cli(capsys, *TINY, "trainer.max_epochs=2", "trainer.resume=true", f"hydra.run.dir={run}")


# (row id, how to provoke it, text the message contains). Rows given as a list are plain command lines.
def case_stacked_foreign_app(tmp_path, monkeypatch, capsys):
    """hydra/launcher=stacked under another Hydra app (it trains regbench runs itself, never calling the app)."""
    import subprocess
    import sys

    (tmp_path / "my_app.py").write_text("import hydra\n\n@hydra.main(version_base='1.3', config_path=None, "
                                        "config_name=None)\ndef my_app(cfg):\n    return 1\n\nmy_app()\n")
    proc = subprocess.run([sys.executable, "my_app.py", "-m", "hydra/launcher=stacked", "+x=1,2",
                           f"hydra.searchpath=[file://{REPO / 'configs'}]"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("regbench: error: "), proc.stderr
    return proc.stderr.strip()



def case_search_other_command(tmp_path, capsys):
    from regbench.search import SIGNATURE, quiet_optuna, signature

    sweep = tmp_path / "s"
    sweep.mkdir()
    study = quiet_optuna().create_study(study_name="regbench", storage=f"sqlite:///{sweep}/search.db")
    study.set_user_attr(SIGNATURE, signature(["regularizer=[l2]", "regularizer.l2.lam=interval(1e-5,1e-2)"], {}))
    return run_cli(capsys, "-m", "hydra/sweeper=search", "regularizer=[l2]", "regularizer.l2.lam=interval(1e-5,1e-3)",
                   *TINY, f"hydra.sweep.dir={sweep}")


CASES = [
    ("typo-key", ["trainer.max_epoch=3"], "trainer.max_epoch: no such key (valid keys here: max_epochs,"),
    ("typo-top-key", ["sed=1"], "sed: no such key (valid keys here: seed, data, model"),
    ("wrong-type", ["trainer.max_epochs=ten"], "trainer.max_epochs: Value 'ten' of type 'str' could not be converted to Integer"),
    ("unknown-option", ["model=vgg"], "model=vgg: no such option in config group 'model'; available: lecture_cnn, mlp, resnet, torchvision"),
    ("bad-syntax", ["model.hidden=[1,2"], "cannot parse override: no viable alternative at input '[1,2'"),
    ("lr-range", ["optimizer.lr=0"], "optimizer.lr=0.0: expected a number > 0"),
    ("batch-range", ["data.batch_size=0"], "data.batch_size=0: expected an integer >= 1"),
    ("non-finite-value", ["regularizer=[l2]", "regularizer.l2.lam=inf"],
     "regularizer.l2.lam=inf: expected a finite number; set regularizer.l2.lam to a finite value"),
    ("val-fraction-range", ["data.val_fraction=1.5"], "data.val_fraction=1.5: expected a number in (0, 1)"),
    ("train-size-range", ["data.train_size=3601"], "data.train_size=3601: expected at most 3600"),
    ("val-split-last-sorted", ["data.val_split=last"],
     "data.val_split='last': expected a dataset stored in random order: the last 400 images of the mnist5k training "
     "pool lack classes 0..8"),
    ("bias-init-value", ["model.bias_init=ones"], "model.bias_init='ones': expected zeros, torch or null"),
    ("sweep-without-m", ["optimizer=sgd,adam"], "optimizer=sgd,adam: a sweep (several values) needs multirun; fix: add -m"),
    ("member-not-in-stack", ["regularizer.dropout.rate=0.3"], "regularizer.dropout: dropout is not in the regularizer stack"),
    ("unknown-member", ["regularizer=[dropuot]"], "regularizer=dropuot: no such option in config group 'regularizer'"),
    ("member-cannot-apply", ["regularizer=[dropout]", "regularizer.dropout.spatial=0.2"],
     "regularizer.dropout.spatial=0.2: expected 0 with model=mlp"),
    ("mc-dropout-without-dropout", ["regularizer=[mc_dropout]"], "expected dropout in the model for mc_dropout"),
    ("two-decay-sources", ["optimizer=adamw", "regularizer=[weight_decay]"],
     "optimizer.weight_decay=0.01: expected 0 when regularizer weight_decay is in the stack"),
    ("eval-every-early-stopping", ["regularizer=[early_stopping]", "trainer.eval_every=5"],
     "trainer.eval_every=5: expected 1 with regularizer.early_stopping (it watches val_loss after every epoch"),
    ("no-cuda", ["trainer.device=cuda"], "trainer.device='cuda': expected a device this machine has"),
    ("fp16-on-cpu", ["trainer.device=cpu", "trainer.amp=fp16"], "trainer.amp='fp16': expected bf16 or none on CPU"),
    ("dataset-missing-offline", ["data=cifar10", "data.root=/nonexistent/regbench", "data.download=false"],
     "data=cifar10: dataset files missing or corrupt in /nonexistent/regbench/cifar-10-batches-py (data.download=false)"),
    ("dataset-download-fails", case_missing_dataset_download_fails,
     "dataset files missing or corrupt in"),
    ("dataset-corrupt", case_corrupt_dataset, "data=cifar10: dataset files missing or corrupt in"),
    ("run-dir-completed", lambda t, m, c: run_cli(c, *TINY, f"hydra.run.dir={completed_run(t)}"),
     "already holds the results of a completed run; refusing to overwrite them"),
    ("run-dir-unfinished", lambda t, m, c: run_cli(c, *TINY, "trainer.max_epochs=2", f"hydra.run.dir={unfinished_run(t)}"),
     "already holds the results of an unfinished run (status failed); refusing to overwrite them; fix: continue it with trainer.resume=true"),
    ("run-dir-unwritable", case_unwritable_run_folder, "cannot write in run folder"),
    ("divergence", case_divergence, "training diverged: non-finite training loss"),
    ("checkpoint-corrupt", case_corrupt_checkpoint_on_resume, "cannot be loaded safely"),
    ("checkpoint-malicious", case_malicious_checkpoint, "cannot be loaded safely (it references posix.system, which the weights-only loader refuses"),
    ("resume-other-config", case_resume_other_config,
     "its checkpoint was written with another config; keys that differ: model.hidden ([256, 128] in the checkpoint, [16] now)"),
    ("transfer-shapes", case_transfer_shapes, "shapes differ: hidden.0.linear.weight (256, 784) -> (32, 784)"),
    ("transfer-missing", ["regularizer=[transfer]", "regularizer.transfer.init_from=/nonexistent/run"],
     "regularizer.transfer.init_from='/nonexistent/run': no checkpoint at /nonexistent/run"),
    ("torchvision-arch", ["model=torchvision", "model.arch=resnet19", "model.weights=null"],
     "model.arch='resnet19': expected a torchvision classification model"),
    ("torchvision-weights-offline", case_torchvision_weights_offline,
     "model.weights=DEFAULT: the mobilenet_v3_small weights file mobilenet_v3_small-047dcff4.pth is not in"),
    ("torchvision-normalize", ["model=torchvision", "model.download=true", "data.normalize=per_channel"],
     "data.normalize='per_channel': expected none with pretrained weights (model.weights=DEFAULT)"),
    ("torchvision-weights-path", ["model=torchvision", "model.weights=./resnet18.pt"],
     "model.weights='./resnet18.pt': expected a state dict file of resnet18 (no file there)"),
    ("data-classes", ["data.classes=[3,3]"], "data.classes=[3, 3]: expected null or at least two distinct labels"),
    ("rerun-not-a-run", lambda t, m, c: run_cli(c, "rerun", str(t)), "not a regbench run folder (no .hydra/config.yaml)"),
    ("report-no-jobs", lambda t, m, c: run_cli(c, "report", str(t)),
     "no completed run below it (and no failed or unfinished job either)"),
    ("report-unwritable", lambda t, m, c: case_report_unwritable(t, m, c), "curves.png: No space left on device; fix: free disk space or make"),
    # helper E: members that apply to nothing, validation cases, sweeps
    ("member-applies-to-nothing", ["model.hidden=[]", "regularizer=[dropout]"],
     "regularizer member 'dropout' applies to nothing: model.hidden=[] has no hidden layer to drop units in; fix:"),
    ("seed-range", ["seed=9223372036854775808"], "seed=9223372036854775808: expected an integer in [-2**63, 2**63-1]"),
    ("download-env-invalid", case_download_env_invalid,
     "REGBENCH_DOWNLOAD='maybe': expected true or false (the environment variable sets data.download's default)"),
    ("freeze-every-layer", ["regularizer=[transfer]", "regularizer.transfer.init_from=/nonexistent/run",
                            "regularizer.transfer.freeze_layers=3"],
     "regularizer.transfer.freeze_layers=3: expected fewer than the model's 3 dense/conv layers"),
    ("batchnorm-batch-of-one", ["regularizer=[batchnorm]", "data.batch_size=1"],
     "data.batch_size=1: expected at least 2 with batchnorm"),
    ("batchnorm-train-size-one", ["regularizer=[batchnorm]", "data.train_size=1"],
     "data.train_size=1: expected at least 2 with batch norm in the model"),
    ("sweep-same-folder", lambda t, m, c: run_cli(c, "-m", "regularizer=[l2,dropout],[dropout,l2]",
                                                   f"hydra.sweep.dir={t}/s"),
     "two jobs of this sweep map to one folder, regularizer=[l2,dropout]/seed=0: regularizer=[l2,dropout] and "
     "regularizer=[dropout,l2] are the same run"),
    ("sweep-earlier-folder", case_sweep_earlier_folder,
     "regularizer=[]/seed=0: holds a job of an earlier command with other overrides (optimizer.lr=0.1; now: "
     "optimizer.lr=0.01); this sweep would skip it as its own; fix: choose another hydra.sweep.dir=..."),
    ("sweep-dataset-missing", case_sweep_dataset_missing,
     "data=mnist: dataset files missing or corrupt in"),
    ("slurm-resources", case_slurm_resources, "hydra.launcher.cpus_per_task=8: no node of partition (default) has "
     "that many (at most 4 per node); fix: hydra.launcher.cpus_per_task=4 or less, or another hydra.launcher.partition"),
    ("slurm-sbatch-refused", case_slurm_sbatch_refused, "hydra.launcher: sbatch refused the job array: Batch job "
     "submission failed: Requested time limit is invalid (missing or exceeds some limit); fix: lower "
     "hydra.launcher.timeout_min"),
    ("slurm-no-sbatch", case_slurm_no_sbatch, "hydra/launcher=slurm: sbatch and srun not found; fix: run the sweep "
     "on a SLURM login node"),
    ("rerun-foreign-key", case_rerun_foreign_key,
     "key 'hydra' is not part of a regbench config (a run saves only seed, data, model, optimizer, scheduler, trainer, "
     "regularizer, augmentation, convention); refusing it"),
    ("rerun-not-regbench-config", case_rerun_foreign_model, "model is not a regbench model config (name 'vgg'"),
    ("experimental-rerun", lambda t, m, c: run_cli(c, "--experimental-rerun", f"{t}/config.pickle"),
     "config.pickle: refused (it unpickles the file, which can run code); fix: regbench rerun <run dir>"),
    ("yaml-syntax", case_yaml_syntax, "experiment/broken.yaml, line 4, column 1: YAML syntax error: while parsing a "
     "flow sequence (opened on line 3, column 15): expected ',' or ']', but got '<stream end>'"),
    ("config-dir-missing", lambda t, m, c: run_cli(c, "--config-dir", f"{t}/nope", "experiment=mine"),
     "nope: no such folder; fix: give a folder that holds config groups"),
    ("added-key", ["+trainer.max_epoch=1"], "trainer.max_epoch: no such key (valid keys here: max_epochs,"),
    ("unquoted-non-ascii", ["data.root=/tmp/daten/müller"],
     "data.root=/tmp/daten/müller: unquoted non-ASCII character 'ü' in the value; fix: quote the value, "
     "e.g. \"data.root='/tmp/daten/müller'\""),
    ("mc-dropout-zero-rate", ["regularizer=[dropout,mc_dropout]", "regularizer.dropout.rate=0"],
     "regularizer=[dropout,mc_dropout]: expected a dropout layer with a non-zero rate in the model for mc_dropout "
     "(regularizer.dropout.rate=0, spatial=0.0)"),
    ("checkpoint-raw-pickle", case_raw_pickle_checkpoint,
     "cannot be loaded safely (it is a raw pickle file, not a torch.save checkpoint; regbench never unpickles"),
    # helper B: one folder per run, I/O faults
    ("run-dir-in-use", case_run_dir_in_use, "r is in use by a live run (pid "),
    ("sweep-dir-in-use", case_sweep_dir_in_use, "s is in use by a live sweep (pid "),
    ("outputs-is-a-file", case_outputs_is_a_file,
     "cannot create run folder outputs/runs/"),
    ("read-only-file-system", case_read_only_file_system, "ro/r: Read-only file system; fix: choose a writable place"),
    ("run-dir-name-too-long", lambda t, m, c: run_cli(c, *TINY, f"hydra.run.dir={t}/{'x' * 300}"),
     ": File name too long; fix: choose a writable place with hydra.run.dir=..."),
    ("run-dir-symlink", case_run_log_symlink,
     "regbench.log is a symbolic link; regbench never writes through links in a run folder"),
    ("disk-full", case_disk_full_during_checkpoint, "checkpoints/epoch_0001.pt: No space left on device; fix:"),
    ("resume-metrics-gap", case_resume_metrics_gap, "metrics.csv lacks the rows of epochs 1, 2 and its checkpoint"),
    # helper C: option tables
    ("onecycle-cycle-momentum", ["optimizer=adagrad", "scheduler=onecycle", "scheduler.cycle_momentum=true"],
     "scheduler.cycle_momentum=True: expected false with optimizer=adagrad (it has no momentum or beta1 to cycle)"),
    ("option-name-other-schema", ["optimizer=sgd", "optimizer.name=adam"],
     "optimizer.name='adam': expected sgd (the options whose keys this optimizer node has); pick the option itself "
     "with optimizer=<option>"),
    # helper F: speed (issue 17)
    ("compile-mode", ["trainer.compile=bad"], "trainer.compile='bad': expected one of none, model, step"),
    ("compile-step-schedule", ["trainer.compile=step", "scheduler=cosine"],
     "trainer.compile='step': expected model or none with scheduler=cosine (a compiled optimizer step is recompiled "
     "whenever the learning rate changes); use trainer.compile=model, or scheduler=constant"),
    ("compile-step-fp16", ["trainer.amp=fp16", "trainer.compile=step"],
     "trainer.compile='step': expected model or none with trainer.amp=fp16 (the GradScaler steps the optimizer"),
    # helper D: model families and the layer slots
    ("stochastic-depth-no-residual", ["regularizer=[stochastic_depth]"],
     "regularizer.stochastic_depth.rate=0.5: expected a model with residual branches to drop (model=mlp has none); "
     "use model=resnet, or drop stochastic_depth from the stack"),
    ("resnet-depth", ["model=resnet", "model.depth=21"],
     "model.depth=21: expected 6n+2 with n >= 1: 8, 14, 20, 32, 44, 56, 110, ... (the paper's CIFAR ResNets)"),
    ("resnet-norm-with-member", ["model=resnet", "model.norm=none", "regularizer=[group_norm]"],
     "model.norm='none': expected to be left alone (batchnorm) with group_norm in the stack (the member sets the "
     "ResNet's normalisation); drop model.norm or drop group_norm from the stack"),
    ("transfer-freeze-layers-uncounted", ["model=torchvision", "model.weights=null", "regularizer=[transfer]",
                                          "regularizer.transfer.init_from=/nonexistent/run",
                                          "regularizer.transfer.freeze_layers=2"],
     "regularizer.transfer.freeze_layers=2: expected 0 with model=torchvision (its layers are not counted from the "
     "config); name the parameters to freeze with regularizer.transfer.freeze=[...]"),
    ("stack-max-members", ["-m", "hydra/launcher=stacked", "hydra.launcher.max_members=0", "seed=0,1"],
     "hydra.launcher.max_members=0: expected an integer >= 1"),
    ("bagging-members", ["regularizer=[bagging]", "regularizer.bagging.members=1"],
     "regularizer.bagging.members=1: expected an integer in 2..64 (models in the ensemble)"),
    # helper H-D: bagging runs' folders
    ("bagging-members-symlink", case_bagging_members_symlink,
     "bagging/members is a symbolic link; regbench never writes through links in a run folder; fix: replace it"),
    ("bagging-ensemble-rows-lost", case_bagging_ensemble_rows_lost,
     "metrics.csv lacks the ensemble rows of epochs 1 (they cannot be recomputed from the members' checkpoints); "
     "fix: start the bagging run again in a new folder"),
    # helper H-B: binary files from someone else, test hooks (issue 25)
    ("checkpoint-compressed", case_compressed_checkpoint,
     "bomb.pt: cannot be loaded safely (its record archive/data.pkl is compressed (zip method 8); torch.save writes "
     "uncompressed records only, and a compressed one can inflate to gigabytes)"),
    ("checkpoint-not-regular", case_checkpoint_fifo,
     "fifo.pt: is a FIFO, not a regular file; regbench reads checkpoints only from regular files"),
    ("weights-malicious", case_malicious_weights,
     "evil.pth: cannot be loaded safely (it references posix.system, which the weights-only loader refuses; regbench "
     "never loads weights files unsafely); fix: use a state dict saved with torch.save(model.state_dict(), path)"),
    ("test-hook-malformed", case_test_hook_malformed,
     "REGBENCH_FAULT='after_metrics': expected <point>:<epoch> (e.g. after_checkpoint:2) or during_write:<file name>"),
    # helper H-C: the command line, threads, SLURM, a folder that stops taking writes (issue 25)
    ("num-threads-range", ["trainer.num_threads=100000"], "trainer.num_threads=100000: expected an integer in [1, "),
    ("regularizer-null", ["regularizer=[null]"],
     "regularizer=[null]: null is not an option of config group 'regularizer' (available: activity, alpha_dropout, bagging,"),
    ("non-ascii-key", ["trainér.max_epochs=1"],
     "trainér.max_epochs=1: non-ASCII character 'é' in the key 'trainér.max_epochs' (config keys are ASCII names); "
     "fix: spell the key in ASCII, e.g. trainer.max_epochs=..."),
    ("slurm-unreachable", case_slurm_unreachable,
     "hydra/launcher=slurm: no SLURM cluster reachable (`sinfo` exited with status 1: slurm_load_partitions: Unable "
     "to contact slurm controller (connect failure)); fix: run the sweep on a SLURM login node where `sinfo` answers"),
    ("run-dir-read-only-mid-run", case_read_only_mid_run,
     "checkpoints/epoch_0002.pt: Read-only file system; fix: make the run folder writable (or choose another with "
     "hydra.run.dir=...) and free disk space; the run's status (failed) could not be recorded: summary.json still "
     "says 'running' (Read-only file system)"),
    ("file-size-limit", case_file_size_limit,
     "checkpoints/epoch_0002.pt: File too large; fix: raise the file-size limit of the shell that runs regbench "
     "(`ulimit -f`, now "),
    ("saved-config-interpolation", case_saved_config_interpolation,
     "/.hydra/config.yaml: data.name: '${oc.env:VAR}' is an interpolation; a saved config holds resolved values, "
     "and regbench evaluates nothing from a run folder"),
    ("folder-file-not-regular", case_folder_file_not_regular,
     "/.hydra/config.yaml is a FIFO, not a regular file; regbench reads only the regular files it wrote into a run "
     "or sweep folder (the run's saved config), never through a link; fix: replace it"),
    ("folder-yaml-unbounded", case_folder_yaml_unbounded,
     "/.hydra/config.yaml is not YAML regbench writes (line 1): an anchor or alias (&name / *name), which "
     "regbench never writes"),
    ("run-dir-special-file", case_run_dir_special_file,
     "/checkpoints/last.pt is not a regular file (a FIFO, device or socket); regbench never reads or "
     "writes such files in a run folder; fix: remove it"),
    ("resume-no-such-folder", lambda t, m, c: run_cli(c, "resume", str(t / "nope")),
     "/nope: no such folder; fix: give the run folder printed as 'run dir:' by the run (regbench resume <run dir>)"),
    # helper (issue 26, item 5): the stacked launcher as a Hydra launcher
    ("stack-foreign-app", case_stacked_foreign_app,
     "hydra/launcher=stacked trains regbench runs; the task function my_app is another app's (a stack trains "
     "regbench's models itself and would never call it); fix: choose another hydra/launcher"),
    # helper (issue 29): the report's statistics
    ("report-bad-metric", lambda t, m, c: case_report_option(t, c, "--metrics", "best_val_loss,best_val_los"),
     "--metrics 'best_val_loss,best_val_los': best_val_los is not a metric of this sweep; expected a "
     "comma-separated list of: best_val_loss, best_val_acc, final_val_loss, final_val_acc, final_gap, "
     "final_gap_trained, min_val_loss_epoch, test_acc, test_nll, test_ece"),
    ("report-bad-baseline", lambda t, m, c: case_report_option(t, c, "--baseline", "regularizer=[l3]"),
     "--baseline 'regularizer=[l3]': no such configuration in this sweep; expected one of: regularizer=[], "
     "regularizer=[l2]"),
    # helper (issue 28, item 5): sam
    ("sam-amp", ["regularizer=[sam]", "trainer.amp=bf16"],
     "trainer.amp='bf16': expected none with regularizer sam (bf16 autocast rounds the weights to 8 significant "
     "bits in the forward"),
    # helper (issue 28, items 1-2): Keras' kernel constraints, activity regularizer
    ("two-constraints", ["regularizer=[non_neg,max_norm]"],
     "regularizer='[max_norm,non_neg]': expected at most one of max_norm, unit_norm, non_neg, min_max_norm (Keras "
     "gives a kernel one kernel_constraint); keep one of them"),
    ("activity-torchvision", ["model=torchvision", "model.weights=null", "regularizer=[activity]"],
     "model='torchvision': expected a model of regbench's own layers with regularizer.activity (mlp, lecture_cnn, "
     "resnet: its activations are torchvision's own modules"),
    # helper (issue 28, item 4): weight averaging
    ("weight-averaging-restore-best", ["regularizer=[early_stopping,weight_averaging]"],
     "regularizer.early_stopping.restore_best_weights=True: expected false with weight_averaging (the validation it "
     "watches is the averaged model's, and it would restore the trained model's weights, not the average's)"),
    ("weight-averaging-ensemble", ["regularizer=[ensemble,weight_averaging]"],
     "regularizer='[ensemble,weight_averaging]': expected ensemble or weight_averaging, not both (ensemble's "
     "snapshots are the trained model's weights, and every evaluation reads the averaged model)"),
    # helper (issue 28, items 3 and 6): Keras' noise layers, DropBlock
    ("alpha-dropout-without-selu", ["regularizer=[alpha_dropout]"],
     "model.activation='relu': expected selu with alpha_dropout in the stack (alpha dropout sets dropped units to "
     "SELU's saturation value and rescales to keep a SELU network's mean 0 and variance 1; with other activations it "
     "is neither); add model.activation=selu model.init=lecun_normal, or use dropout instead of alpha_dropout"),
    ("dropblock-no-conv", ["regularizer=[dropblock]"],
     "regularizer.dropblock.rate=0.1: expected a convolutional model (model=mlp: the MLP has no conv feature maps); "
     "use model=lecture_cnn or resnet, or drop dropblock from the stack"),
    # helper (issue 28, item 6): random erasing runs on the normalised images, after the per-image ops
    ("erasing-before-pixel-ops", ["augmentation.ops=[{op:random_erasing},{op:hflip}]"],
     "augmentation.ops[1]={'op': 'hflip'}: expected the per-image ops before random_erasing (it runs on the "
     "normalised images, after normalisation, as torchvision's references place RandomErasing)"),
    ("search-direction", lambda t, m, c: run_cli(c, "-m", "hydra/sweeper=search", "trainer.monitor=val_acc",
                                                  "regularizer=[l2]", "regularizer.l2.lam=interval(1e-5,1e-2)",
                                                  *TINY, f"hydra.sweep.dir={t}/s"),
     "hydra.sweeper.direction=minimize: the jobs return the best trainer.monitor=val_acc, which is better higher; "
     "fix: hydra.sweeper.direction=maximize"),
    ("search-interval-end", ["-m", "hydra/sweeper=search", "regularizer=[l2]",
                             "regularizer.l2.lam=interval(-1,1e-2)", *TINY],
     "regularizer.l2.lam=-1.0: expected a number >= 0"),
    ("search-log-interval", ["-m", "hydra/sweeper=search", "regularizer=[l2]",
                             "regularizer.l2.lam=tag(log,interval(0,1e-2))", *TINY],
     "regularizer.l2.lam=tag(log,interval(0,1e-2)): a log-scale interval starts above 0 (got 0.0)"),
    ("search-trials", ["-m", "hydra/sweeper=search", "hydra.sweeper.n_jobs=0", "regularizer=[l2]",
                       "regularizer.l2.lam=interval(1e-5,1e-2)", *TINY],
     "hydra.sweeper.n_jobs=0: expected a whole number >= 1 (trials per batch); fix: hydra.sweeper.n_jobs=2"),
    ("search-other-command", lambda t, m, c: case_search_other_command(t, c),
     "its search (0 trials) was started by another command (overrides regularizer.l2.lam=interval(1e-5,1e-2) "
     "regularizer=[l2]; search space (none)), whose trials would be counted for this one"),
]


@pytest.mark.parametrize("row,provoke,expected", CASES, ids=[c[0] for c in CASES])
def test_error_row(row, provoke, expected, tmp_path, monkeypatch, capsys):
    if isinstance(provoke, list):
        msg = run_cli(capsys, *provoke, f"hydra.run.dir={tmp_path}/r")
        assert not (tmp_path / "r").exists()  # refused, or failed before training: no folder left behind
    else:
        msg = provoke(tmp_path, monkeypatch, capsys)
    assert expected in msg, msg
    assert "\n" not in msg


def test_docs_errors_table_lists_every_row():
    text = DOC.read_text()
    rows = re.findall(r"^\| `([a-z0-9-]+)` \|", text, flags=re.M)
    assert rows == [c[0] for c in CASES]
    assert len(rows) >= 20


@pytest.mark.parametrize("flag", [["--help"], ["--cfg", "job"]])
def test_help_and_cfg_check_their_overrides_like_a_run(flag, tmp_path, capsys):
    """They print the config the overrides compose: a typo gets the one-line error, not a traceback; an
    existing run folder is no obstacle (nothing is run or written)."""
    msg = run_cli(capsys, *flag, "trainer.max_epoch=1")
    assert "did you mean trainer.max_epochs?" in msg
    done = completed_run(tmp_path)
    try:  # --help exits 0, --cfg returns
        main([*flag, "model=lecture_cnn", f"hydra.run.dir={done}"])
    except SystemExit as e:
        assert e.code in (0, None)
    assert "name: lecture_cnn" in capsys.readouterr().out
