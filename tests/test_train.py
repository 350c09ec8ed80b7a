"""The training loop and what a run leaves behind: metrics.csv, summary.json, TensorBoard events, checkpoints."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch
import torch.nn.functional as F

from regbench.data import batches, load_data
from regbench.errors import ConfigError, RegbenchError
from regbench.checkpoint import load_checkpoint
from regbench.records import METRIC_COLUMNS
from regbench.models import build_model
from regbench.evaluation import evaluate
from regbench.loop import AutogradStep, train_one_epoch
from regbench.train import fit
from tests.conftest import F32_REL, TINY, compose_cfg

SMALL = ["data.train_size=200", "data.batch_size=50", "data.test_size=100", "trainer.max_epochs=3",
         "trainer.progress_bar=false", "model.hidden=[32]"]


def read_metrics(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    value = fit(compose_cfg(*SMALL), run_dir)
    return run_dir, value


def test_run_dir_contents(small_run):
    run_dir, value = small_run
    rows = read_metrics(run_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert list(rows[0]) == METRIC_COLUMNS
    assert [int(r["step"]) for r in rows] == [4, 8, 12]  # 200 images / batch 50
    for r in rows:
        assert float(r["gap_loss"]) == pytest.approx(float(r["val_loss"]) - float(r["train_loss"]))
        assert float(r["gap_acc"]) == pytest.approx(float(r["train_acc"]) - float(r["val_acc"]))
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "completed" and s["epochs_completed"] == 3 and s["error"] is None
    assert s["params"] == {"trainable": 784 * 32 + 32 + 32 * 10 + 10, "frozen": 0, "buffers": 0,
                           "total": 25_450}
    assert s["final"]["epoch"] == 3 and s["final"]["val_loss"] == pytest.approx(float(rows[-1]["val_loss"]))
    best = min(rows, key=lambda r: float(r["val_loss"]))
    assert s["best"]["epoch"] == int(best["epoch"]) and value == pytest.approx(float(best["val_loss"]))
    assert set(s["test"]) == {"loss", "acc", "ece"} and 0 <= s["test"]["acc"] <= 1 and 0 <= s["test"]["ece"] <= 1
    assert s["data"]["train"] == 200 and s["data"]["test"] == 100 and len(s["data"]["mean"]) == 1
    assert s["versions"]["torch"] == torch.__version__


def test_checkpoints_load_safely_and_restore_the_model(small_run):
    run_dir, _ = small_run
    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    best = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert last["epoch"] == 3 and last["config"]["model"]["hidden"] == [32]
    s = json.loads((run_dir / "summary.json").read_text())
    assert best["epoch"] == s["best"]["epoch"]
    cfg = compose_cfg(*SMALL)
    data = load_data(cfg.data, torch.device("cpu"))
    model = build_model(cfg.model, data.input_shape, 10)
    model.load_state_dict(last["model"])
    test = evaluate(model, data.test_x, data.test_y, 1000)
    assert test["acc"] == pytest.approx(s["test"]["acc"]) and test["loss"] == pytest.approx(s["test"]["loss"])


def test_tensorboard_events(small_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.util import tensor_util

    run_dir, _ = small_run
    tb = run_dir / "tb"
    assert [p for p in tb.iterdir() if p.is_dir()] == []  # hparams written without a stray sub-run
    acc = EventAccumulator(str(tb))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/train", "loss/val", "acc/train", "acc/val", "gap/loss", "gap/acc", "lr"} <= tags
    assert {"test/acc", "test/loss", "test/ece"} <= tags and not [t for t in tags if t.startswith("hparam/")]
    assert [e.step for e in acc.Scalars("loss/val")] == [1, 2, 3]
    rows = read_metrics(run_dir)
    assert [e.value for e in acc.Scalars("loss/train")] == pytest.approx([float(r["train_loss"]) for r in rows])
    assert "config/text_summary" in acc.Tags()["tensors"]
    text = tensor_util.make_ndarray(acc.Tensors("config/text_summary")[0].tensor_proto).item().decode()
    assert "hidden:" in text and "max_epochs: 3" in text
    plugins = acc.PluginTagToContent("hparams")
    assert {"_hparams_/session_start_info", "_hparams_/session_end_info"} <= set(plugins)
    # Clean train and val loss share one chart in the Custom Scalars tab (tags are anchored regexes).
    layout = layout_pb2.Layout()
    layout.ParseFromString(tensor_util.make_ndarray(acc.Tensors("custom_scalars__config__")[0].tensor_proto).item())
    charts = {c.title: list(c.multiline.tag) for c in layout.category[0].chart}
    assert charts["loss: clean train (eval mode, plain CE) vs val"] == ["^loss/train_clean$", "^loss/val$"]


def test_same_seed_reruns_bitwise_on_cpu(tmp_path, small_run):
    run_dir, _ = small_run
    fit(compose_cfg(*SMALL), tmp_path / "again")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "again")) == strip(read_metrics(run_dir))
    a = load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "again" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_another_seed_gives_another_run(tmp_path, small_run):
    run_dir, _ = small_run
    fit(compose_cfg(*SMALL, "seed=1"), tmp_path / "seed1")
    assert read_metrics(tmp_path / "seed1")[0]["train_loss"] != read_metrics(run_dir)[0]["train_loss"]


def test_train_one_epoch_accumulates_exactly():
    # With lr = 0 the weights never change, so the epoch's summed loss / correct equal one full evaluation.
    torch.manual_seed(0)
    x, y = torch.randn(70, 1, 4, 4), torch.randint(0, 3, (70,))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    out = train_one_epoch(AutogradStep(model, opt), batches(x, y, 32, torch.Generator().manual_seed(0)))
    assert out["seen"] == 70 and out["penalty"] is None
    with torch.no_grad():
        logits = model(x)
    assert out["loss"].item() / 70 == pytest.approx(F.cross_entropy(logits, y).item(), rel=F32_REL)
    assert out["correct"].item() == (logits.argmax(1) == y).sum().item()
    ev = evaluate(model, x, y, batch_size=16)
    assert ev["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=F32_REL)


def test_schedule_is_stepped_per_optimizer_step(tmp_path):
    fit(compose_cfg(*TINY, "trainer.max_epochs=2", "scheduler=step", "scheduler.step_epochs=1",
                    "scheduler.gamma=0.5", "optimizer=sgd", "optimizer.lr=0.1"), tmp_path)
    assert [float(r["lr"]) for r in read_metrics(tmp_path)] == pytest.approx([0.05, 0.025])


def test_divergence_stops_the_run_and_marks_it_failed(tmp_path):
    cfg = compose_cfg(*TINY, "optimizer=sgd", "optimizer.lr=1e30", "trainer.max_epochs=3")
    with pytest.raises(RegbenchError, match=r"non-finite training loss .* in epoch 1 .* lr=1e\+30"):
        fit(cfg, tmp_path)
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["status"] == "failed" and "non-finite" in s["error"] and s["epochs_completed"] == 0
    assert "no checkpoint was written before it" in s["error"] and "is kept" not in s["error"]


def test_divergence_of_the_weights_with_a_finite_training_loss_fails_the_run(tmp_path):
    """SGD lr=1e8: the training loss of epoch 1 is still finite, the weights are not (weight_l2=inf)."""
    cfg = compose_cfg(*TINY, "optimizer=sgd", "optimizer.lr=1e8", "trainer.max_epochs=3")
    with pytest.raises(RegbenchError, match=r"training diverged: non-finite weights \(weight_l2 inf, .*in epoch 1 "):
        fit(cfg, tmp_path)
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["status"] == "failed" and s["epochs_completed"] == 0 and s["final"] is None
    assert not (tmp_path / "COMPLETED").exists()
    assert (tmp_path / "metrics.csv").read_text().count("\n") <= 1  # no row of the diverged epoch


def test_refuses_to_overwrite_an_earlier_run(tmp_path):
    fit(compose_cfg(*TINY), tmp_path)
    before = (tmp_path / "metrics.csv").read_bytes()
    with pytest.raises(RegbenchError, match="already holds the results of a completed run"):
        fit(compose_cfg(*TINY, "seed=5"), tmp_path)
    assert (tmp_path / "metrics.csv").read_bytes() == before


def test_bf16_autocast_on_cpu_and_fp16_needs_cuda(tmp_path):
    fit(compose_cfg(*TINY, "trainer.amp=bf16"), tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "summary.json").read_text())["amp"] == "bf16"
    with pytest.raises(ConfigError, match="trainer.amp='fp16'"):
        fit(compose_cfg(*TINY, "trainer.amp=fp16", "trainer.device=cpu"), tmp_path / "fp16")


def test_num_threads_is_applied(tmp_path):
    before = torch.get_num_threads()
    try:
        fit(compose_cfg(*TINY, "trainer.num_threads=1"), tmp_path)
        assert torch.get_num_threads() == 1
        assert json.loads((tmp_path / "summary.json").read_text())["num_threads"] == 1
    finally:
        torch.set_num_threads(before)


def test_null_threads_take_omp_num_threads_where_it_is_set(monkeypatch):
    """trainer.num_threads=null is torch's own default: OMP_NUM_THREADS (a scheduler's or a test runner's share of
    the cores) where it is a positive integer, else every core the process may use."""
    from regbench.runtime import default_num_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_num_threads() == 3
    for junk in ("0", "", "two", "-1"):
        monkeypatch.setenv("OMP_NUM_THREADS", junk)
        assert default_num_threads() == len(os.sched_getaffinity(0))
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert default_num_threads() == len(os.sched_getaffinity(0))


def test_monitor_val_acc_picks_the_most_accurate_epoch(tmp_path):
    value = fit(compose_cfg(*SMALL, "trainer.monitor=val_acc", "trainer.save_checkpoints=false"), tmp_path)
    rows = read_metrics(tmp_path)
    assert value == max(float(r["val_acc"]) for r in rows)
    assert not any((tmp_path / "checkpoints").iterdir())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run_matches_shapes(tmp_path):
    fit(compose_cfg(*TINY, "trainer.device=cuda", "trainer.amp=bf16"), tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text())["device"].startswith("cuda")


SYNC_FREE_STACKS = [
    ["augmentation=heavy", "regularizer=[l1,dropout,batchnorm,label_smoothing,grad_clip]"],
    ["model=lecture_cnn", "augmentation=randaugment", "regularizer=[dropout,batchnorm]", "trainer.amp=bf16"],
    ["augmentation=mixup", "regularizer=[l2,weight_decay]", "optimizer=momentum", "scheduler=warmup_cosine"],
    ["augmentation=cutmix", "optimizer=adamw", "optimizer.weight_decay=0",
     "regularizer=[weight_decay,ensemble,early_stopping]", "regularizer.ensemble.k=2"],
    ["model=lecture_cnn", "augmentation=keras_lecture", "regularizer=[elastic_net,group_norm]", "optimizer=rmsprop"],
    ["augmentation.ops=[{op:mixup_cutmix}]", "regularizer=[layer_norm,dropout,mc_dropout]", "optimizer=adagrad",
     "data.train_size=70"],  # a short last batch
    ["model=resnet", "model.depth=8", "augmentation=standard", "regularizer=[dropout,stochastic_depth]"],
]


def second_epoch_under(mode, monkeypatch, tmp_path, *overrides) -> list:
    """Run fit for two epochs with its second training epoch inside ``mode()`` (a context manager); the first
    runs unchecked, as per-device constants are made there, once. Returns what the modes yielded."""
    import regbench.run as train

    real, seen = train.train_one_epoch, []

    def checked(*args, **kwargs):
        if not seen:
            seen.append(None)
            return real(*args, **kwargs)
        with mode() as m:
            out = real(*args, **kwargs)
        seen.append(m)
        return out

    monkeypatch.setattr(train, "train_one_epoch", checked)
    fit(compose_cfg(*TINY, "trainer.max_epochs=2", *overrides), tmp_path)
    assert len(seen) == 2
    return seen[1:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("extra", SYNC_FREE_STACKS, ids=lambda e: e[0].split("=")[-1])
def test_cuda_training_steps_never_wait_for_the_device(extra, tmp_path, monkeypatch):
    """fit's training epochs — batches, augmentation, forward, loss, penalties, backward, clipping, decay, step,
    schedule — under torch.cuda.set_sync_debug_mode("error"): any host sync in a step raises."""
    from tests.sync_check import cuda_sync_errors

    second_epoch_under(cuda_sync_errors, monkeypatch, tmp_path, "trainer.device=cuda", *extra)


@pytest.mark.parametrize("extra", SYNC_FREE_STACKS, ids=lambda e: e[0].split("=")[-1])
def test_training_steps_have_no_op_that_would_wait_for_a_gpu(extra, tmp_path, monkeypatch):
    """The CPU stand-in for the CUDA test above: fit's second training epoch under a dispatch mode that
    records every op which would make the host wait for a GPU (tests/sync_check.py) — none may occur.
    RandAugment is switched to its CUDA strategy (every op on the whole batch), so every op is exercised."""
    import regbench.augment.auto as aug
    from tests.sync_check import SyncCheck

    monkeypatch.setattr(aug, "group_by_op", lambda device: False)
    (mode,) = second_epoch_under(SyncCheck, monkeypatch, tmp_path, *extra)
    assert mode.found == [], mode.found


def test_sync_check_sees_what_would_wait_for_a_gpu():
    from tests.sync_check import SyncCheck

    t = torch.randn(10)
    with SyncCheck() as mode:
        t.sum().item()
        torch.nonzero(t)
        t[t > 0]
        torch.tensor([1.0, 2.0])
        t[t > 0] = 0.0  # masked_fill: no sync
        t.index_select(0, torch.arange(3)) * 2.0  # no sync
    assert [f.split(" at ")[0] for f in mode.found] == [
        "aten._local_scalar_dense.default", "aten.nonzero.default", "aten.index.Tensor with a boolean mask",
        "aten.lift_fresh.default"]


def test_a_last_training_batch_of_one_is_dropped_under_batchnorm(tmp_path):
    """65 = 2·32 + 1: batch norm cannot normalise the last batch of one image; it is dropped with a note,
    exactly as data.drop_last=true drops it (same permutation, same batches)."""
    common = [*TINY, "data.train_size=65", "regularizer=[batchnorm]", "trainer.max_epochs=2"]
    fit(compose_cfg(*common), tmp_path / "a")
    fit(compose_cfg(*common, "data.drop_last=true"), tmp_path / "b")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "a")) == strip(read_metrics(tmp_path / "b"))
    s = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert s["steps_per_epoch"] == 2 and s["status"] == "completed"
    assert sum("would hold 1 image (65 = 2·32 + 1)" in w for w in s["warnings"]) == 1
    fit(compose_cfg(*TINY, "data.train_size=65", "trainer.max_epochs=1"), tmp_path / "c")  # no BN: kept
    assert json.loads((tmp_path / "c" / "summary.json").read_text())["steps_per_epoch"] == 3


# ------------------------------------------------------------------------------ a folder that stops taking writes


def test_a_folder_made_read_only_mid_run_says_the_status_was_not_recorded(tmp_path, monkeypatch):
    import errno

    from tests.conftest import writes_fail_after_epoch

    writes_fail_after_epoch(monkeypatch, 1, errno.EROFS)
    with pytest.raises(RegbenchError) as e:
        fit(compose_cfg(*TINY, "trainer.max_epochs=3"), tmp_path / "r")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"cannot write {tmp_path / 'r'}/checkpoints/epoch_0002.pt: "
                                              "Read-only file system; fix: make the run folder writable")
    assert msg.endswith("; the run's status (failed) could not be recorded: summary.json still says 'running' "
                        "(Read-only file system)")
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert (summary["status"], summary["epochs_completed"]) == ("running", 1)  # what the message says


def test_a_file_size_limit_is_named_as_the_fix(tmp_path, monkeypatch):
    import errno
    import resource

    from tests.conftest import writes_fail_after_epoch

    writes_fail_after_epoch(monkeypatch, 1, errno.EFBIG)
    monkeypatch.setattr(resource, "getrlimit", lambda which: (500 * 1024, resource.RLIM_INFINITY))
    with pytest.raises(RegbenchError) as e:
        fit(compose_cfg(*TINY, "trainer.max_epochs=2"), tmp_path / "r")
    assert str(e.value).startswith(
        f"cannot write {tmp_path / 'r'}/checkpoints/epoch_0002.pt: File too large; fix: raise the file-size limit of "
        "the shell that runs regbench (`ulimit -f`, now 500 KiB; e.g. `ulimit -f unlimited`)")
    assert "free disk space" not in str(e.value)
