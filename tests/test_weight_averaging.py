"""weight_averaging (SWA / EMA through torch.optim.swa_utils): the run's average equals torch's recipe by hand, the EMA
decay (timm's warm-up) by hand numbers, update_bn on a BatchNorm model, evaluations read the average (the trained
model's test reported beside it), bitwise resume across the schedule switch, and the refusals."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import SWALR, AveragedModel, get_ema_multi_avg_fn, update_bn

from regbench.checkpoint import load_checkpoint
from regbench.errors import ConfigError
from regbench.evaluation import evaluate
from regbench.experiment import build_experiment
from regbench.logs import read_metrics
from regbench.records import MARKER
from regbench.regularizers import REGISTRY, Context
from regbench.regularizers.stacking import stack_refusals
from regbench.regularizers.weight_averaging import ema_decay
from regbench.train import fit
from regbench.validation import validate
from tests.conftest import F32_REL, compose_cfg

SMALL = ["data.train_size=128", "data.batch_size=32", "data.test_size=100", "trainer.max_epochs=4",
         "trainer.progress_bar=false", "model.hidden=[32]", "scheduler=cosine", "trainer.keep_last=5"]
WA = "regularizer.weight_averaging."
SWA = [f"{WA}mode=swa", f"{WA}start_epoch=2", f"{WA}swa_lr=0.0003", f"{WA}anneal_epochs=1"]
# SWA on a BatchNorm MLP, its anneal ending mid-epoch 4 (1.5 epochs = 6 steps): the update_bn and resume tests' run
SWA_BN = [*SMALL, "regularizer=[batchnorm,weight_averaging]", *SWA[:-1], f"{WA}anneal_epochs=1.5"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def swa_bn_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("swa_bn") / "run"
    fit(compose_cfg(*SWA_BN), run)
    return run


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def _member_state(run: Path) -> dict:
    return load_checkpoint(run / "checkpoints" / "last.pt")["regularizers"]["weight_averaging"]


# ----------------------------------------------------------------------------------- against torch's recipe

def _by_hand(cfg, mode: str, start: int, swa_lr: float = 0.0, anneal_epochs: float = 0.0, decay: float = 0.0):
    """torch's recipe (AveragedModel's docstring example), step by step, on the run's own model, optimizer, schedule
    and batches (an experiment built from the config without the member: it draws nothing): (average, epoch-end lrs)."""
    exp = build_experiment(cfg, CPU)
    model, opt, sched = exp.model, exp.optimizer, exp.scheduler
    averaged = (AveragedModel(model) if mode == "swa" else
                AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True))
    order, swalr, lrs = torch.Generator().manual_seed(cfg.seed), None, []
    for epoch in range(1, cfg.trainer.max_epochs + 1):
        model.train()
        if mode == "swa" and epoch > start and swalr is None:  # SWALR takes over from the first averaged epoch
            swalr = SWALR(opt, swa_lr=swa_lr, anneal_epochs=round(anneal_epochs * exp.steps_per_epoch),
                          anneal_strategy="cos")
        batches = list(exp.train_batches(order))
        for i, (xb, yb) in enumerate(batches):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            if epoch > start and (mode == "ema" or i == len(batches) - 1):
                averaged.update_parameters(model)
            (swalr if swalr is not None else sched).step()
        lrs.append(opt.param_groups[0]["lr"])
    return averaged, lrs


@pytest.mark.parametrize("mode", ["swa", "ema"])
def test_the_average_and_the_lrs_are_torchs_recipe_by_hand(mode, tmp_path):
    member = SWA if mode == "swa" else [f"{WA}mode=ema", f"{WA}start_epoch=1", f"{WA}decay=0.9"]
    cfg = compose_cfg(*SMALL, "regularizer=[weight_averaging]", *member)
    fit(cfg, tmp_path)
    assert _summary(tmp_path)["step_impl"] == "direct"  # the direct step takes after_step: bitwise autograd's
    averaged, lrs = (_by_hand(compose_cfg(*SMALL), "swa", 2, swa_lr=0.0003, anneal_epochs=1) if mode == "swa" else
                     _by_hand(compose_cfg(*SMALL), "ema", 1, decay=0.9))
    state = _member_state(tmp_path)["averaged"]
    expected = averaged.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    assert int(state["n_averaged"]) == (2 if mode == "swa" else 3 * 4)  # epochs 3, 4 / every step of epochs 2-4
    assert [r["lr"] for r in read_metrics(tmp_path / "metrics.csv")] == lrs
    if mode == "swa":  # the cosine schedule until epoch 2, SWALR annealing to swa_lr over epoch 3, then held
        assert lrs[1] == pytest.approx(0.0005) and lrs[2] == lrs[3] == pytest.approx(0.0003)


# ------------------------------------------------------------------------------------------ the EMA's decay

def test_ema_decay_is_timms_model_ema_v3_by_hand_numbers():
    # timm/utils/model_ema.py ModelEmaV3.get_decay(step), update_after_step=0, min_decay=0; timm's train.py passes
    # step = num_updates (1 at the first update): decay 0 (a copy), then 1 - (1 + (step-1)/gamma)^-power.
    def timm_get_decay(step, decay, use_warmup, gamma, power):
        step = max(0, step - 0 - 1)
        if step <= 0:
            return 0.0
        if use_warmup:
            return max(min(1 - (1 + step / gamma) ** -power, decay), 0.0)
        return decay

    assert ema_decay(1, 0.999, warmup=True) == pytest.approx(1 - 2 ** (-2 / 3)) == pytest.approx(0.370039475)
    assert ema_decay(9, 0.999, warmup=True, gamma=1.0, power=1.0) == pytest.approx(0.9)
    assert ema_decay(10 ** 9, 0.999, warmup=True) == 0.999  # capped at decay
    assert ema_decay(5, 0.99) == 0.99 and ema_decay(0, 0.99) == 0.0
    for n in range(0, 50):
        for warmup, gamma, power in ((True, 1.0, 2 / 3), (True, 4.0, 0.75), (False, 1.0, 2 / 3)):
            assert ema_decay(n, 0.995, warmup, gamma, power) == timm_get_decay(n + 1, 0.995, warmup, gamma, power)


def _member(*overrides: str):
    cfg = compose_cfg(*SMALL, "regularizer=[weight_averaging]", *overrides)
    return REGISTRY["weight_averaging"](cfg.regularizer.weight_averaging), Context(cfg)


def test_ema_after_every_step_with_warmup_by_hand_numbers():
    member, ctx = _member(f"{WA}decay=0.6", f"{WA}warmup=true", f"{WA}warmup_power=1.0")
    model = nn.Linear(1, 1, bias=False)
    member.setup(model, ctx)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert member.lr_schedule(1, opt, 4) is None  # ema leaves the run's schedule alone
    expected = None
    for n, w in enumerate([4.0, 8.0, 0.0, 2.0]):
        with torch.no_grad():
            model.weight.fill_(w)
        member.after_step(model, opt)
        d = {0: 0.0, 1: 0.5, 2: 0.6, 3: 0.6}[n]  # copy; 1 - 1/2 = 0.5; min(0.6, 1 - 1/3); 0.6
        expected = w if expected is None else d * expected + (1 - d) * w
        assert member.averaged.module.weight.item() == pytest.approx(expected, rel=F32_REL)
    assert expected == pytest.approx(0.6 * (0.6 * 6.0 + 0) + 0.4 * 2.0)
    assert member.eval_model(model, torch.zeros(4, 1)) is member.averaged


# ------------------------------------------------------------------------------------- BatchNorm statistics

def test_update_bn_recomputes_the_averages_statistics_and_evaluations_read_the_average(swa_bn_run):
    cfg, tmp_path = compose_cfg(*SWA_BN), swa_bn_run
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    exp = build_experiment(cfg, CPU)  # the same data, and a model of the same shape
    averaged = exp.stack.get("weight_averaging").averaged
    averaged.load_state_dict(ckpt["regularizers"]["weight_averaging"]["averaged"])
    bn_keys = [k for k in averaged.state_dict() if "running_mean" in k]
    assert bn_keys
    # torch's update_bn by hand over the un-augmented training split (batches of data.batch_size), from reset stats
    by_hand = AveragedModel(exp.model)
    by_hand.load_state_dict(averaged.state_dict())
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        update_bn([exp.data.train_x[i:i + 32] for i in range(0, len(exp.data.train_x), 32)], by_hand)
    for k in bn_keys + [k.replace("mean", "var") for k in bn_keys]:
        assert torch.equal(by_hand.state_dict()[k], averaged.state_dict()[k]), k
        assert not torch.equal(averaged.state_dict()[k], ckpt["model"][k.removeprefix("module.")]), k  # not copied
    # every evaluation reads the average; the trained model's own test is reported beside it
    summary, last = _summary(tmp_path), read_metrics(tmp_path / "metrics.csv")[-1]
    val = evaluate(averaged, exp.data.val_x, exp.data.val_y, cfg.data.eval_batch_size)
    assert (last["val_loss"], last["val_acc"]) == (val["loss"], val["acc"])
    assert summary["test"] == evaluate(averaged, exp.data.test_x, exp.data.test_y, cfg.data.eval_batch_size)
    exp.model.load_state_dict(ckpt["model"])
    own = evaluate(exp.model, exp.data.test_x, exp.data.test_y, cfg.data.eval_batch_size)
    assert summary["test_extra"]["trained"] == {"acc": own["acc"], "nll": own["loss"], "ece": own["ece"]}
    assert summary["regularizer_info"]["weight_averaging"]["bn_statistics"] == "update_bn"
    assert _member_state(tmp_path)["updates"] == 2  # epochs 3 and 4
    # until the start epoch (2) the trained model is evaluated: no average yet
    exp.model.load_state_dict(load_checkpoint(tmp_path / "checkpoints" / "epoch_0002.pt")["model"])
    val = evaluate(exp.model, exp.data.val_x, exp.data.val_y, cfg.data.eval_batch_size)
    assert read_metrics(tmp_path / "metrics.csv")[1]["val_loss"] == val["loss"]


def test_use_buffers_averages_the_statistics_without_a_pass():
    member, ctx = _member(f"{WA}mode=swa", f"{WA}use_buffers=true")
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    member.setup(model, ctx)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for epoch, value in enumerate((1.0, 3.0), 1):
        member.lr_schedule(epoch, opt, 1)  # one step per epoch: an update every step
        model[1].running_mean.fill_(value)
        member.after_step(model, opt)
    got = member.eval_model(model, torch.randn(8, 2))
    assert torch.equal(got.module[1].running_mean, torch.full((3,), 2.0))  # the equal-weight mean, no update_bn


# -------------------------------------------------------------------------------------------------- resume

def _interrupt_and_resume(cfg_args, ref: Path, tmp_path: Path, at_epoch: int) -> None:
    """The completed run ``ref`` copied and cut back to its checkpoint of ``at_epoch`` (a run killed after it), then
    resumed in process: bitwise ``ref``."""
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    (run / MARKER).unlink()
    summary = _summary(run)
    summary["status"] = "interrupted"
    (run / "summary.json").write_text(json.dumps(summary))
    for ckpt in (run / "checkpoints").glob("epoch_*.pt"):
        if int(ckpt.stem.split("_")[1]) > at_epoch:
            ckpt.unlink()
    fit(compose_cfg(*cfg_args, "trainer.resume=true"), run)
    a, b = _summary(ref), _summary(run)
    assert b["resumed_from_epoch"] == at_epoch
    drop = lambda rows: [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in rows]  # noqa: E731
    assert drop(read_metrics(ref / "metrics.csv")) == drop(read_metrics(run / "metrics.csv"))
    assert a["test"] == b["test"] and a["test_extra"] == b["test_extra"]
    sa, sb = _member_state(ref), _member_state(run)
    assert sa["schedule"] == sb["schedule"] and sa["updates"] == sb["updates"]
    assert all(torch.equal(sa["averaged"][k], sb["averaged"][k]) for k in sa["averaged"])
    wa, wb = (load_checkpoint(r / "checkpoints" / "last.pt")["model"] for r in (ref, run))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("at_epoch", [1, 3])  # before the switch to SWALR, and after it (mid-anneal: 1.5 epochs)
def test_swa_resumes_bitwise_before_and_after_its_start(at_epoch, swa_bn_run, tmp_path):
    _interrupt_and_resume(SWA_BN, swa_bn_run, tmp_path, at_epoch)


def test_ema_with_warmup_and_update_bn_resumes_bitwise(tmp_path):
    args = [*SMALL, "trainer.max_epochs=3", "regularizer=[batchnorm,weight_averaging]", f"{WA}warmup=true",
            f"{WA}use_buffers=false"]
    fit(compose_cfg(*args), tmp_path / "ref")
    _interrupt_and_resume(args, tmp_path / "ref", tmp_path, 2)


# ----------------------------------------------------------------------------------------------- refusals

def test_refused_in_a_stack_and_by_bagging_with_one_line():
    cfg = compose_cfg(*SMALL, "regularizer=[weight_averaging]")
    (refusal,) = stack_refusals(cfg)
    assert (refusal.key, refusal.value) == ("regularizer", "weight_averaging")
    assert refusal.why.startswith("acts after every optimizer step (its after_step, which a stack does not run)")
    assert "replaces the run's learning-rate schedule" in refusal.why
    with pytest.raises(Exception, match="weight_averaging") as e:
        validate(compose_cfg(*SMALL, "regularizer=[weight_averaging,bagging]"))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("overrides, key", [
    ([f"{WA}mode=ema", f"{WA}swa_lr=0.01"], f"{WA}swa_lr"),  # a key of the other mode: never silently ignored
    ([f"{WA}mode=swa", f"{WA}decay=0.99"], f"{WA}decay"),
    ([f"{WA}decay=1.0"], f"{WA}decay"),
    ([f"{WA}mode=swa", f"{WA}anneal_strategy=step"], f"{WA}anneal_strategy"),
    ([f"{WA}mode=swa", f"{WA}swa_lr=0"], f"{WA}swa_lr"),
    (["regularizer=[early_stopping,weight_averaging]"], "regularizer.early_stopping.restore_best_weights"),
    (["regularizer=[ensemble,weight_averaging]"], "regularizer"),
])
def test_bad_settings_are_one_line_naming_the_key(overrides, key):
    listed = [] if overrides[0].startswith("regularizer=") else ["regularizer=[weight_averaging]"]
    args = [*SMALL, *listed, *overrides]
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(*args))
    assert str(e.value).startswith(key + "=") or str(e.value).startswith(key + ": "), str(e.value)


def test_start_after_the_last_epoch_applies_to_nothing():
    with pytest.raises(Exception, match="applies to nothing: regularizer.weight_averaging.start_epoch=4"):
        validate(compose_cfg(*SMALL, "regularizer=[weight_averaging]", f"{WA}start_epoch=4"))


def test_early_stopping_without_restoring_stops_on_the_averages_validation(tmp_path):
    cfg = compose_cfg(*SMALL, "trainer.max_epochs=2", "regularizer=[early_stopping,weight_averaging]",
                      "regularizer.early_stopping.restore_best_weights=false", f"{WA}decay=0.5")
    fit(cfg, tmp_path)
    summary = _summary(tmp_path)
    assert summary["status"] == "completed" and "trained" in summary["test_extra"]
    assert math.isfinite(summary["test"]["loss"])


def test_the_report_compares_the_trained_model_of_every_configuration(tmp_path):
    """A run that evaluated its trained model has that test as its "trained" one: the report's trained columns
    compare an averaging configuration with one without it, paired by seed (not "0 seeds in common")."""
    from regbench.report import report

    sweep = tmp_path / "sweep"
    for stack in ("[]", "[weight_averaging]"):
        for seed in (0, 1):
            fit(compose_cfg(*SMALL, "trainer.max_epochs=2", f"regularizer={stack}", f"seed={seed}"),
                sweep / f"regularizer={stack}" / f"seed={seed}")
    report(sweep, metrics="test_acc,test_trained_acc")
    text = (sweep / "report.md").read_text()
    rows = [ln for ln in text.splitlines() if ln.startswith("| regularizer=\\[weight\\_averaging\\] | 2 | ")]
    assert len(rows) == 3  # its row, and its Δ in each of the two metrics' tables: both paired by seed
    assert "0 seeds in common" not in text and all("paired" in r for r in rows[1:])
    assert "equal on every seed" in rows[2]  # the trained model is the baseline's run: the member changes no step
    plain = json.loads((sweep / "regularizer=[]" / "seed=0" / "summary.json").read_text())
    assert "trained" not in (plain.get("test_extra") or {})  # nothing is added to the runs: the report reads their test


def test_transfer_from_an_averaging_run_says_it_loads_the_trained_weights(tmp_path, caplog):
    source = tmp_path / "source"
    fit(compose_cfg(*SMALL, "trainer.max_epochs=2", "regularizer=[weight_averaging]"), source)
    with caplog.at_level("WARNING"):
        fit(compose_cfg(*SMALL, "trainer.max_epochs=1", "regularizer=[transfer]",
                        f"regularizer.transfer.init_from={source}"), tmp_path / "target")
    assert any("transfer loads the trained weights, not that model" in r.getMessage() and "weight_averaging"
               in r.getMessage() for r in caplog.records)
