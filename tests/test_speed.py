"""regbench.speed: a fast path that breaks never breaks a run.

Each private entry point the fast paths call is broken in turn — monkeypatched to raise, or to return something
wrong (wrong bits, wrong shape) — and a default tiny run and its resume both complete, with the metrics of
``trainer.fast_step=false trainer.fused=false`` (to float rounding), one warning line, and summary.json saying
which path ran. The version gate is tested by faking torch's version.
"""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch

from regbench import accel, checkpoint, fastoptim, faststep, speed
from regbench.logs import read_metrics
from regbench.train import fit
from tests.conftest import TINY, compose_cfg

RUN = [*TINY, "trainer.max_epochs=2", "data.train_size=96"]


def _raise(*args, **kwargs):
    raise RuntimeError("simulated break")


def _aten_raise(name):
    return lambda mp: mp.setattr(faststep, name, _raise)


def _fused_adam_noop(*args, **kwargs):  # wrong bits: nothing updated
    return None


def _tb_gone(mp):  # renamed in torch: regbench's calls of it raise (torch's own methods call the new name)
    import sys

    from torch.utils.tensorboard import SummaryWriter

    own = SummaryWriter._get_file_writer

    def renamed(self):
        caller = sys._getframe(1).f_globals.get("__name__")
        return _raise() if caller in ("regbench.logs", "regbench.speed") else own(self)
    mp.setattr(SummaryWriter, "_get_file_writer", renamed)


# name -> (optimizer, the break, step_impl, checkpoint_impl, optimizer_impl) of the broken run
BREAKS = {
    "fused_adam_raises": ("adam", lambda mp: mp.setattr(torch, "_fused_adam_", _raise), "direct", "encoder",
                          "for-loop"),
    "fused_adam_wrong_bits": ("adam", lambda mp: mp.setattr(torch, "_fused_adam_", _fused_adam_noop), "direct",
                              "encoder", "for-loop"),
    "fused_sgd_raises": ("sgd", lambda mp: mp.setattr(torch, "_fused_sgd_", _raise), "direct", "encoder",
                         "for-loop"),
    "threshold_backward_raises": ("adam", _aten_raise("_threshold_backward"), "autograd", "encoder", "fused"),
    "nll_loss_backward_raises": ("adam", _aten_raise("_nll_backward"), "autograd", "encoder", "fused"),
    "log_softmax_backward_raises": ("adam", _aten_raise("_log_softmax_backward"), "autograd", "encoder", "fused"),
    "threshold_backward_wrong_shape": ("adam", lambda mp: mp.setattr(faststep, "_threshold_backward",
                                                                     lambda g, s, t: g[:, :1]),
                                       "autograd", "encoder", "fused"),
    "threshold_backward_wrong_bits": ("adam", lambda mp: mp.setattr(
        faststep, "_threshold_backward", lambda g, s, t: torch.ops.aten.threshold_backward(g, s, t) * 1.0001),
        "autograd", "encoder", "fused"),
    "crc_raises": ("adam", lambda mp: mp.setattr(checkpoint, "fill_zip_crc", _raise), "direct", "torch.save",
                   "fused"),
    "crc_wrong_bits": ("adam", lambda mp: mp.setattr(checkpoint, "fill_zip_crc", lambda data: bytearray(data)),
                       "direct", "torch.save", "fused"),
    "encoder_raises": ("adam", lambda mp: mp.setattr(checkpoint, "encode_checkpoint", _raise), "direct",
                       "torch.save", "fused"),
    "tensorboard_writer_gone": ("adam", _tb_gone, "direct", "encoder", "fused"),
}


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """The plain runs' metrics (fast_step=false fused=false), per optimizer."""
    out = {}
    for opt in ("adam", "sgd"):
        run = tmp_path_factory.mktemp("plain") / opt
        fit(compose_cfg(*RUN, f"optimizer={opt}", "trainer.fast_step=false", "trainer.fused=false"), run)
        out[opt] = _results(run)
    return out


def _results(run):
    summary = json.loads((run / "summary.json").read_text())
    rows = [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in read_metrics(run / "metrics.csv")]
    return rows, summary["test"]


def _close(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-5, abs=1e-7)
    return a == b


def _speed_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "regbench.speed" and r.levelno == logging.WARNING]


def _mark_unfinished_at_epoch_1(run):
    summary = json.loads((run / "summary.json").read_text())
    summary["status"] = "interrupted"
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "checkpoints" / "epoch_0002.pt").unlink()


@pytest.mark.parametrize("name", list(BREAKS))
def test_a_broken_private_entry_point_is_survived_by_a_run_and_its_resume(name, plain, tmp_path, monkeypatch,
                                                                         caplog):
    opt, brk, step_impl, checkpoint_impl, optimizer_impl = BREAKS[name]
    brk(monkeypatch)
    run = tmp_path / "run"
    for resume in (False, True):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            fit(compose_cfg(*RUN, f"optimizer={opt}", *(["trainer.resume=true"] if resume else [])), run)
        lines = _speed_lines(caplog)
        assert len(lines) == 1 and "failed" in lines[0] and "instead for the rest of the run" in lines[0], lines
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["resumed_from_epoch"] == (1 if resume else None)
        assert (summary["step_impl"], summary["checkpoint_impl"], summary["optimizer_impl"]) == \
            (step_impl, checkpoint_impl, optimizer_impl)
        assert [w for w in summary["warnings"] if "instead for the rest of the run" in w] == \
            [lines[0].removeprefix("warning: ")]
        assert _close(_results(run), plain[opt])
        if not resume:
            _mark_unfinished_at_epoch_1(run)


def test_nothing_broken_means_every_fast_path_ran_and_no_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        fit(compose_cfg(*RUN), tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["step_impl"], summary["checkpoint_impl"], summary["optimizer_impl"]) == \
        ("direct", "encoder", "fused")
    assert _speed_lines(caplog) == [] and summary["warnings"] == []


def test_outside_the_tested_torch_versions_the_public_paths_run_with_one_line(plain, tmp_path, monkeypatch,
                                                                              caplog):
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    monkeypatch.setattr(speed, "_gate_logged", set())
    monkeypatch.setattr(accel, "_probe", None)
    with caplog.at_level(logging.WARNING):
        fit(compose_cfg(*RUN), tmp_path)
    lines = _speed_lines(caplog)
    tested = ", ".join(f"{v}.x" for v in speed.TESTED["direct step"])
    assert len(lines) == 1 and f"torch 2.99.0 is not a version regbench's fast paths were tested on ({tested})" in \
        lines[0], lines
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["step_impl"], summary["checkpoint_impl"], summary["optimizer_impl"]) == \
        ("autograd", "torch.save", "for-loop")
    assert _close(_results(tmp_path), plain["adam"])


@pytest.mark.parametrize("version, inside", [("2.14.1", True), ("2.14.0+cpu", True), ("2.14.3", True),
                                             ("2.13.1", False), ("2.15.0a0+git123", False), ("3.0.0", False),
                                             ("garbage", False)])
def test_the_gate_admits_the_tested_minor_versions_only(version, inside, monkeypatch):
    monkeypatch.setattr(torch, "__version__", version)
    monkeypatch.setattr(speed, "_gate_logged", set())
    assert (speed.gate("direct step") is None) == inside


# ------------------------------------------------------------------------- a break after the first-step check


def _mlp_step_pair(*overrides):
    from regbench.models import build_model
    from regbench.regularizers import Context, build_stack

    cfg = compose_cfg("model.hidden=[32,16]", *overrides)
    stack = build_stack(cfg, Context(cfg))
    torch.manual_seed(0)
    model = build_model(cfg.model, (1, 8, 8), 10, stack.slots())
    stack.setup(model)
    return cfg, [model, copy.deepcopy(model)]


def test_a_direct_step_failing_after_its_check_is_redone_by_autograd_from_the_state_before(monkeypatch, caplog):
    """Dropout (the RNG) and batch norm (running statistics) change state in the forward: a backward kernel that
    raises at the third step leaves that step as autograd computes it from the state before."""
    cfg, (ref, fast) = _mlp_step_pair("regularizer=[batchnorm,dropout]", "regularizer.dropout.rate=0.3")
    direct, impl = faststep.plan(fast, torch.nn.functional.cross_entropy, cfg.trainer, torch.device("cpu"))
    assert impl == "direct"
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(12, 1, 8, 8, generator=g), torch.arange(12) % 10
    for step in range(5):
        if step == 2:
            monkeypatch.setattr(faststep, "_threshold_backward", _raise)
        outs = []
        for k, m in enumerate((ref, fast)):
            m.train()
            torch.manual_seed(step)
            if k == 0:
                m.zero_grad(set_to_none=True)
                logits = m(x + step)
                loss = torch.nn.functional.cross_entropy(logits, y)
                loss.backward()
                outs.append((logits.detach(), loss.detach(), torch.get_rng_state()))
            else:
                with caplog.at_level(logging.WARNING):
                    logits, loss, _ = direct(x + step, y, None)
                outs.append((logits, loss, torch.get_rng_state()))
        assert all(torch.equal(a, b) for a, b in zip(*outs))
        assert all(torch.equal(a.grad, b.grad) for a, b in zip(ref.parameters(), fast.parameters()))
        assert all(torch.equal(a, b) for a, b in zip(ref.buffers(), fast.buffers()))
        assert direct.checked == (step < 2) and direct.path.on == (step < 2)
    assert len(_speed_lines(caplog)) == 1


def test_a_kernel_failing_after_its_check_leaves_the_unstepped_groups_to_optimizer_step(monkeypatch):
    """Two parameter groups; the kernel raises for the second at the fourth step: the first group's direct
    update stands, the second is stepped by optimizer.step() alone, its step counters counted once."""
    models, opts = [], []
    for _ in range(2):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
        models.append(m)
        opts.append(torch.optim.Adam([{"params": m[0].parameters()}, {"params": m[2].parameters(),
                                                                       "weight_decay": 0.1}], lr=0.01, fused=True))
    direct = fastoptim.DirectAdam(opts[1])
    real, armed = torch._fused_adam_, []

    def second_group_breaks(*args, **kwargs):
        if armed:
            armed.append(1)
            if len(armed) == 3:  # the direct call's second group (the first: 2)
                raise RuntimeError("simulated break")
        return real(*args, **kwargs)
    monkeypatch.setattr(torch, "_fused_adam_", second_group_breaks)
    for step in range(6):  # 0: optimizer.step() (the state), 1: the check, 2: direct, 3: the break, 4-5: plain
        for m in models:
            g = torch.Generator().manual_seed(step)
            for p in m.parameters():
                p.grad = torch.randn(p.shape, generator=g)
        opts[0].step()
        armed[:] = [1] if step == 3 else []
        direct()
        armed.clear()
    assert not direct.path.on
    state = lambda o: [t for s in o.state.values() for t in s.values()]  # noqa: E731
    for a, b in zip(list(models[0].parameters()) + state(opts[0]), list(models[1].parameters()) + state(opts[1])):
        assert torch.equal(a, b)
