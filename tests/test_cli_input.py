"""The command line in-process: --config-dir as Hydra documents it, `+key` typos, `~` in path keys, -m --cfg."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from regbench.cli import main
from tests.conftest import TINY, one_line_error


def show(capsys, *argv) -> str:
    """stdout of ``regbench --cfg job ...`` (Hydra returns, or exits 0)."""
    try:
        main(["--cfg", "job", *argv])
    except SystemExit as e:
        assert e.code in (0, None)
    return capsys.readouterr().out


@pytest.fixture
def user_configs(tmp_path) -> Path:
    """A folder of the user's own configs, apart from regbench's: one experiment."""
    folder = tmp_path / "my_configs"
    (folder / "experiment").mkdir(parents=True)
    (folder / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /optimizer: sgd\nmodel:\n  hidden: [8]\nseed: 7\n")
    return folder


def test_config_dir_adds_a_folder_and_train_stays_the_primary_config(user_configs, tmp_path, capsys):
    """Hydra 1.3: --config-dir is "an additional config dir" in front of the app's own; before, the pre-check
    made it the only folder and failed with "Cannot find primary config 'train'"."""
    main(["--config-dir", str(user_configs), "experiment=mine", *TINY, f"hydra.run.dir={tmp_path}/r"])
    saved = OmegaConf.load(tmp_path / "r" / ".hydra" / "config.yaml")
    assert list(saved.model.hidden) == [8] and saved.seed == 7 and saved.optimizer.name == "sgd"
    assert saved.trainer.max_epochs == 1  # the rest is regbench's train config with the command line
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["status"] == "completed"
    # The pre-check composes the same search path: a typo in the user's experiment is caught before the run.
    (user_configs / "experiment" / "typo.yaml").write_text("# @package _global_\ntrainer:\n  max_epoch: 3\n")
    msg = one_line_error(capsys, "--config-dir", str(user_configs), "experiment=typo", f"hydra.run.dir={tmp_path}/t")
    assert "trainer.max_epoch: no such key" in msg and not (tmp_path / "t").exists()


@pytest.mark.parametrize("override,expected", [
    ("+trainer.max_epoch=1", "trainer.max_epoch: no such key (valid keys here: max_epochs, device,"),
    ("+foo=bar", "foo: no such key (valid keys here: seed, data, model, optimizer, scheduler, trainer, regularizer"),
    ("++trainer.max_epoch=1", "did you mean trainer.max_epochs?"),
    ("+regularizer.dropout.rate=0.3", "regularizer.dropout.rate: dropout is not in the regularizer stack"),
])
def test_a_plus_key_the_schemas_lack_is_refused(override, expected, tmp_path, capsys):
    assert expected in one_line_error(capsys, override, f"hydra.run.dir={tmp_path}/r")
    assert not (tmp_path / "r").exists()


def test_plus_plus_on_an_existing_key_and_plus_on_hydra_keys_still_work(capsys):
    assert "max_epochs: 2" in show(capsys, "++trainer.max_epochs=2", "+hydra.job.env_set.REGBENCH_X=1")


def test_a_leading_tilde_in_path_keys_is_the_home_folder(tmp_path, monkeypatch, capsys):
    """The README's `data.root=~/datasets`: Hydra's lexer refuses `~` unquoted, and shells leave it alone after
    a dotted key; regbench expands it for the keys that hold paths (and data/transfer expand quoted ones)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    out = show(capsys, "data=cifar10", "data.root=~/datasets", "regularizer=[transfer]",
               f"regularizer.transfer.init_from=~/run")
    assert f"root: {tmp_path}/datasets" in out
    with pytest.raises(SystemExit):  # the transfer source is checked (and missing) where ~ points
        main([*TINY, "regularizer=[transfer]", "regularizer.transfer.init_from=~/run"])
    assert f"init_from='{tmp_path}/run': no checkpoint at {tmp_path}/run" in capsys.readouterr().err
    main([*TINY, "hydra.run.dir=~/runs/one"])
    assert (tmp_path / "runs" / "one" / "summary.json").exists()


def test_multirun_with_cfg_shows_the_first_job(capsys):
    """Hydra refuses -m with --cfg with a traceback; regbench shows the first job's config and says so."""
    try:
        main(["-m", "seed=3,4", "optimizer=sgd,adam", "--cfg", "job"])
    except SystemExit as e:
        assert e.code in (0, None)
    captured = capsys.readouterr()
    cfg = OmegaConf.create(captured.out)
    assert cfg.seed == 3 and cfg.optimizer.name == "sgd"
    assert captured.err == "regbench: note: -m with --cfg shows the config of the first job: seed=3 optimizer=sgd\n"
