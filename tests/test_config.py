"""Config: every option of every group composes and trains; bad input fails with one line and exit status 2."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from regbench import registry
from regbench.cli import check, main
from regbench.errors import ConfigError, RegbenchError
from regbench.train import fit
from regbench.validation import group_schemas, validate
from tests.conftest import REPO, TINY, compose_cfg, config_options, layered_models, small_model

GROUPS = ["data", "model", "optimizer", "scheduler", "trainer", "experiment"]


def test_every_yaml_names_its_schema():
    schemas = group_schemas()
    for group in GROUPS[:-1]:
        for path in (REPO / "configs" / group).glob("*.yaml"):
            text = path.read_text()
            # @_here_; a `# @package _global_` file (it also sets what the option needs elsewhere) names @<group>
            package = f"@{group}" if text.startswith("# @package _global_") else "@_here_"
            assert f"/schema/{group}/" in text and package in text, path
            schema = text.split(f"/schema/{group}/")[1].split("@")[0]
            assert schema in schemas[group], path


def test_the_schema_module_imports_nothing_of_regbench_but_the_error_helpers():
    import subprocess
    import sys

    code = "import sys, regbench.config; print(sorted(m for m in sys.modules if m.startswith('regbench')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    # regbench.compile_cache: `import regbench` points torch's compile cache at the user's own folder before any
    # torch import (issue 25); it imports no torch either
    assert out.strip() == str(["regbench", "regbench.compile_cache", "regbench.config", "regbench.errors"])
    assert "'torch'" not in subprocess.run([sys.executable, "-c", code.replace(
        "print(sorted(m for m in sys.modules if m.startswith('regbench')))", "print(sorted(sys.modules))")],
        capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("group", list(registry.GROUPS))
def test_every_registered_option_has_a_yaml_typed_by_its_schema(group):
    """Each table's option names are the ``name`` values its YAML files set: one YAML per option at least
    (optimizer=momentum and optimizer=nesterov are sgd), each composing to its option's registered schema."""
    table = registry.GROUPS[group]
    if not table:
        pytest.skip(f"{group} options do not register yet")  # the model families move into models/ (issue 13)
    named = {}
    for option in config_options(group):
        node = compose_cfg(f"{group}={option}")[group]
        assert OmegaConf.get_type(node) is table[node.name].schema, option
        named.setdefault(node.name, option)
    assert sorted(named) == sorted(table)


def test_validate_runs_the_check_of_each_groups_option(monkeypatch):
    """validate is a loop over the tables: the selected option's registered check sees its node and the config."""
    import dataclasses

    seen = []
    cfg = compose_cfg("optimizer=adamw", "scheduler=cosine")
    for group, table in registry.GROUPS.items():
        entry = table[cfg[group].name] if cfg[group].name in table else None
        if entry is None or entry.check is None:
            continue
        def spy(node, whole, group=group, real=entry.check):  # noqa: E306
            seen.append((group, node.name, whole is cfg))
            real(node, whole)
        monkeypatch.setitem(table._entries, entry.name, dataclasses.replace(entry, check=spy))
    validate(cfg)
    assert [s for s in seen if s[0] != "model"] == [("data", "mnist5k", True), ("optimizer", "adamw", True),
                                                   ("scheduler", "cosine", True)]


# The transfer experiments need a source (ImageNet weights / a pretraining run): tests/test_experiments.py runs them.
@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in config_options(g)
                                          if not (g == "experiment" and o.startswith("transfer_"))])
def test_every_option_composes_and_trains_a_step(group, option, tv_root, tmp_path, monkeypatch):
    # data.root / data.download defaults from the environment: experiments pick torchvision datasets themselves
    monkeypatch.setenv("REGBENCH_DATA", str(tv_root))
    monkeypatch.setenv("REGBENCH_DOWNLOAD", "false")
    overrides = [*TINY, f"{group}={option}"]
    if group == "data" and option == "cifar100":
        overrides.append("data.val_fraction=0.25")  # 100 classes: enough validation images for a stratified split
    if group == "scheduler":
        overrides.append("trainer.max_epochs=2")  # warmup_cosine needs epochs after its one-epoch warmup
    if group == "model" and option == "torchvision":  # offline: random init, a small arch at the data's size
        overrides += ["model.weights=null", "model.arch=mobilenet_v3_small"]
    cfg = compose_cfg(*overrides)
    assert group == "experiment" or cfg[group] is not None
    fit(cfg, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_completed"] == cfg.trainer.max_epochs


@pytest.mark.parametrize("model", layered_models())
@pytest.mark.parametrize("dataset", ["mnist5k", "cifar10"])
def test_each_model_trains_on_grey_and_rgb_data(model, dataset, tv_root, tmp_path):
    files = [f"data.root={tv_root}", "data.download=false"] if dataset != "mnist5k" else []
    fit(compose_cfg(*TINY, *small_model(model), f"data={dataset}", *files), tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["data"]["input_shape"][0] == (1 if dataset == "mnist5k" else 3)


def test_experiment_file_changes_only_what_it_lists():
    base = compose_cfg()
    exp = compose_cfg("experiment=mnist_cnn")
    assert exp.model.name == "lecture_cnn" and exp.optimizer.momentum == 0.9 and exp.optimizer.lr == 0.01
    assert exp.model.init == "kaiming_normal" and list(exp.regularizer) == ["grad_clip"]
    assert exp.trainer.max_epochs == 10 and exp.data == base.data and exp.seed == base.seed


def test_group_values_are_typed():
    cfg = compose_cfg("optimizer=adam")
    assert OmegaConf.get_type(cfg.optimizer).__name__ == "AdamConfig"
    assert OmegaConf.get_type(cfg.trainer).__name__ == "TrainerConfig"


# --------------------------------------------------------------------------------------- bad input

BAD = [
    (["trainer.max_epoch=3"], "trainer.max_epoch: no such key", "did you mean trainer.max_epochs?"),
    (["sed=1"], "sed: no such key", "did you mean seed?"),
    (["model.hiden=[8]"], "model.hiden: no such key", "did you mean model.hidden?"),
    (["optimizer=adam", "optimizer.momentum=0.9"], "optimizer.momentum: no such key", "betas"),
    (["trainer.max_epochs=ten"], "trainer.max_epochs: Value 'ten' of type 'str' could not be converted", ""),
    (["data.batch_size=1.5"], "data.batch_size: Value '1.5' of type 'float' could not be converted to Integer", ""),
    (["model=vgg"], "model=vgg: no such option in config group 'model'", "available: lecture_cnn, mlp"),
    (["optimizer=adamm"], "optimizer=adamm: no such option", "did you mean optimizer=adam?"),
    (["model.hidden=[1,2"], "cannot parse override", "override_grammar"),
    (["optimizer.lr=0"], "optimizer.lr=0.0: expected a number > 0", "optimizer.lr=0.001"),
    (["optimizer.lr=-1"], "optimizer.lr=-1.0: expected a number > 0", ""),
    (["data.batch_size=0"], "data.batch_size=0: expected an integer >= 1", ""),
    (["data.val_fraction=1.5"], "data.val_fraction=1.5: expected a number in (0, 1)", ""),
    (["data.val_fraction=0"], "data.val_fraction=0.0: expected a number in (0, 1)", ""),
    (["data.train_size=0"], "data.train_size=0: expected an integer >= 1 or null", ""),
    (["trainer.max_epochs=0"], "trainer.max_epochs=0: expected an integer >= 1", ""),
    (["trainer.device=gpu"], "trainer.device='gpu': expected auto, cpu, cuda or cuda:N", ""),
    (["trainer.amp=fp8"], "trainer.amp='fp8': expected one of none, bf16, fp16", ""),
    (["model.activation=swish"], "model.activation='swish': expected one of relu", ""),
    (["model.negative_slope=0.2"], "model.negative_slope=0.2: expected to be left alone", "model.activation=leaky_relu"),
    (["optimizer=sgd", "optimizer.nesterov=true"], "optimizer.nesterov=True: expected momentum > 0", ""),
    (["optimizer=adam", "optimizer.betas=[0.9,1.5]"], "optimizer.betas=[0.9, 1.5]: expected two numbers", ""),
    (["scheduler=cosine", "scheduler.min_lr=1"], "scheduler.min_lr=1.0: expected a number in [0, optimizer.lr", ""),
    (["scheduler=warmup", "scheduler.warmup_epochs=50"], "scheduler.warmup_epochs=50.0: expected no more epochs", ""),
    (["data=mnist", "data.root=/nonexistent/x"], "", ""),  # composes fine; fails later in the data step
    (["data.root=/tmp"], "data.root: no such key", "valid keys here"),  # mnist5k has no root: nothing to find
    (["optimizer=sgd,adam"], "optimizer=sgd,adam: a sweep (several values) needs multirun", "add -m"),
]


@pytest.mark.parametrize("overrides,expected,hint", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_input_is_one_line_and_exit_2(overrides, expected, hint, capsys, tmp_path):
    if not expected:  # this one is valid config: the data error comes from the run (see test_data)
        check(overrides)
        return
    with pytest.raises(SystemExit) as e:
        main([*overrides, f"hydra.run.dir={tmp_path}/run"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("regbench: error: "), err
    assert expected in err and hint in err, err
    assert not (tmp_path / "run").exists()  # nothing was written


def test_a_typo_in_any_job_of_a_sweep_fails_before_anything_runs(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["-m", "optimizer=sgd,adam", "optimizer.lr=0.1,-0.1", f"hydra.sweep.dir={tmp_path}/sweep"])
    assert e.value.code == 2
    assert "optimizer.lr=-0.1: expected a number > 0" in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


def test_check_composes_each_swept_value_once():
    cfgs = check(["optimizer=sgd,adam,adamw", "seed=0,1"], multirun=True)
    # the first job, plus one per further value of each swept key: 1 + 2 + 1
    assert len(cfgs) == 4
    assert sorted({c.optimizer.name for c in cfgs}) == ["adam", "adamw", "sgd"]


def test_errors_raised_by_the_run_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([*TINY, "data=cifar10", f"data.root={tmp_path}/none", "data.download=false",
              f"hydra.run.dir={tmp_path}/run"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "regbench: error: data=cifar10: dataset files missing or corrupt" in err


def test_existing_run_dir_is_refused_before_hydra_writes(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text("{}")
    with pytest.raises(SystemExit):
        main([*TINY, f"hydra.run.dir={run}"])
    assert "already holds the results of" in capsys.readouterr().err
    assert not (run / ".hydra").exists()


def test_config_error_message_format():
    e = ConfigError("data.batch_size", 0, "an integer >= 1", "fix: data.batch_size=32")
    assert str(e) == "data.batch_size=0: expected an integer >= 1; fix: data.batch_size=32"
    assert isinstance(e, RegbenchError) and e.exit_code == 2
