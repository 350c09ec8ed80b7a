"""A run folder is data, never code: rerun/resume take only regbench's own keys from a saved config, the
generated config cannot be injected through a folder name, Hydra's pickle-based rerun is refused, and the git
provenance call runs with an environment nothing else chose."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from regbench.cli import main
from regbench.cli_saved import saved_config_dir
from regbench.errors import RegbenchError
from regbench.provenance import git_state
from regbench.train import fit
from tests.conftest import TINY, compose_cfg
from tests.conftest import one_line_error as cli_error

KEYS = {"seed", "data", "model", "optimizer", "scheduler", "trainer", "regularizer", "augmentation", "convention"}


def saved_run(folder: Path, status: str = "completed", *extra: str) -> Path:
    """A finished run with the .hydra/config.yaml Hydra would have saved (the task config, unresolved)."""
    cfg = compose_cfg(*TINY, "trainer.max_epochs=2", *extra)
    fit(cfg, folder)
    (folder / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(cfg, folder / ".hydra" / "config.yaml")
    if status != "completed":
        summary = json.loads((folder / "summary.json").read_text())
        summary["status"] = status
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def tamper(run: Path, **nodes) -> None:
    path = run / ".hydra" / "config.yaml"
    cfg = OmegaConf.to_container(OmegaConf.load(path))
    cfg.update(nodes)
    path.write_text(OmegaConf.to_yaml(cfg))


def one_line_error(capsys, argv) -> str:
    return cli_error(capsys, *argv)


@pytest.fixture(scope="module")
def done(tmp_path_factory) -> Path:
    return saved_run(tmp_path_factory.mktemp("untrusted") / "run")


@pytest.mark.parametrize("verb", ["rerun", "resume"])
def test_a_hydra_node_in_a_saved_config_is_refused_and_nothing_of_it_runs(verb, done, tmp_path, capsys):
    """Callbacks are instantiated, logging's dictConfig calls '()' factories, env_set changes the environment
    (git's included), the launcher and search path decide what runs: none of it may come from a folder."""
    run = tmp_path / "run"
    run.mkdir()
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text((done / ".hydra" / "config.yaml").read_text())
    hostile = {
        "job": {"env_set": {"REGBENCH_PWNED": "1", "GIT_CONFIG_COUNT": "1"}},
        "callbacks": {"evil": {"_target_": "os.makedirs", "name": str(tmp_path / "pwned_callback")}},
        "job_logging": {"version": 1, "handlers": {"h": {"()": "os.makedirs", "name": str(tmp_path / "pwned_log")}},
                        "root": {"handlers": ["h"]}},
        "searchpath": [f"file://{tmp_path}/evil_configs"],
        "launcher": {"_target_": "os.makedirs", "name": str(tmp_path / "pwned_launcher")},
    }
    tamper(run, hydra=hostile)
    msg = one_line_error(capsys, [verb, str(run), f"hydra.run.dir={tmp_path}/again"])
    assert "config.yaml: key 'hydra' is not part of a regbench config" in msg
    assert not any(tmp_path.glob("pwned*")) and "REGBENCH_PWNED" not in os.environ
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("nodes,expected", [
    ({"defaults": ["/hydra/launcher: basic"]}, "key 'defaults' is not part of a regbench config"),
    ({"paths": {"root": "/tmp"}}, "key 'paths' is not part of a regbench config"),
    ({"model": {"name": "mlp@hydra", "hidden": [8]}}, "model is not a regbench model config (name 'mlp@hydra'"),
    ({"regularizer": {"dropout\n- hydra/launcher: basic": {}}}, "regularizer must map regbench's members"),
    ({"model": {"name": "mlp", "hidden": [8], "_target_": "os.system"}}, "model._target_: no such key"),
])
def test_only_regbench_keys_and_schema_names_are_taken_from_a_saved_config(nodes, expected, done, tmp_path,
                                                                            capsys):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text((done / ".hydra" / "config.yaml").read_text())
    tamper(run, **nodes)
    assert expected in one_line_error(capsys, ["rerun", str(run), f"hydra.run.dir={tmp_path}/again"])
    assert not (tmp_path / "again").exists()


def test_each_saved_option_is_typed_by_the_schema_its_registration_names(done, tmp_path):
    """rerun learns from the tables which schema types a saved group: adamw's node by the adam schema, a
    torchvision dataset's by the torchvision one; every registered option of every table."""
    from regbench import registry

    saved = OmegaConf.load(done / ".hydra" / "config.yaml")
    for group, table in registry.GROUPS.items():
        for name in table:
            run = tmp_path / f"{group}-{name}"
            (run / ".hydra").mkdir(parents=True)
            OmegaConf.save(OmegaConf.merge(saved, {group: compose_cfg(f"{group}={name}")[group]}),
                           run / ".hydra" / "config.yaml", resolve=False)
            defaults = OmegaConf.load(saved_config_dir(run) / "rerun.yaml").defaults
            assert f"/schema/{group}/{table[name].schema_name}@{group}" in defaults, (group, name)


def test_a_yaml_error_in_a_saved_config_names_file_and_line(done, tmp_path, capsys):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("seed: 0\nmodel:\n  hidden: [8, 16\n")
    msg = one_line_error(capsys, ["rerun", str(run)])
    assert f"{run}/.hydra/config.yaml, line 4, column 1: YAML syntax error: while parsing a flow sequence" in msg


def test_a_folder_name_with_a_newline_stays_a_comment_and_the_rerun_works(done, tmp_path):
    run = tmp_path / "evil\nhydra: {job: {env_set: {REGBENCH_PWNED: '1'}}}\nx"
    run.mkdir()
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text((done / ".hydra" / "config.yaml").read_text())
    generated = OmegaConf.load(saved_config_dir(run) / "rerun.yaml")
    assert set(generated) == KEYS | {"defaults"}
    main(["rerun", str(run), f"hydra.run.dir={tmp_path}/again"])
    assert json.loads((tmp_path / "again" / "summary.json").read_text())["status"] == "completed"
    assert "REGBENCH_PWNED" not in os.environ


def test_resume_takes_a_folder_name_with_quotes_commas_and_a_newline_verbatim(tmp_path):
    """The folder goes to Hydra as a quoted value: a comma is no sweep, a quote no syntax."""
    run = saved_run(tmp_path / "it's, a\nrun", "interrupted")
    main(["resume", str(run)])
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    assert sorted(p.name for p in tmp_path.iterdir()) == [run.name]  # no other folder was made


def test_experimental_rerun_is_refused_without_unpickling(tmp_path, capsys):
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.makedirs, (str(tmp_path / "pwned"),))

    (tmp_path / "config.pickle").write_bytes(pickle.dumps(Payload()))
    msg = one_line_error(capsys, ["--experimental-rerun", str(tmp_path / "config.pickle")])
    assert "regbench rerun <run dir>" in msg and not (tmp_path / "pwned").exists()


def test_git_provenance_ignores_git_variables_from_the_environment(tmp_path, monkeypatch):
    """hydra.job.env_set (or a shell) could set GIT_DIR or inject config (core.fsmonitor runs a command)."""
    clean = git_state()
    marker = tmp_path / "pwned"
    monkeypatch.setenv("GIT_CONFIG_COUNT", "1")
    monkeypatch.setenv("GIT_CONFIG_KEY_0", "core.fsmonitor")
    monkeypatch.setenv("GIT_CONFIG_VALUE_0", f"touch {marker}; false")
    monkeypatch.setenv("GIT_DIR", str(tmp_path))
    assert git_state() == clean
    assert not marker.exists()


def test_saved_config_dir_needs_a_run_folder(tmp_path):
    with pytest.raises(RegbenchError, match="not a regbench run folder"):
        saved_config_dir(tmp_path)
