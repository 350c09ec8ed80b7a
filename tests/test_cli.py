"""End to end through real processes: the console script, ``python -m regbench``, multirun, an installed wheel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def run(args, cwd, env=None, check=True):
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_console_script_single_run(tmp_path):
    proc = run([str(BIN / "regbench"), *TINY], cwd=tmp_path)
    runs = list((tmp_path / "outputs" / "runs").glob("*/*"))
    assert len(runs) == 1
    run_dir = runs[0]
    assert {p.name for p in run_dir.iterdir()} >= {".hydra", "tb", "metrics.csv", "summary.json", "checkpoints",
                                                   "regbench.log"}
    assert {p.name for p in (run_dir / ".hydra").iterdir()} == {"config.yaml", "hydra.yaml", "overrides.yaml"}
    assert f"run dir: {run_dir.resolve()}" in proc.stdout
    assert f"tensorboard --logdir {run_dir.resolve()}" in proc.stdout
    assert "epoch 1/1" in (run_dir / "regbench.log").read_text()
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


def test_python_dash_m_and_exit_status(tmp_path):
    run([sys.executable, "-m", "regbench", *TINY, f"hydra.run.dir={tmp_path}/r"], cwd=tmp_path)
    assert (tmp_path / "r" / "summary.json").exists()
    bad = run([sys.executable, "-m", "regbench", "trainer.max_epoch=1"], cwd=tmp_path, check=False)
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("regbench: error: trainer.max_epoch: no such key (valid keys here: max_epochs, ")
    assert lines[0].endswith("did you mean trainer.max_epochs?")


def test_help_lists_subcommands_and_the_selectable_groups_only(tmp_path):
    out = run([str(BIN / "regbench"), "--help", "model=lecture_cnn"], cwd=tmp_path).stdout
    for verb in ("rerun <run dir>", "resume <run dir>", "report <sweep dir>", "-m sweep=<study>"):
        assert verb in out
    groups = [line.split(":")[0] for line in out.split("== Configuration groups ==")[1].split("== Config ==")[0]
              .splitlines()[2:] if ": " in line]
    expected = sorted(p.name for p in (REPO / "configs").iterdir() if p.is_dir() and p.name != "hydra")
    assert groups == expected  # the schemas the YAMLs extend (schema/...) are not listed
    assert "name: lecture_cnn" in out  # the composed config, with the overrides applied
    assert not (tmp_path / "outputs").exists()  # --help runs nothing


def test_multirun_names_runs_after_their_overrides(tmp_path):
    sweep = tmp_path / "sweep"
    run([str(BIN / "regbench"), "-m", "optimizer=sgd,adam", "seed=0,1", *TINY, f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path)
    dirs = sorted(str(p.relative_to(sweep)) for p in sweep.glob("*/seed=*"))
    # named by the overrides that differ between the jobs (not the shared data.* / trainer.*), seeds below
    assert dirs == [f"optimizer={o}/seed={s}" for o in ("adam", "sgd") for s in (0, 1)]
    for d in dirs:
        summary = json.loads((sweep / d / "summary.json").read_text())
        assert summary["status"] == "completed" and f"seed={summary['seed']}" in d


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_installed_wheel_runs_from_any_folder(tmp_path):
    wheels = tmp_path / "wheels"
    # Built from a copy of the source without build outputs: setuptools' build/ folder would otherwise carry
    # files into the wheel that pyproject.toml no longer selects (a stale build/ hid the launcher configs).
    source = tmp_path / "source"
    top = {".git", ".venv", "build", "dist", "outputs", "data", ".pytest_cache"}
    shutil.copytree(REPO, source, symlinks=True, ignore=lambda folder, names: [
        n for n in names if (Path(folder) == REPO and n in top) or n == "__pycache__" or n.endswith(".egg-info")])
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
         str(source)], cwd=tmp_path)
    wheel = next(wheels.glob("regbench-*.whl"))
    target = tmp_path / "site"
    run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        cwd=tmp_path)
    # The installed config tree is the repository's, file for file (names at every depth, and contents).
    installed = _tree(target / "regbench" / "configs")
    assert sorted(installed) == sorted(_tree(REPO / "configs"))
    assert "hydra/launcher/slurm.yaml" in installed  # three folders down: the glob must recurse
    for rel, data in _tree(REPO / "configs").items():
        assert installed[rel] == data, rel
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # Only the installed copy is importable: no src/ on the path, and the repo is not the working folder.
    env = {"PYTHONPATH": str(target), "PYTHONNOUSERSITE": "1"}
    code = ("import regbench, sys; assert regbench.__file__.startswith(sys.argv[1]), regbench.__file__; "
            "from regbench.cli import main; sys.argv[0] = 'regbench'; main(sys.argv[2:])")
    proc = run([sys.executable, "-c", code, str(target), *TINY], cwd=elsewhere, env=env)
    assert "run dir:" in proc.stdout
    assert len(list((elsewhere / "outputs" / "runs").glob("*/*/summary.json"))) == 1
    script = target / "bin" / "regbench"
    assert script.exists()
    shutil.rmtree(elsewhere / "outputs")
    run([str(script), *TINY], cwd=elsewhere, env=env)
    assert len(list((elsewhere / "outputs" / "runs").glob("*/*/summary.json"))) == 1
