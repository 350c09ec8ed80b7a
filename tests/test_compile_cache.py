"""torch.compile's cache (issue 25, item 1): set before torch is imported, a folder of the user's own (0700), and a
folder another user owns or can write is refused (one warning, an eager run) — the user's own
TORCHINDUCTOR_CACHE_DIR included. A failing C++ compiler and a missing home folder also fall back to eager."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from regbench import accel, compile_cache
from regbench.compile_cache import ENV, MARK
from regbench.train import fit
from tests.conftest import REPO, TINY, compose_cfg

ROOT = os.geteuid() == 0


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def _compiled(tmp_path: Path, name: str) -> dict:
    fit(compose_cfg(*TINY, "trainer.compile=model", "trainer.fused=false"), tmp_path / name)
    return _summary(tmp_path / name)


def _mine(monkeypatch, folder: Path) -> None:
    monkeypatch.setenv(ENV, str(folder))
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)


# ------------------------------------------------------------------------------------------- set_env


def test_import_sets_the_cache_before_torch_and_makes_it_private(tmp_path):
    """A fresh interpreter: `import regbench` alone sets the variable, before torch is imported; the folder is
    created 0700; torch._dynamo's import then keeps it (it would otherwise pick <tempdir>/torchinductor_<user>)."""
    env = {k: v for k, v in os.environ.items() if k not in (ENV, MARK, "XDG_CACHE_HOME")}
    env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), TMPDIR=str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    code = ("import os, sys, regbench; assert 'torch' not in sys.modules; before = os.environ['%s']; "
            "import torch._dynamo; print(before, os.environ['%s'])" % (ENV, ENV))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    folder = tmp_path / "xdg" / "regbench" / "inductor"
    assert out.stdout.split() == [str(folder)] * 2
    assert folder.stat().st_mode & 0o777 == 0o700
    assert not list((tmp_path / "tmp").glob("torchinductor_*"))


def test_import_keeps_the_users_own_folder(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV, str(tmp_path / "mine"))
    monkeypatch.delenv(MARK, raising=False)
    compile_cache.set_env()
    assert os.environ[ENV] == str(tmp_path / "mine") and not (tmp_path / "mine").exists()  # checked when compiling


def test_without_a_home_import_uses_a_private_temporary_folder(monkeypatch, tmp_path):
    """No usable home: not <tempdir>/torchinductor_<user> but a fresh 0700 folder (removed at exit)."""
    for name in (ENV, MARK, "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "nonexistent"))
    monkeypatch.setattr(compile_cache.tempfile, "tempdir", str(tmp_path))
    compile_cache.set_env()
    folder = Path(os.environ[ENV])
    assert folder.parent == tmp_path and folder.name.startswith("regbench-nocache-")
    assert folder.stat().st_mode & 0o777 == 0o700 and not (tmp_path / "nonexistent").exists()
    assert compile_cache.folder() == (None, compile_cache.NO_HOME)  # nothing is compiled into it


# -------------------------------------------------------------------------------------------- checks


def test_a_folder_others_can_write_is_refused(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    _mine(monkeypatch, shared)
    where, reason = compile_cache.folder()
    assert where is None and "is writable by other users (mode 777)" in reason
    assert "fix: remove it, or set TORCHINDUCTOR_CACHE_DIR to a folder of yours" in reason


def test_a_folder_inside_a_folder_others_can_write_is_refused(tmp_path, monkeypatch):
    (tmp_path / "open").mkdir()
    (tmp_path / "open").chmod(0o777)  # not sticky: anyone may rename the cache away and put theirs in its place
    _mine(monkeypatch, tmp_path / "open" / "cache")
    where, reason = compile_cache.folder()
    assert where is None and f"lies in {tmp_path / 'open'}, which another user can write" in reason


def test_a_file_is_not_a_cache_folder(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    _mine(monkeypatch, tmp_path / "file")
    assert "cannot be created" in compile_cache.folder()[1]


def test_triton_cache_folder_is_checked_too(tmp_path, monkeypatch):
    _mine(monkeypatch, tmp_path / "ok")
    (tmp_path / "triton").mkdir()
    (tmp_path / "triton").chmod(0o757)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    assert "TRITON_CACHE_DIR to a folder of yours" in compile_cache.folder()[1]


@pytest.mark.skipif(not ROOT, reason="making a folder someone else's needs root")
def test_a_pre_created_temp_cache_of_another_user_is_refused_and_run_eagerly(tmp_path, monkeypatch, caplog):
    """The attack of issue 25: another user creates the cache folder first (here given as the user's own
    TORCHINDUCTOR_CACHE_DIR, as torch's default was). The run warns once and trains eagerly; nothing is read."""
    planted = tmp_path / "torchinductor_victim"
    planted.mkdir(mode=0o700)
    os.chown(planted, 4242, 4242)
    _mine(monkeypatch, planted)
    s = _compiled(tmp_path, "r")
    msg = (f"trainer.compile=model falls back to eager: the compile cache {planted} is owned by user "
           "uid 4242, not you")
    assert s["compile"] == "none" and s["status"] == "completed"
    assert sum(w.startswith(msg) for w in s["warnings"]) == 1, s["warnings"]
    assert sum(msg in r.getMessage() for r in caplog.records) == 1
    assert list(planted.iterdir()) == []


def test_an_accepted_folder_is_made_private(tmp_path, monkeypatch):
    (tmp_path / "c").mkdir(mode=0o755)
    _mine(monkeypatch, tmp_path / "c")
    assert compile_cache.folder() == (tmp_path / "c", None)
    assert (tmp_path / "c").stat().st_mode & 0o777 == 0o700


# ----------------------------------------------------------------------------------- eager fallbacks


def test_no_home_falls_back_to_eager_with_one_warning(tmp_path, monkeypatch):
    """README: without a place for the cache, one warning line and an eager run (it was a traceback)."""
    for name in (ENV, MARK):  # regbench's default (ENV == MARK), which follows HOME / XDG_CACHE_HOME
        monkeypatch.setenv(name, str(tmp_path / "default"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", "/nonexistent")
    s = _compiled(tmp_path, "r")
    assert s["compile"] == "none" and s["status"] == "completed"
    assert s["warnings"] == [f"trainer.compile=model falls back to eager: {compile_cache.NO_HOME}"]


def test_a_failing_cxx_falls_back_to_eager_with_one_warning(tmp_path, monkeypatch):
    """A compiler that exists but fails (CXX pointing at a script that exits 1): one line, an eager run."""
    cxx = tmp_path / "bin" / "broken-g++"
    cxx.parent.mkdir()
    cxx.write_text("#!/bin/sh\nexit 1\n")
    cxx.chmod(0o755)
    monkeypatch.setenv("CXX", str(cxx))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    s = _compiled(tmp_path, "r")
    assert s["compile"] == "none" and s["status"] == "completed"
    assert s["warnings"] == [f"trainer.compile=model falls back to eager: the C++ compiler {cxx} does not work "
                             "(`--version`: exit status 1); fix: repair it, or set CXX to a working one (g++ or clang)"]


def test_a_compiler_that_cannot_build_a_library_is_refused(tmp_path):
    cxx = tmp_path / "half-g++"
    cxx.write_text('#!/bin/sh\n[ "$1" = --version ] && exit 0\necho "cc1plus: fatal error: no headers" >&2\nexit 4\n')
    cxx.chmod(0o755)
    reason = accel._cxx_fails(str(cxx))
    assert reason.startswith(f"the C++ compiler {cxx} does not work (`-shared`: cc1plus: fatal error: no headers)")


# -------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_a_plain_run_creates_no_shared_temp_cache(tmp_path):
    """`regbench` (no compile) in a fresh process: no <tempdir>/torchinductor_* appears (torch._dynamo's import
    made one on every run); the cache folder is the user's, 0700."""
    env = {k: v for k, v in os.environ.items() if k not in (ENV, MARK)}
    env.update(TMPDIR=str(tmp_path / "tmp"), XDG_CACHE_HOME=str(tmp_path / "xdg"))
    (tmp_path / "tmp").mkdir()
    out = subprocess.run([sys.executable, "-m", "regbench", *TINY, f"hydra.run.dir={tmp_path / 'r'}"], env=env,
                         capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert not list((tmp_path / "tmp").glob("torchinductor_*"))
    assert (tmp_path / "xdg" / "regbench" / "inductor").stat().st_mode & 0o777 == 0o700


def test_a_link_on_the_way_owned_by_another_user_is_refused(tmp_path, monkeypatch):
    """The folder torch opens is the path as given: a symbolic link on it that another user owns (who can point it
    at a folder of theirs after the check) is refused, even when it points at a private folder of yours now."""
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "cache").symlink_to(mine)
    os.chown(theirs, 4242, 4242)
    os.lchown(theirs / "cache", 4242, 4242)
    _mine(monkeypatch, theirs / "cache")
    where, reason = compile_cache.folder()
    assert where is None and f"passes through {theirs / 'cache'}, a symbolic link owned by user" in reason


def test_torch_s_own_default_set_by_an_earlier_import_is_not_the_users_choice(tmp_path):
    """`import torchvision` (or torch._dynamo) before regbench sets the variable to <tempdir>/torchinductor_<user>:
    regbench still points it at the user's own folder (that value is torch's default, not a choice)."""
    env = {k: v for k, v in os.environ.items() if k not in (ENV, MARK, "XDG_CACHE_HOME")}
    env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), TMPDIR=str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    code = ("import os, torch._dynamo; before = os.environ['%s']; import regbench; from regbench import compile_cache; "
            "print(before, compile_cache.folder()[0])" % ENV)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    before, after = out.stdout.split()
    assert before == compile_cache.torch_default().replace(os.path.dirname(compile_cache.torch_default()),
                                                           str(tmp_path / "tmp"))
    assert after == str(tmp_path / "xdg" / "regbench" / "inductor")


@pytest.mark.slow
def test_a_compiler_that_refuses_inductor_s_flags_falls_back_to_eager(tmp_path):
    """A compiler that passes `--version` and builds a plain library but refuses inductor's own flags (-O3,
    -march=native, -fopenmp: clang without OpenMP) ended the run at its first step with an 89-line traceback. A
    fresh process and cache folder: inductor would otherwise reuse kernels it built before with a working g++."""
    cxx = tmp_path / "bin" / "picky-g++"
    cxx.parent.mkdir()
    cxx.write_text('#!/bin/sh\nfor a in "$@"; do case "$a" in -O3|-march=*|-fopenmp) echo "picky: no $a" >&2; '
                   'exit 1;; esac; done\nexec g++ "$@"\n')
    cxx.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in (ENV, MARK)}
    env.update(CXX=str(cxx), XDG_CACHE_HOME=str(tmp_path / "cache"))
    run = tmp_path / "r"
    out = subprocess.run([sys.executable, "-m", "regbench", *TINY, "trainer.compile=model", f"hydra.run.dir={run}"],
                         env=env, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    s = _summary(run)
    assert s["compile"] == "none" and s["status"] == "completed"
    assert len(s["warnings"]) == 1 and s["warnings"][0].startswith(
        f"trainer.compile=model falls back to eager: inductor could not build a kernel with {cxx}"), s["warnings"]
