"""regbench.accel: the optimizer implementation (trainer.fused) and torch.compile (trainer.compile).

Exactness against the unfused path: plain SGD (no momentum) is bitwise equal fused and unfused; every other
fused optimizer (Adam, AdamW, Adagrad, SGD with momentum / Nesterov) agrees to float32 rounding (F32_REL),
with each step-touching regularizer and with a GradScaler stepping the fused optimizer.
"""

from __future__ import annotations

import functools
import json
import tempfile

import pytest
import torch

from regbench import accel
from regbench.cli import CONFIG_DIR
from regbench.data import batches
from regbench.checkpoint import load_checkpoint
from regbench.models import build_model
from regbench.optim import build_optimizer
from regbench.regularizers import Context, build_stack
from regbench.loop import AutogradStep, train_one_epoch
from regbench.train import fit
from tests.conftest import F32_REL, TINY, compose_cfg

OPTIMIZERS = sorted(p.stem for p in (CONFIG_DIR / "optimizer").glob("*.yaml"))
# torch 2.14 has fused CPU kernels for these torch.optim classes (RMSprop has none: it runs torch's for-loop).
FUSED_ON_CPU = {"Adam", "AdamW", "SGD", "Adagrad"}
STEP_REGULARIZERS = {  # every regularizer that acts between backward and the optimizer's update
    "none": [],
    "decoupled_decay": ["regularizer=[weight_decay]"],
    "coupled_decay": ["regularizer=[weight_decay]", "regularizer.weight_decay.mode=coupled"],
    "torch_decay": ["optimizer.weight_decay=0.01"],
    "grad_clip": ["regularizer=[grad_clip]", "regularizer.grad_clip.max=0.1"],
}


@functools.lru_cache(maxsize=None)
def _compose(*overrides: str):
    return compose_cfg(*overrides)  # composing is most of a tiny training's time; the config is only read


def _weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _train(optimizer: str, fused: bool, overrides: list[str], scaler: bool = False) -> tuple[torch.Tensor, str]:
    """Two epochs of the lecture MLP (784-128-128-64-10) on 48 random images, batch 16."""
    cfg = _compose(f"optimizer={optimizer}", "model.hidden=[128,128,64]", *overrides)
    stack = build_stack(cfg, Context(cfg))
    torch.manual_seed(0)
    model = build_model(cfg.model, (1, 28, 28), 10, stack.slots())
    stack.setup(model)
    opt = build_optimizer(cfg.optimizer, stack.param_groups(model, cfg.optimizer), fused=fused)
    grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12) if scaler else None
    x, y = torch.randn(48, 1, 28, 28, generator=torch.Generator().manual_seed(1)), torch.arange(48) % 10
    for epoch in range(2):
        step = AutogradStep(model, opt, penalty_fn=stack.penalty_fn(), before_step=stack.before_step_fn(),
                            scaler=grad_scaler)
        train_one_epoch(step, batches(x, y, 16, torch.Generator().manual_seed(epoch)))
    return _weights(model), accel.optimizer_impl(opt)


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = F32_REL) -> bool:
    """Equal to float32 rounding: the largest difference relative to the largest weight."""
    return bool((a - b).abs().max() <= rel * a.abs().max())


# ------------------------------------------------------------------------------ which implementation


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_runs_its_fastest_implementation_on_cpu(name):
    cfg = compose_cfg(f"optimizer={name}")
    params = [torch.nn.Parameter(torch.ones(3, 2))]
    fast, default = build_optimizer(cfg.optimizer, params, fused=True), build_optimizer(cfg.optimizer, params)
    assert accel.optimizer_impl(fast) == ("fused" if type(fast).__name__ in FUSED_ON_CPU else "for-loop")
    assert accel.optimizer_impl(default) == "for-loop"  # torch's own choice on CPU, what regbench ran before


def test_the_table_agrees_with_torchs_kernels():
    for cls in (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad, torch.optim.RMSprop):
        assert accel.has_fused(cls, "cpu") == (cls.__name__ in FUSED_ON_CPU)
        assert accel.has_foreach(cls, "cuda") and not accel.has_foreach(cls, "cpu")
    assert accel.implementation(torch.optim.Adam, [torch.zeros(2, dtype=torch.int64)], True) == {}  # not float




# ----------------------------------------------------------------------------- exact against unfused


@pytest.mark.parametrize("stack", STEP_REGULARIZERS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fused_step_equals_the_unfused_one(name, stack):
    overrides = STEP_REGULARIZERS[stack]
    if name == "adamw" and stack.endswith("_decay") and stack != "torch_decay":
        overrides = overrides + ["optimizer.weight_decay=0"]  # the member owns the decay (adamw's default is 0.01)
    plain, plain_impl = _train(name, False, overrides)
    fast, fast_impl = _train(name, True, overrides)
    assert plain_impl == "for-loop" and fast_impl in ("fused", "for-loop")
    if fast_impl == "for-loop" or (name == "sgd" and stack in ("none", "grad_clip", "decoupled_decay")):
        assert torch.equal(plain, fast)  # the same kernels; fused plain SGD is the for-loop's one multiply-add
    else:
        assert _close(plain, fast)


@pytest.mark.parametrize("name", ["adam", "momentum", "adagrad"])
def test_grad_scaler_steps_the_fused_optimizer_with_its_unscaled_gradients(name):
    # Scaled by 2**12 and unscaled inside the fused kernel (or by grad_clip's unscale_ first): the same weights
    # as without scaling (a power of two scales exactly), and those of the unfused path to rounding.
    for stack in ("none", "grad_clip"):
        scaled, impl = _train(name, True, STEP_REGULARIZERS[stack], scaler=True)
        assert impl == "fused" and torch.equal(scaled, _train(name, True, STEP_REGULARIZERS[stack])[0])
        assert _close(scaled, _train(name, False, STEP_REGULARIZERS[stack], scaler=True)[0])


# --------------------------------------------------------------------------------- resume across them


def test_a_checkpoint_loads_into_the_other_implementation():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    cfg = compose_cfg("optimizer=adam").optimizer
    plain = build_optimizer(cfg, [w])
    w.grad = torch.tensor([0.5, 0.5, -1.0])
    plain.step()
    fast = build_optimizer(cfg, [w], fused=True)
    fast.load_state_dict(plain.state_dict())
    assert accel.optimizer_impl(fast) == "fused"  # torch alone would have taken the checkpoint's fused=None
    assert fast.state[w]["step"].dtype == torch.float32 and torch.equal(fast.state[w]["exp_avg"], 0.1 * w.grad)
    fast.step()
    back = build_optimizer(cfg, [w])
    back.load_state_dict(fast.state_dict())
    assert accel.optimizer_impl(back) == "for-loop" and back.state[w]["step"].item() == 2
    back.step()


SMALL = [*TINY, "data.train_size=128", "trainer.max_epochs=4", "model.hidden=[32]"]


def _stop_after_epoch(monkeypatch, epoch: int):
    import regbench.run as train

    def fault(point, at, settle=None):
        if point == "after_summary" and at == epoch:
            if settle is not None:
                settle()  # as the real hook does before it acts
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "fault_point", fault)


def _final(run_dir):
    s = json.loads((run_dir / "summary.json").read_text())
    return s, load_checkpoint(run_dir / "checkpoints" / "last.pt")


def test_the_default_config_runs_fused_and_records_it(tmp_path):
    # Early stopping restores its best weights at the end: the same epoch's, to rounding, either way.
    stop = ["regularizer=[early_stopping]", "regularizer.early_stopping.patience=1"]
    fit(compose_cfg(*SMALL, *stop), tmp_path / "fast")
    fit(compose_cfg(*SMALL, *stop, "trainer.fused=false"), tmp_path / "plain")
    (fast, f_ckpt), (plain, p_ckpt) = _final(tmp_path / "fast"), _final(tmp_path / "plain")
    assert (fast["optimizer_impl"], plain["optimizer_impl"]) == ("fused", "for-loop")  # default optimizer: Adam
    assert fast["compile"] == plain["compile"] == "none" and fast["channels_last"] is False
    assert fast["best"]["epoch"] == plain["best"]["epoch"] and fast["epochs_completed"] == plain["epochs_completed"]
    assert _close(torch.tensor(fast["test"]["loss"]), torch.tensor(plain["test"]["loss"]))
    for k, v in p_ckpt["model"].items():
        assert _close(v, f_ckpt["model"][k], rel=16 * F32_REL)


@pytest.mark.parametrize("before,after", [("false", "true"), ("true", "false")])
def test_resume_across_implementations(before, after, tmp_path, monkeypatch):
    stack = ["regularizer=[weight_decay,grad_clip,early_stopping]", "regularizer.early_stopping.patience=1"]
    fit(compose_cfg(*SMALL, *stack, f"trainer.fused={after}"), tmp_path / "whole")
    with monkeypatch.context() as m:
        _stop_after_epoch(m, 2)
        with pytest.raises(KeyboardInterrupt):
            fit(compose_cfg(*SMALL, *stack, f"trainer.fused={before}"), tmp_path / "split")
    fit(compose_cfg(*SMALL, *stack, f"trainer.fused={after}"), tmp_path / "split", resume=True)
    (whole, w_ckpt), (split, s_ckpt) = _final(tmp_path / "whole"), _final(tmp_path / "split")
    assert split["optimizer_impl"] == ("fused" if after == "true" else "for-loop")
    assert bool(s_ckpt["optimizer"]["param_groups"][0]["fused"]) == (after == "true")
    # Early stopping's restored weights and the test metrics: those of the run that never stopped, to rounding.
    assert split["best"]["epoch"] == whole["best"]["epoch"] and split["epochs_completed"] == whole["epochs_completed"]
    assert _close(torch.tensor(split["test"]["loss"]), torch.tensor(whole["test"]["loss"]))
    for k, v in w_ckpt["model"].items():
        assert _close(v, s_ckpt["model"][k], rel=16 * F32_REL)


# -------------------------------------------------------------------------------------------- compile


def test_cache_lives_in_the_users_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert accel.use_cache() == (tmp_path / "regbench" / "inductor", None)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert accel.use_cache() == (tmp_path / "mine", None)  # the user's own choice wins
    assert (tmp_path / "mine").stat().st_mode & 0o777 == 0o700


def test_no_cxx_compiler_falls_back_to_eager_with_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(accel, "_cxx", lambda: None)
    fit(compose_cfg(*TINY, "trainer.compile=model", "trainer.fused=false"), tmp_path / "fallback")
    fit(compose_cfg(*TINY, "trainer.fused=false"), tmp_path / "eager")
    s, eager = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("fallback", "eager"))
    msg = "trainer.compile=model falls back to eager: no C++ compiler found"
    assert s["compile"] == "none" and sum(msg in w for w in s["warnings"]) == 1
    assert sum(msg in r.getMessage() for r in caplog.records) == 1
    assert s["test"] == eager["test"]  # eager is eager: bitwise the run without compile


@pytest.mark.slow
def test_compiled_runs_rerun_and_resume_bitwise(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # torch's <tempdir>/torchinductor_<user>
    (tmp_path / "tmp").mkdir()
    run = [*SMALL, "trainer.compile=model"]
    fit(compose_cfg(*run), tmp_path / "a")
    fit(compose_cfg(*run), tmp_path / "b")
    with monkeypatch.context() as m:
        _stop_after_epoch(m, 2)
        with pytest.raises(KeyboardInterrupt):
            fit(compose_cfg(*run), tmp_path / "c")
    fit(compose_cfg(*run), tmp_path / "c", resume=True)
    (a, ca), (b, cb), (c, cc) = (_final(tmp_path / d) for d in "abc")
    assert a["compile"] == "model" and a["warnings"] == []
    for other, ckpt in ((b, cb), (c, cc)):
        assert other["test"] == a["test"]
        assert {k: v for k, v in other["final"].items() if k != "epoch_time_s"} == \
               {k: v for k, v in a["final"].items() if k != "epoch_time_s"}
        assert all(torch.equal(ca["model"][k], ckpt["model"][k]) for k in ca["model"])
    assert any((tmp_path / "cache" / "regbench" / "inductor").rglob("*"))  # the persistent cache was written
    assert not list((tmp_path / "tmp").glob("torchinductor_*"))  # nothing in the shared temporary folder


@pytest.mark.slow
def test_compiled_step_trains_like_eager(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    fit(compose_cfg(*SMALL, "trainer.compile=step"), tmp_path / "step")
    fit(compose_cfg(*SMALL), tmp_path / "eager")
    (s, cs), (e, ce) = _final(tmp_path / "step"), _final(tmp_path / "eager")
    assert s["compile"] == "step" and s["optimizer_impl"] == "fused"
    assert s["best"]["epoch"] == e["best"]["epoch"]
    for k, v in ce["model"].items():
        assert _close(v, cs["model"][k], rel=16 * F32_REL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_compiled_step_uses_cuda_graphs_and_fused_adam(tmp_path):
    assert accel.compile_mode(torch.device("cuda"), "step") == "reduce-overhead"
    assert accel.compile_mode(torch.device("cuda"), "model") is None
    fit(compose_cfg(*SMALL, "trainer.device=cuda", "trainer.compile=step"), tmp_path)
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["compile"] == "step" and s["optimizer_impl"] == "fused" and s["status"] == "completed"


def test_compile_mode_on_cpu_is_the_default():
    assert accel.compile_mode(torch.device("cpu"), "step") is None


# ---------------------------------------------------------------------------------- the benchmark script


def _bench():
    import importlib.util

    from tests.conftest import REPO

    spec = importlib.util.spec_from_file_location("bench_step", REPO / "scripts" / "bench_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_step_arguments(capsys):
    bench = _bench()
    quick = bench.parse_args(["--quick"])
    assert (quick.epochs, quick.repetitions, quick.contenders) == (3, 1, list(bench.QUICK))
    full = bench.parse_args([])
    assert (full.epochs, full.repetitions) == (20, 5) and "keras" in full.contenders
    assert bench.parse_args(["--quick", "--contenders", "keras", "--epochs", "4"]).contenders == ["keras"]
    assert set(bench.REGBENCH_ARGS) <= set(bench.CONTENDERS)
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--epochs", "1"])
    assert e.value.code == 2 and "--epochs must be >= 2" in capsys.readouterr().err
    assert bench.steady([9.0, 1.0, 3.0, 2.0]) == 2.0  # epoch 1 (compilation, warm-up) is left out
    default = bench.parse_args(["--default-experiment"])
    assert default.experiment == bench.DEFAULT and default.contenders == list(bench.DEFAULT_CONTENDERS)
    with pytest.raises(SystemExit):
        bench.parse_args(["--default-experiment", "--contenders", "keras"])
    assert full.base == "minimal" and default.base == "regbench_unfused"
    assert bench.parse_args(["--contenders", "regbench", "keras"]).base == "keras"
    with pytest.raises(SystemExit):
        bench.parse_args(["--contenders", "regbench", "--base", "keras"])
    run = {"epochs": [1.0, 0.2, 0.2], "run_s": 1.4, "impl": "fused", "step": "direct", "compile": "none",
           "train": 0.18, "overhead": 0.1, "outside": 0.01}
    lines = bench.table({"minimal": [{"epochs": [1.0, 0.4, 0.4], "run_s": 1.8}], "regbench": [run]},
                        "minimal").splitlines()
    assert lines[0].split(" | ")[1:3] == ["s / epoch (epochs 2..N)", "vs minimal"]
    assert lines[3] == ("| regbench (fused, direct step, compile none) | 0.200 | 0.50 | 1.00 | 1.4 | 0.180 | 10.0 % (10.0) "
                        "| 0.010 |")  # overhead: median (range) over repetitions
    two = {"minimal": [{"epochs": [1.0, 0.4, 0.4], "run_s": 1.8}, {"epochs": [1.0, 0.5, 0.5], "run_s": 1.8},
                       {"epochs": [1.0, 0.4, 0.4], "run_s": 1.8}], "regbench": [run, run, run]}
    assert bench.table(two, "minimal").splitlines()[3].split(" | ")[2] == "0.50 (0.40–0.50)"  # median (range)


def test_channels_last_only_for_convolutions_on_cuda():
    cnn = build_model(compose_cfg("model=lecture_cnn").model, (3, 32, 32), 10)
    mlp = build_model(compose_cfg().model, (1, 28, 28), 10)
    assert accel.wants_channels_last(cnn, torch.device("cuda"))
    assert not accel.wants_channels_last(cnn, torch.device("cpu")) and not accel.wants_channels_last(
        mlp, torch.device("cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_cnn_runs_channels_last_under_amp(tmp_path):
    fit(compose_cfg(*TINY, "model=lecture_cnn", "trainer.device=cuda", "trainer.amp=bf16"), tmp_path)
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["channels_last"] and s["optimizer_impl"] == "fused" and s["status"] == "completed"
    w = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["model"]
    assert any(v.ndim == 4 and v.is_contiguous(memory_format=torch.channels_last) for v in w.values())


def test_a_run_saved_before_trainer_fused_reruns_unfused(tmp_path):
    from regbench.cli import main

    fit(compose_cfg(*TINY, "trainer.fused=false"), tmp_path / "old")
    saved = tmp_path / "old" / ".hydra" / "config.yaml"
    saved.parent.mkdir(exist_ok=True)
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(compose_cfg(*TINY, "trainer.fused=false"))
    del cfg["trainer"]["fused"], cfg["trainer"]["compile"]  # as regbench wrote it before issue 17
    saved.write_text(OmegaConf.to_yaml(cfg))
    main(["rerun", str(tmp_path / "old"), f"hydra.run.dir={tmp_path}/again"])
    again, old = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("again", "old"))
    assert again["optimizer_impl"] == "for-loop" and again["test"] == old["test"]  # bitwise what the run computed
