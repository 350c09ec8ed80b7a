"""The lectures' experiments and studies: every experiment and sweep config composes and trains a step."""

from __future__ import annotations

import json
import re
import shlex

import pytest
from omegaconf import OmegaConf

from regbench.cli import check
from regbench.train import fit
from tests.conftest import REPO, TINY, compose_cfg, config_options


@pytest.fixture
def offline_data(tv_root, monkeypatch):
    """data.root / data.download defaults from the environment (mnist5k has neither key), as in a sweep."""
    monkeypatch.setenv("REGBENCH_DATA", str(tv_root))
    monkeypatch.setenv("REGBENCH_DOWNLOAD", "false")


@pytest.mark.parametrize("name", [n for n in config_options("experiment") if n != "transfer_cifar10"])
def test_every_experiment_trains_a_step(name, offline_data, tmp_path):
    extra = []
    if name == "transfer_digits":  # its source: the pretraining experiment, tiny
        pre = check(["experiment=transfer_digits_pretrain", *TINY])[0]
        fit(OmegaConf.masked_copy(pre, [k for k in pre if k != "hydra"]), tmp_path / "pretrain")
        extra = [f"regularizer.transfer.init_from={tmp_path / 'pretrain'}"]
        tmp_path = tmp_path / "run"
    cfg = check([f"experiment={name}", *TINY, *extra])[0]
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
    assert bn.model.init == "he_normal" and bn.regularizer.batchnorm.convention == "keras"
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


# The transfer experiments come in two steps (a pretraining run, then the transfer that reads its folder):
# tested as a pair below. transfer_cifar10 is a full form only (ImageNet weights, CIFAR-10).
TWO_STEP = {"transfer_cifar10", "transfer_digits_pretrain", "transfer_digits"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_EXPERIMENTS else n
                                  for n in config_options("experiment") if n not in TWO_STEP])
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


def test_transfer_experiments_state_the_lecture_recipe(offline_data):
    full = compose_cfg("experiment=transfer_cifar10")
    assert full.data.name == "cifar10" and full.data.normalize == "none" and full.model.name == "torchvision"
    assert full.model.arch == "inception_v3" and full.model.weights == "IMAGENET1K_V1" and full.model.head_hidden == 1024
    ft = full.regularizer.fine_tune
    assert list(full.regularizer) == ["fine_tune"] and ft.unfreeze_top == 2 and ft.finetune_lr_scale == 0.1
    quick = compose_cfg("experiment=transfer_digits", "regularizer.transfer.init_from=x")
    assert list(quick.data.classes) == [5, 6, 7, 8, 9] and list(quick.regularizer.transfer.skip) == ["head.out.*"]
    assert list(compose_cfg("experiment=transfer_digits_pretrain").data.classes) == [0, 1, 2, 3, 4]
    scratch = compose_cfg("experiment=transfer_digits", "regularizer=[]", "~regularizer.transfer",
                          "~regularizer.fine_tune")
    assert dict(scratch.regularizer) == {}


def test_transfer_cifar10_offline_names_the_weights_file(offline_data, tmp_path, monkeypatch):
    import torch

    from regbench.errors import RegbenchError

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(RegbenchError) as e:
        check(["experiment=transfer_cifar10"])
    assert str(e.value).startswith("model.weights=IMAGENET1K_V1: the inception_v3 weights file "
                                   f"inception_v3_google-0cc3c7bd.pth is not in {tmp_path}/hub/checkpoints")
    assert not (tmp_path / "hub").exists()  # nothing downloaded, nothing written


@pytest.mark.slow
def test_the_transfer_digits_pair_clearly_beats_chance(tmp_path):
    """Step 1 (two epochs of pretraining on digits 0-4), then step 2 as shipped on digits 5-9: 5 classes, so
    chance is 0.2; the transferred model must clearly beat it."""
    pre, run = tmp_path / "pretrain", tmp_path / "transfer"
    quiet = ["trainer.progress_bar=false"]
    fit(OmegaConf.masked_copy(c := check(["experiment=transfer_digits_pretrain", "trainer.max_epochs=2", *quiet],
                                         runs=False)[0], [k for k in c if k != "hydra"]), pre)
    cfg = check(["experiment=transfer_digits", f"regularizer.transfer.init_from={pre}", *quiet], runs=False)[0]
    fit(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), run)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final"]["val_acc"] >= 0.5 and summary["test"]["acc"] >= 0.5, summary["final"]
