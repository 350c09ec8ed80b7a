"""What TensorBoard shows of a sweep, read through TensorBoard's own backend: the HParams columns it ticks by
default, the metric columns, the Custom Scalars charts and the Scalars tags."""

from __future__ import annotations

import json
import re

import pytest

from regbench.hparams import (
    SWEEP_HPARAMS_ENV,
    experiment_pb,
    sweep_columns,
    sweep_hparams,
    sweep_label,
)
from regbench.train import fit
from tests.conftest import F32_REL, TINY, compose_cfg

STACKS = ["regularizer=[]", "regularizer=[dropout]", "regularizer=[l2]"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Three configurations of a tiny sweep, each job told the sweep's plan as ``regbench -m`` tells it."""
    root = tmp_path_factory.mktemp("sweep")
    cfgs = [compose_cfg(*TINY, "trainer.max_epochs=2", stack) for stack in STACKS]
    mp = pytest.MonkeyPatch()
    mp.setenv(SWEEP_HPARAMS_ENV, json.dumps(sweep_hparams(cfgs)))
    try:
        for stack, cfg in zip(STACKS, cfgs):
            fit(cfg, root / stack / "seed=0")
    finally:
        mp.undo()
    return root


def tensorboard_backend(logdir):
    """TensorBoard's data provider and HParams backend over ``logdir``, as `tensorboard --logdir` builds them."""
    from tensorboard import context
    from tensorboard.backend.event_processing import (
        data_provider,
        plugin_event_multiplexer,
    )
    from tensorboard.plugins.base_plugin import TBContext
    from tensorboard.plugins.hparams import backend_context

    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    provider = data_provider.MultiplexerDataProvider(mux, str(logdir))
    return context.RequestContext(), provider, backend_context.Context(TBContext(data_provider=provider,
                                                                                 logdir=str(logdir)))


def shown_experiment(logdir):
    """The experiment the HParams tab gets (the plugin's get_experiment with the frontend's hparamsLimit)."""
    from tensorboard.data import provider as p

    req, _, ctx = tensorboard_backend(logdir)
    return ctx.experiment_from_metadata(req, "", True, ctx.hparams_metadata(req, ""),
                                        p.ListHyperparametersResult(hyperparameters=[], session_groups=[]),
                                        hparams_limit=1000)


def test_hparams_table_shows_the_stack_and_its_strengths_first(sweep):
    exp = shown_experiment(sweep)
    columns = [(h.name, h.differs) for h in exp.hparam_infos]
    # TensorBoard's HParams tab ticks the first five of these columns (backend order: differs first, then name).
    assert columns == [("regularizer", True), ("regularizer.dropout.rate", True), ("regularizer.dropout.spatial", True),
                       ("regularizer.l2.lam", True)]
    stack = exp.hparam_infos[0]
    assert sorted(v.string_value for v in stack.domain_discrete.values) == ["[]", "[dropout]", "[l2]"]
    assert [m.name.tag for m in exp.metric_infos][:5] == ["test/acc", "gap/loss_clean", "loss/val", "acc/val",
                                                          "test/loss"]
    assert exp.metric_infos[1].display_name == "final gap (val − clean train loss)"


def test_every_job_writes_the_same_experiment_and_its_own_values(sweep):
    from tensorboard.plugins.hparams import metadata

    req, provider, ctx = tensorboard_backend(sweep)
    per_run = ctx.hparams_metadata(req, "")
    assert len(per_run) == 3 and all(run.endswith("/tb") for run in per_run)  # the run folder's tb/, nothing else
    experiments = {tags[metadata.EXPERIMENT_TAG] for tags in per_run.values()}
    assert len(experiments) == 1  # the plugin picks any run's experiment: they are identical
    values = {run.split("/")[0]: metadata.parse_session_start_info_plugin_data(tags[metadata.SESSION_START_INFO_TAG])
              for run, tags in per_run.items()}
    assert values["regularizer=[dropout]"].hparams["regularizer.dropout.rate"].number_value == 0.5
    # the HParams table's rows: one per configuration, named after what the sweep varies (not the run path)
    assert {run: v.group_name for run, v in values.items()} == {stack: stack for stack in STACKS}
    # a member absent from a job's stack is strength 0 there, so parallel coordinates keep every configuration
    assert values["regularizer=[]"].hparams["regularizer.dropout.rate"].number_value == 0
    assert values["regularizer=[]"].hparams["trainer.progress_bar"].bool_value is False  # a bool, not 0.0
    assert values["regularizer=[]"].hparams["model.hidden"].string_value == "[256, 128]"


def test_metrics_are_last_points_of_curves_and_no_hparam_charts(sweep):
    req, provider, _ = tensorboard_backend(sweep)
    points = provider.read_scalars(req, experiment_id="", plugin_name="scalars", downsample=1000)
    last = provider.read_last_scalars(req, experiment_id="", plugin_name="scalars")
    assert len(points) == 3
    for run, tags in points.items():
        assert not [t for t in tags if t.startswith("hparam/")]
        # every Scalars chart has a point per epoch, except the test results (once, at the end: 3 small charts)
        assert sorted(t for t, data in tags.items() if len(data) == 1) == ["test/acc", "test/ece", "test/loss"]
        assert all(len(data) == 2 for t, data in tags.items() if not t.startswith("test/"))
        summary = json.loads((sweep / run.rsplit("/tb", 1)[0] / "summary.json").read_text())
        assert last[run]["gap/loss_clean"].value == pytest.approx(summary["final"]["clean_gap_loss"], rel=F32_REL)
        assert last[run]["test/acc"].value == pytest.approx(summary["test"]["acc"], rel=F32_REL)
        assert last[run]["test/acc"].step == summary["epochs_completed"]


def test_custom_scalars_one_quantity_per_chart(sweep):
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    req, provider, _ = tensorboard_backend(sweep)
    layouts = provider.read_tensors(req, experiment_id="", plugin_name=metadata.PLUGIN_NAME, downsample=1)
    scalars = provider.list_scalars(req, experiment_id="", plugin_name="scalars")
    for run, tags in layouts.items():
        layout = layout_pb2.Layout.FromString(tags[metadata.CONFIG_SUMMARY_TAG][0].numpy.item())
        charts = {c.title: list(c.multiline.tag) for c in layout.category[0].chart}
        lines = {title: sorted(t for t in scalars[run] if any(re.search(rx, t) for rx in rxs))
                 for title, rxs in charts.items()}
        assert lines == {  # lines per run in each chart: 2, 1, 2, 1 (was 3, 3, 4 before)
            "loss: clean train (eval mode, plain CE) vs val": ["loss/train_clean", "loss/val"],
            "generalization gap: val loss − clean train loss": ["gap/loss_clean"],
            "accuracy: clean train (eval mode, plain CE) vs val": ["acc/train_clean", "acc/val"],
            "accuracy gap: clean train acc − val acc": ["gap/acc_clean"],
        }


def test_sweep_columns_mark_what_varies():
    plan = {"regularizer": ["[l2]"], "regularizer.l2.lam": [1e-4, 1e-3], "regularizer.l2.half": [False],
            "optimizer.lr": [0.1], "seed": [0, 1], "model.hidden": ["[32]", "[64]"]}
    # l2.lam varies; a constant strength of a member in every stack is listed, unticked; constants left out;
    # seed is no column: a row is a configuration (a session group) with its seeds averaged.
    assert sweep_columns(plan) == {"regularizer": False, "regularizer.l2.lam": True, "model.hidden": True}
    hparams = {"regularizer": "[l2]", "regularizer.l2.lam": 1e-3, "seed": 1, "model.hidden": "[64]",
               "optimizer.lr": 0.1}
    assert sweep_label(plan, hparams) == "model.hidden=[64],regularizer.l2.lam=0.001"
    assert sweep_label({"seed": [0, 1], "optimizer.lr": [0.1]}, hparams) == ""  # only seeds: no groups
    assert "seed" in sweep_columns({"seed": [0, 1], "optimizer.lr": [0.1]})
    exp = experiment_pb(plan).experiment
    lam = next(h for h in exp.hparam_infos if h.name == "regularizer.l2.lam")
    assert (lam.domain_interval.min_value, lam.domain_interval.max_value) == (1e-4, 1e-3)


def test_a_single_run_leaves_the_columns_to_tensorboard(tmp_path):
    from tensorboard.plugins.hparams import metadata

    fit(compose_cfg(*TINY), tmp_path / "run")
    req, _, ctx = tensorboard_backend(tmp_path)
    tags = ctx.hparams_metadata(req, "")["run/tb"]
    # No experiment summary: TensorBoard computes columns and `differs` from the runs it loads (several single
    # runs under one --logdir get the keys that differ between them ticked).
    assert metadata.EXPERIMENT_TAG not in tags
    assert {metadata.SESSION_START_INFO_TAG, metadata.SESSION_END_INFO_TAG} <= set(tags)


@pytest.mark.slow
def test_regbench_m_hands_the_plan_to_jobs_in_other_processes(tmp_path):
    import os
    import subprocess
    import sys

    sweep = tmp_path / "s"
    env = {k: v for k, v in os.environ.items() if k != SWEEP_HPARAMS_ENV}
    subprocess.run([sys.executable, "-m", "regbench", "-m", "hydra/launcher=parallel", "regularizer=[],[l2]",
                    *TINY, f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=env, check=True, capture_output=True,
                   timeout=600)
    exp = shown_experiment(sweep)
    assert [(h.name, h.differs) for h in exp.hparam_infos] == [("regularizer", True), ("regularizer.l2.lam", True)]


def test_a_new_event_file_sorts_after_the_files_already_there(tmp_path):
    """TensorBoard reads event files in name order (<unix second>.<host>.<pid>): a resume in the same second as the
    killed run, with a smaller pid, must still come second, or its epochs are drawn before the older ones."""
    import socket
    import time

    from regbench.logs import summary_writer

    tb = tmp_path / "tb"
    tb.mkdir()
    older = tb / f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.99999999.0"
    older.write_bytes(b"")
    writer = summary_writer(tb, purge_step=3)
    writer.add_scalar("loss/val", 1.0, 3)
    writer.close()
    names = sorted(p.name for p in tb.iterdir())
    assert len(names) == 2 and names[0] == older.name
