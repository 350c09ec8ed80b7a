"""regularizer=[bagging]: bootstrap resamples, member seeds, the ensemble's metrics, and a bagging run end to end."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from regbench.errors import ConfigError
from regbench.regularizers import Context, build_stack
from regbench.stacked.bagging import bootstrap_indices, ensemble_metrics, member_configs, member_seed
from regbench.train import fit
from tests.conftest import F32_REL, compose_cfg


def test_a_bootstrap_resample_has_repeats_and_about_63_percent_unique():
    n = 4000
    idx = bootstrap_indices(n, 7)
    assert len(idx) == n and int(idx.min()) >= 0 and int(idx.max()) < n
    unique = len(set(idx.tolist())) / n
    expected = 1 - (1 - 1 / n) ** n  # 0.6322
    sd = math.sqrt(n * (math.exp(-1) - 2 * math.exp(-2)) + n * math.exp(-2)) / n  # ~0.0076 (occupancy variance bound)
    assert abs(unique - expected) < 4 * sd
    assert torch.equal(idx, bootstrap_indices(n, 7)) and not torch.equal(idx, bootstrap_indices(n, 8))


def test_member_seeds_are_distinct_within_and_across_runs():
    seeds = {member_seed(s, j) for s in range(3) for j in range(5)}
    assert len(seeds) == 15
    cfgs = member_configs(compose_cfg("regularizer=[bagging,l2]", "regularizer.bagging.members=3", "seed=4"))
    assert [c.seed for c in cfgs] == [member_seed(4, j) for j in range(3)]
    assert all(list(c.regularizer) == ["l2"] for c in cfgs)


def test_ensemble_metrics_average_the_members_softmax():
    probs = torch.tensor([[[0.9, 0.1], [0.4, 0.6]], [[0.5, 0.5], [0.2, 0.8]]], dtype=torch.float64)
    y = torch.tensor([0, 0])
    m = ensemble_metrics(probs, y)
    mean = probs.mean(0)  # [[0.7, 0.3], [0.3, 0.7]]
    assert m["loss"] == pytest.approx(-(math.log(0.7) + math.log(0.3)) / 2, rel=F32_REL)
    assert m["acc"] == 0.5 and torch.allclose(mean, torch.tensor([[0.7, 0.3], [0.3, 0.7]], dtype=torch.float64))


@pytest.mark.parametrize("overrides, key", [
    (["regularizer.bagging.members=1"], "regularizer.bagging.members"),
    (["regularizer=[bagging,stochastic_depth]", "model=resnet", "model.depth=8"], "regularizer"),
    (["trainer.amp=bf16"], "trainer.amp"),
])
def test_bagging_refuses_what_cannot_be_stacked(overrides, key):
    cfg = compose_cfg("regularizer=[bagging]", *overrides)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        for r in build_stack(cfg, Context(cfg)).members:
            r.check(Context(cfg))


@pytest.mark.slow
def test_a_bagging_run_end_to_end(tmp_path):
    run = tmp_path / "run"
    fit(compose_cfg("regularizer=[bagging]", "regularizer.bagging.members=3", "data.train_size=600",
                    "trainer.max_epochs=2", "trainer.progress_bar=false"), run)
    for j in range(3):
        member = json.loads((run / "members" / str(j) / "summary.json").read_text())
        assert member["status"] == "completed" and member["stacked"]["members"] == 3
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert len(rows) == 2 and all(float(r["ensemble_val_loss"]) > 0 for r in rows)
    s = json.loads((run / "summary.json").read_text())
    assert s["status"] == "completed" and s["bagging"]["members"] == 3
    assert all(0.55 < u < 0.70 for u in s["bagging"]["unique_fraction"])
    members_mean = s["test_extra"]["members_mean"]
    assert set(s["test"]) == {"loss", "acc", "ece"} and s["test"]["loss"] < members_mean["loss"]
    assert (run / "checkpoints" / "ensemble.pt").exists() and (run / "COMPLETED").exists()


def test_a_bagging_run_evaluates_the_ensemble_when_its_members_evaluate(tmp_path):
    run = tmp_path / "run"
    value = fit(compose_cfg("regularizer=[bagging]", "regularizer.bagging.members=2", "data.train_size=200",
                            "model.hidden=[32]", "trainer.max_epochs=3", "trainer.eval_every=2",
                            "trainer.progress_bar=false"), run)
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["ensemble_val_loss"] == "" for r in rows] == [True, False, False]
    assert [r["val_loss"] == "" for r in rows] == [True, False, False]
    s = json.loads((run / "summary.json").read_text())
    assert s["best"]["epoch"] in (2, 3) and value == s["best"]["ensemble_val_loss"]
