"""One test per row of docs/errors.md: every bad input and fault gives the documented one-line message."""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.error import URLError

import pytest
import torch

from regbench.cli import main
from regbench.train import fit
from tests.conftest import REPO, TINY, compose_cfg, make_cifar

DOC = REPO / "docs" / "errors.md"


def run_cli(capsys, *argv) -> str:
    """Run the command in-process; return its one stderr line (asserting exit status 2 and a single line)."""
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("regbench: error: "), err
    return err.strip()


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


# (row id, how to provoke it, text the message contains). Rows given as a list are plain command lines.
CASES = [
    ("typo-key", ["trainer.max_epoch=3"], "trainer.max_epoch: no such key (valid keys here: max_epochs,"),
    ("typo-top-key", ["sed=1"], "sed: no such key (valid keys here: seed, data, model"),
    ("wrong-type", ["trainer.max_epochs=ten"], "trainer.max_epochs: Value 'ten' of type 'str' could not be converted to Integer"),
    ("unknown-option", ["model=resnet"], "model=resnet: no such option in config group 'model'; available: lecture_cnn, mlp, torchvision"),
    ("bad-syntax", ["model.hidden=[1,2"], "cannot parse override: no viable alternative at input '[1,2'"),
    ("lr-range", ["optimizer.lr=0"], "optimizer.lr=0.0: expected a number > 0"),
    ("batch-range", ["data.batch_size=0"], "data.batch_size=0: expected an integer >= 1"),
    ("val-fraction-range", ["data.val_fraction=1.5"], "data.val_fraction=1.5: expected a number in (0, 1)"),
    ("train-size-range", ["data.train_size=3601"], "data.train_size=3601: expected at most 3600"),
    ("sweep-without-m", ["optimizer=sgd,adam"], "optimizer=sgd,adam: a sweep (several values) needs multirun; fix: add -m"),
    ("member-not-in-stack", ["regularizer.dropout.rate=0.3"], "regularizer.dropout: dropout is not in the regularizer stack"),
    ("unknown-member", ["regularizer=[dropuot]"], "regularizer=dropuot: no such option in config group 'regularizer'"),
    ("member-cannot-apply", ["regularizer=[dropout]", "regularizer.dropout.spatial=0.2"],
     "regularizer.dropout.spatial=0.2: expected 0 with model=mlp"),
    ("mc-dropout-without-dropout", ["regularizer=[mc_dropout]"], "expected dropout in the model for mc_dropout"),
    ("two-decay-sources", ["optimizer=adamw", "regularizer=[weight_decay]"],
     "optimizer.weight_decay=0.01: expected 0 when regularizer weight_decay is in the stack"),
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
    ("torchvision-normalize", ["model=torchvision", "model.download=true"],
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
    ("sweep-same-folder", lambda t, m, c: run_cli(c, "-m", "regularizer=[l2,dropout],[dropout,l2]",
                                                   f"hydra.sweep.dir={t}/s"),
     "two jobs of this sweep map to one folder, regularizer=[l2,dropout]/seed=0: regularizer=[l2,dropout] and "
     "regularizer=[dropout,l2] are the same run"),
    ("sweep-earlier-folder", case_sweep_earlier_folder,
     "regularizer=[]/seed=0: holds a job of an earlier command with other overrides (optimizer.lr=0.1; now: "
     "optimizer.lr=0.01); this sweep would skip it as its own; fix: choose another hydra.sweep.dir=..."),
    ("sweep-dataset-missing", case_sweep_dataset_missing,
     "data=mnist: dataset files missing or corrupt in"),
]


@pytest.mark.parametrize("row,provoke,expected", CASES, ids=[c[0] for c in CASES])
def test_error_row(row, provoke, expected, tmp_path, monkeypatch, capsys):
    if isinstance(provoke, list):
        msg = run_cli(capsys, *provoke, f"hydra.run.dir={tmp_path}/r")
        assert not (tmp_path / "r" / "summary.json").exists()
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
