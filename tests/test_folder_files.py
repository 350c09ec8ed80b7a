"""A run or sweep folder is data (issue 25, items 3 and 4): every file regbench reads from one is a regular file,
not followed through a link, never blocking on a FIFO, within a size bound; YAML without anchors or deep
nesting; a saved config with an interpolation is refused in one line, before anything runs or is written."""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from regbench.cli_saved import saved_config_dir
from regbench.errors import RegbenchError
from regbench.io import (JSON_LIMIT, YAML_LIMIT, FolderFileError, load_folder_yaml, open_append, read_folder_text,
                         read_json)
from regbench.rundir import refuse_links
from tests.conftest import TINY, compose_cfg, one_line_error


@contextmanager
def within(seconds: int):
    """Fail (instead of hanging the suite) when the body blocks, e.g. on a FIFO."""
    def hung(*_):
        raise AssertionError(f"blocked for more than {seconds} s")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def special_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    os.mkfifo(folder / "fifo")
    (folder / "zero").symlink_to("/dev/zero")
    (folder / "big").write_bytes(b" " * (JSON_LIMIT + 1))
    (folder / "dir").mkdir()
    return {name: folder / name for name in ("fifo", "zero", "big", "dir")}


@pytest.mark.parametrize("name,why", [("fifo", "is a FIFO, not a regular file"),
                                      ("zero", "is a symbolic link, not a regular file"),
                                      ("big", f"is {JSON_LIMIT + 1:,} bytes, more than regbench writes there"),
                                      ("dir", "is a folder, not a regular file")])
def test_special_files_are_refused_in_one_line_without_blocking(tmp_path, name, why):
    path = special_files(tmp_path)[name]
    with within(10), pytest.raises(FolderFileError) as e:
        read_json(path)
    assert str(e.value).startswith(f"{path} {why}") and "\n" not in str(e.value)
    assert isinstance(e.value, ValueError)  # readers that treat a malformed record as unusable treat it so


def test_a_folder_between_root_and_the_file_may_not_be_a_link(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "summary.json").write_text("{}")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".hydra").symlink_to(tmp_path / "elsewhere")
    assert read_json(tmp_path / "elsewhere" / "summary.json") == {}
    with pytest.raises(FolderFileError, match=r"run/\.hydra is a symbolic link"):
        read_folder_text(tmp_path / "run" / ".hydra" / "summary.json", 100, "x", root=tmp_path / "run")


@pytest.mark.parametrize("text,why", [
    ("a: &x [1, 2]\nb: *x\n", "an anchor or alias"),
    # the billion laughs: nine levels of ten aliases each would be 10**9 strings
    ("a: &a [lol, lol]\n" + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n"
                                    for i in range(9)), "an anchor or alias"),
    ("[" * 200 + "]" * 200 + "\n", "nested more than 32 levels deep"),
    ("x: 1\nx: 2\n", "the key 'x' twice"),
    ("x: [1, 2\n", "expected ',' or ']'"),
])
def test_the_yaml_loader_is_bounded(tmp_path, text, why):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with within(10), pytest.raises(FolderFileError, match=why):
        load_folder_yaml(path, "a saved config")
    path.write_text(OmegaConf.to_yaml(compose_cfg(*TINY)))  # what regbench writes loads
    assert load_folder_yaml(path, "a saved config")["trainer"]["max_epochs"] == 1
    path.write_text("x: " + "a" * YAML_LIMIT)
    with pytest.raises(FolderFileError, match="more than regbench writes there"):
        load_folder_yaml(path, "a saved config")


def test_nothing_is_appended_to_a_fifo(tmp_path):
    os.mkfifo(tmp_path / "metrics.csv")
    with within(10), pytest.raises(FolderFileError, match="is a FIFO, not a regular file"):
        open_append(tmp_path / "metrics.csv")


@pytest.mark.parametrize("where", ["checkpoints/last.pt", "tb/events.out", ".hydra/config.yaml",
                                   "attempts/1/summary.json", "metrics.csv"])
@pytest.mark.parametrize("kind", ["link", "fifo"])
def test_a_run_folder_with_a_link_or_special_file_inside_is_refused(tmp_path, where, kind):
    run = tmp_path / "run"
    path = run / where
    path.parent.mkdir(parents=True)
    if kind == "link":
        (tmp_path / "target").write_text("x")
        path.symlink_to(tmp_path / "target")
    else:
        os.mkfifo(path)
    with pytest.raises(RegbenchError, match="is a symbolic link" if kind == "link" else "is not a regular file"):
        refuse_links(run)


def test_a_linked_subfolder_of_a_run_is_refused(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(RegbenchError, match=r"run/checkpoints is a symbolic link; regbench never writes through"):
        refuse_links(tmp_path / "run")


# ------------------------------------------------------------------------- saved configs: data, not code


def saved_run(tmp_path: Path, edit=None, *overrides: str) -> Path:
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    cfg = OmegaConf.to_container(compose_cfg(*TINY, *overrides))
    if edit:
        edit(cfg)
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    return run


def _set(path: str, value):
    def edit(cfg):
        node = cfg
        *parents, last = path.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return edit


@pytest.mark.parametrize("key,value", [
    ("data.name", "${oc.env:REGBENCH_SECRET}"),         # would copy the re-running user's environment
    ("trainer.max_epochs", "${oc.env:REGBENCH_SECRET,3}"),
    ("optimizer.name", "${no_such_resolver:x}"),        # an unknown resolver: a traceback before
    ("seed", "${seed}"),                                # a self-reference: a traceback before
    ("trainer.max_epochs", "${data.name}"),            # a type mismatch: a traceback before
    ("trainer.device", "cu${convention}"),             # a string interpolation
    ("data.name", "${trainer}"),                        # a reference to a node
    ("data.name", "${.name}"),                           # a relative reference
])
@pytest.mark.parametrize("verb", ["rerun", "resume"])
def test_a_saved_config_with_an_interpolation_is_refused_in_one_line(tmp_path, monkeypatch, capsys, key, value,
                                                                      verb):
    monkeypatch.setenv("REGBENCH_SECRET", "mnist5k")
    run = saved_run(tmp_path, _set(key, value))
    before = sorted(p.name for p in run.rglob("*"))
    msg = one_line_error(capsys, verb, str(run))
    assert f"{run}/.hydra/config.yaml: {key}: " in msg and "is an interpolation; a saved config holds resolved " \
                                                           "values" in msg, msg
    assert sorted(p.name for p in run.rglob("*")) == before


def test_the_reference_regbench_writes_itself_is_read(tmp_path):
    """Hydra saves the composed config unresolved: batchnorm's ``convention: ${convention}`` (nothing else in
    regbench's configs) is kept as a reference to the root key's plain value, evaluated by no resolver."""
    run = saved_run(tmp_path, None, "regularizer=[batchnorm]")
    assert "convention: ${convention}" in (run / ".hydra" / "config.yaml").read_text()
    rerun = (saved_config_dir(run) / "rerun.yaml").read_text()
    assert "convention: ${convention}" in rerun
    # ... but a reference to a root key that is itself an interpolation (a cycle, a resolver) is refused
    # the defaults of regbench's schemas, as the schema has them (data.root's REGBENCH_DATA...), at their own key
    run3 = saved_run(tmp_path / "3", None, "data=mnist")
    assert "root: ${oc.env:REGBENCH_DATA,data}" in (run3 / ".hydra" / "config.yaml").read_text()
    assert "root: ${oc.env:REGBENCH_DATA,data}" in (saved_config_dir(run3) / "rerun.yaml").read_text()
    for key, value in [("data.root", "${oc.env:HOME}"), ("data.name", "${oc.env:REGBENCH_DATA,data}")]:
        with pytest.raises(RegbenchError, match=f"{key}: .* is an interpolation"):
            saved_config_dir(saved_run(tmp_path / key, _set(key, value), "data=mnist"))
    run2 = saved_run(tmp_path / "2", _set("convention", "${oc.env:HOME}"), "regularizer=[batchnorm]")
    with pytest.raises(RegbenchError, match=r"convention: '\$\{(oc.env:HOME|convention)\}' is an interpolation"):
        saved_config_dir(run2)


@pytest.mark.parametrize("name", ["fifo", "zero", "big"])
def test_a_special_saved_config_or_summary_is_one_line(tmp_path, capsys, name):
    run = saved_run(tmp_path)
    files = special_files(tmp_path / "specials")
    (run / ".hydra" / "config.yaml").unlink()
    os.replace(files[name], run / ".hydra" / "config.yaml")
    with within(20):
        msg = one_line_error(capsys, "rerun", str(run))
    assert f"{run}/.hydra/config.yaml is " in msg and "regbench reads only the regular files it wrote" in msg
    run2 = saved_run(tmp_path / "2")
    os.replace(special_files(tmp_path / "specials2")[name], run2 / "summary.json")
    with within(20):
        msg = one_line_error(capsys, "resume", str(run2))
    assert f"{run2}/summary.json is " in msg


def test_resume_of_a_folder_that_does_not_exist_says_so(tmp_path, capsys):
    msg = one_line_error(capsys, "resume", str(tmp_path / "nope"))
    assert msg == (f"regbench: error: {tmp_path}/nope: no such folder; fix: give the run folder printed as "
                   "'run dir:' by the run (regbench resume <run dir>)")
    (tmp_path / "file").write_text("x")
    assert "file: not a folder" in one_line_error(capsys, "rerun", str(tmp_path / "file"))


def test_appending_never_changes_a_hard_linked_copys_original(tmp_path):
    """A log opened for append that has other hard links (a run folder copied with `cp -al`, a planted link to a
    file elsewhere) is replaced by a copy of its own first: the other name keeps its bytes."""
    original, copy = tmp_path / "orig.log", tmp_path / "copy.log"
    original.write_text("one\n")
    os.link(original, copy)
    with open_append(copy) as f:
        f.write("two\n")
    assert original.read_text() == "one\n" and copy.read_text() == "one\ntwo\n"
    assert os.stat(original).st_nlink == os.stat(copy).st_nlink == 1


def test_resuming_a_cp_al_copy_leaves_the_original_run_byte_identical(tmp_path):
    """`regbench resume` of a copy made with `cp -al` appends to its regbench.log: the original's stays as it was."""
    import json
    import subprocess

    from regbench.cli import main

    run = tmp_path / "run"
    main([*TINY, "trainer.max_epochs=2", f"hydra.run.dir={run}"])
    summary = json.loads((run / "summary.json").read_text())
    summary["status"] = "failed"
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "checkpoints" / "epoch_0002.pt").unlink()
    subprocess.run(["cp", "-al", str(run), str(tmp_path / "copy")], check=True)  # every file hard-linked
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert (run / "regbench.log").stat().st_nlink == 2
    main(["resume", str(tmp_path / "copy")])
    assert json.loads((tmp_path / "copy" / "summary.json").read_text())["status"] == "completed"
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("name", ["fifo", "zero", "dir"])
def test_metrics_csv_is_read_as_a_bounded_regular_file(tmp_path, name):
    """metrics.csv (read back on resume, by report and by bagging) gets the same refusals as the other records."""
    from regbench.logs import read_metrics

    path = special_files(tmp_path)[name]
    with within(10), pytest.raises(FolderFileError) as e:
        read_metrics(path)
    assert "\n" not in str(e.value)
