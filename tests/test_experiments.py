"""The lectures' experiments and studies: every experiment and sweep config composes and trains a step."""

from __future__ import annotations

import json
import re
import shlex

import pytest
from omegaconf import OmegaConf

from regbench.cli import check
from regbench.train import fit
from tests.conftest import REPO, TINY, config_options


@pytest.fixture
def offline_data(tv_root, monkeypatch):
    """data.root / data.download defaults from the environment (mnist5k has neither key), as in a sweep."""
    monkeypatch.setenv("REGBENCH_DATA", str(tv_root))
    monkeypatch.setenv("REGBENCH_DOWNLOAD", "false")


@pytest.mark.parametrize("name", config_options("experiment"))
def test_every_experiment_trains_a_step(name, offline_data, tmp_path):
    cfg = check([f"experiment={name}", *TINY])[0]
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    fit(cfg, tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "completed"


@pytest.mark.parametrize("name", config_options("sweep"))
def test_every_study_composes_each_job_and_trains_its_first(name, offline_data, tmp_path):
    jobs = check([f"sweep={name}", *TINY], multirun=True, runs=False)  # composes only: no folder/data checks
    assert len(jobs) >= 3  # a study sweeps something, over seeds
    assert jobs[0].hydra.sweep.dir.startswith("outputs/sweeps/")  # a fixed folder: re-running resumes it
    cfg = jobs[0]
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    fit(cfg, tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "completed"


def test_experiment_configs_match_the_lectures():
    mlp = check(["experiment=mnist_mlp"])[0]
    assert list(mlp.model.hidden) == [128, 128, 64] and mlp.optimizer.name == "adam" and mlp.trainer.max_epochs == 10
    assert mlp.data.val_fraction == 0.1 and mlp.data.name == "mnist"
    drop = check(["experiment=mnist_mlp_dropout"])[0]
    assert list(drop.model.hidden) == [128, 128] and list(drop.regularizer.dropout.rate) == [0.3, 0.2]
    bn = check(["experiment=mnist_bn_elu"])[0]
    assert list(bn.model.hidden) == [300, 100] and bn.model.activation == "elu"
    assert bn.model.init == "kaiming_normal" and bn.regularizer.batchnorm.convention == "keras"
    assert bn.regularizer.batchnorm.momentum == 0.9 and bn.optimizer.name == "sgd" and bn.optimizer.lr == 0.01
    assert bn.data.batch_size == 200 and bn.trainer.max_epochs == 10
    ladder = check(["sweep=cifar10_ladder"], multirun=True, runs=False)
    base = ladder[0]
    assert base.model.name == "lecture_cnn" and base.optimizer.name == "adamw" and base.data.batch_size == 200
    assert base.trainer.max_epochs == 40 and base.data.name == "cifar10"
    stacks = {tuple(c.regularizer) for c in ladder}
    assert stacks == {(), ("dropout",), ("dropout", "batchnorm")}
    assert {c.regularizer.dropout.rate for c in ladder if "dropout" in c.regularizer} == {0.3}
    assert {c.model.pooling for c in ladder} == {"none", "max"}
    assert {c.augmentation.name for c in ladder} == {"none", "keras_lecture"}


# Each experiment's quick form (the "Quick form" line of its header), on a smaller budget that still has to
# learn: the lecture CNNs get two epochs (slow on CPU), the MLPs two epochs as well (a few seconds).
QUICK_BUDGET = {"mnist_cnn": ["trainer.max_epochs=2"], "cifar10_cnn": ["trainer.max_epochs=2"]}
SLOW_EXPERIMENTS = {"mnist_cnn", "cifar10_cnn"}


def quick_form(name: str) -> list[str]:
    """The overrides of the experiment's documented quick form (offline, on the embedded MNIST sample)."""
    header = (REPO / "configs" / "experiment" / f"{name}.yaml").read_text()
    found = re.search(r"^# Quick form[^:]*: regbench (.+)$", header, flags=re.M)
    assert found, f"configs/experiment/{name}.yaml: its header has no '# Quick form (...): regbench ...' line"
    args = shlex.split(found.group(1))
    assert f"experiment={name}" in args
    return args


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_EXPERIMENTS else n
                                  for n in config_options("experiment")])
def test_every_quick_form_experiment_clearly_beats_chance(name, tmp_path):
    args = [*quick_form(name), *QUICK_BUDGET.get(name, ["trainer.max_epochs=2"]), "trainer.progress_bar=false",
            "trainer.save_checkpoints=false"]
    cfg = check(args)[0]
    assert cfg.data.name == "mnist5k"  # offline
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    fit(cfg, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    # 400 validation images, 10 classes: chance is 0.1 (0.145 is 3 standard errors above it); 0.5 is clear.
    assert summary["final"]["val_acc"] >= 0.5 and summary["test"]["acc"] >= 0.5, summary["final"]
    assert not any("chance accuracy" in w for w in summary["warnings"])
