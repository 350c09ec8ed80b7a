"""regbench.faststep: the direct step (forward and backward without the autograd engine) against autograd.

Both paths run the same ATen kernels in the same order on the same machine, so the comparisons are bitwise
(``torch.equal``) on any CPU: gradients of every layer kind, both dropout placements, the losses (plain
cross-entropy by hand; label smoothing and soft targets through autograd on the logits), the penalties, the
global RNG after the step, and whole runs through the CLI.
"""

from __future__ import annotations

import csv
import functools
import json

import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

from regbench import fastoptim, faststep
from regbench.data import batches
from regbench.models import build_model
from regbench.optim import build_optimizer
from regbench.regularizers import Context, build_stack
from regbench.loop import AutogradStep, DirectStep, train_one_epoch
from regbench.train import fit
from tests.conftest import TINY, compose_cfg

ACTIVATIONS = ["relu", "leaky_relu", "elu", "sigmoid", "tanh"]


@functools.lru_cache(maxsize=None)
def _compose(*overrides: str):
    return compose_cfg(*overrides)


def _setup(*overrides: str):
    cfg = _compose("model.hidden=[32,16]", *overrides)
    stack = build_stack(cfg, Context(cfg))
    torch.manual_seed(0)
    model = build_model(cfg.model, (1, 8, 8), 10, stack.slots())
    stack.setup(model)
    loss_fn = functools.partial(F.cross_entropy, **stack.loss_options()) if stack.loss_options() else F.cross_entropy
    return cfg, stack, model, loss_fn


def _batch(soft: bool = False):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, 1, 8, 8, generator=g)
    y = torch.arange(12) % 10
    if soft:  # MixUp-like targets: two classes mixed per sample
        y = 0.7 * F.one_hot(y, 10).float() + 0.3 * F.one_hot((y + 3) % 10, 10).float()
    return x, y


def _autograd_step(model, loss_fn, penalty_fn, x, y):
    model.zero_grad(set_to_none=True)
    logits = model(x)
    loss = loss_fn(logits, y)
    penalty = penalty_fn(model) if penalty_fn else None
    (loss + penalty if penalty is not None else loss).backward()
    return logits.detach(), loss.detach(), [p.grad for p in model.parameters()]


def _direct_step(model, loss_fn, penalty_fn, x, y):
    direct, impl = faststep.plan(model, loss_fn, _compose().trainer, torch.device("cpu"))
    assert impl == "direct", impl
    for p in model.parameters():
        p.grad = None
    logits, loss, _ = direct(x, y, penalty_fn)
    # the first step ran both ways and returned autograd's results: they agreed bit for bit (else the direct
    # step would be off); the direct step alone from the second step on (the whole-run tests below)
    assert direct.checked and direct.path.on
    return logits, loss, [p.grad for p in model.parameters()]


def _same_step(overrides: tuple, soft: bool = False):
    _, stack, model, loss_fn = _setup(*overrides)
    model.train()
    x, y = _batch(soft)
    torch.manual_seed(11)
    a = _autograd_step(model, loss_fn, stack.penalty_fn(), x, y)
    rng_a = torch.get_rng_state()
    torch.manual_seed(11)
    b = _direct_step(model, loss_fn, stack.penalty_fn(), x, y)
    assert torch.equal(rng_a, torch.get_rng_state())  # dropout drew the same masks
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for ga, gb in zip(a[2], b[2]):
        assert ga is not None and torch.equal(ga, gb) and ga.stride() == gb.stride()


# ------------------------------------------------------------------------------------------ gradients


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradients_equal_autograds_for_every_activation(activation):
    _same_step((f"model.activation={activation}",))


@pytest.mark.parametrize("placement", ["after_activation", "before_activation"])
def test_dropout_masks_and_gradients_equal_autograds(placement):
    _same_step(("regularizer=[dropout]", "regularizer.dropout.rate=0.3",
                f"regularizer.dropout.placement={placement}", "model.activation=elu"))
    _same_step(("regularizer=[dropout]", "regularizer.dropout.rate=[0.5,0.1]"))


@pytest.mark.parametrize("stack", [["regularizer=[l2]"], ["regularizer=[l1,l2]"], ["regularizer=[elastic_net]"],
                                   ["regularizer=[l2,dropout]", "regularizer.l2.lam=0.01"]])
def test_penalty_gradients_add_as_autograds_buffer_adds_them(stack):
    _same_step(tuple(stack))


def test_label_smoothing_and_soft_targets_go_through_autograd_on_the_logits():
    _same_step(("regularizer=[label_smoothing]",))
    _same_step((), soft=True)
    _same_step(("regularizer=[label_smoothing]",), soft=True)


@pytest.mark.parametrize("variant", ["default", "cumulative", "frozen", "no_affine", "dropout"])
def test_batch_norm_steps_equal_autograds_with_their_running_statistics(variant):
    """BatchNorm1d: forward, backward and the running statistics (and num_batches_tracked) over three steps."""
    import copy

    extra = ("regularizer=[batchnorm,dropout]", "regularizer.dropout.rate=0.2") if variant == "dropout" else \
        ("regularizer=[batchnorm]",)
    _, stack, model, loss_fn = _setup(*extra, "model.activation=tanh")
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(bns) == 2
    if variant == "cumulative":
        bns[0].momentum = None
    if variant == "no_affine":  # no weight and bias (not something regbench builds; torch's other branch)
        bns[1].weight, bns[1].bias = None, None
    models = [model, copy.deepcopy(model)]
    direct, impl = faststep.plan(models[1], loss_fn, _compose().trainer, torch.device("cpu"))
    assert impl == "direct", impl
    x, y = _batch()
    for step in range(3):
        outs = []
        for k, m in enumerate(models):
            m.train()
            if variant == "frozen":
                [b for b in m.modules() if isinstance(b, torch.nn.BatchNorm1d)][0].eval()  # running statistics
            torch.manual_seed(step)
            if k == 0:
                outs.append(_autograd_step(m, loss_fn, None, x + step, y))
            else:
                for q in m.parameters():
                    q.grad = None
                logits, loss, _ = direct(x + step, y, None)
                outs.append((logits, loss, [q.grad for q in m.parameters()]))
        (la, lossa, ga), (lb, lossb, gb) = outs
        assert torch.equal(la, lb) and torch.equal(lossa, lossb)
        assert all(torch.equal(a, b) for a, b in zip(ga, gb))
        for a, b in zip(models[0].buffers(), models[1].buffers()):
            assert torch.equal(a, b)  # running mean and variance, num_batches_tracked
        assert direct.checked and direct.path.on  # steps 2 and 3: the direct step alone


def test_a_batch_of_one_is_refused_as_torch_refuses_it():
    _, _, model, loss_fn = _setup("regularizer=[batchnorm]")
    direct, _ = faststep.plan(model, loss_fn, _compose().trainer, torch.device("cpu"))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        direct(torch.randn(1, 1, 8, 8), torch.tensor([3]), None)


# ------------------------------------------------------------------------------------------- whole runs


def _weights_after(fast: bool, *overrides: str) -> torch.Tensor:
    cfg, stack, model, loss_fn = _setup(*overrides)
    opt = build_optimizer(cfg.optimizer, stack.param_groups(model, cfg.optimizer), fused=True)
    direct = faststep.plan(model, loss_fn, cfg.trainer, torch.device("cpu"))[0] if fast else None
    assert (direct is not None) == fast
    x, y = torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.arange(40) % 10
    torch.manual_seed(5)
    sums = []
    for epoch in range(2):
        hooks = {"penalty_fn": stack.penalty_fn(), "before_step": stack.before_step_fn()}
        step = DirectStep(direct, model, opt, **hooks) if fast else AutogradStep(model, opt, loss_fn=loss_fn, **hooks)
        out = train_one_epoch(step, batches(x, y, 8, torch.Generator().manual_seed(epoch)))
        sums += [out["loss"], out["correct"]] + ([out["penalty"]] if out["penalty"] is not None else [])
    return torch.cat([p.detach().flatten() for p in model.parameters()] + [s.reshape(1).float() for s in sums])


@pytest.mark.parametrize("stack", [[], ["regularizer=[dropout,l2,grad_clip]"], ["regularizer=[weight_decay]"],
                                   ["regularizer=[label_smoothing,l1]", "optimizer=sgd"],
                                   ["regularizer=[batchnorm,dropout,l2]"]])
def test_training_epochs_equal_autograds_bitwise(stack):
    assert torch.equal(_weights_after(True, *stack), _weights_after(False, *stack))


@pytest.mark.parametrize("stack", ["regularizer=[dropout,l2]", "regularizer=[batchnorm,dropout]"])
def test_a_run_is_bitwise_the_autograd_run_and_says_which_step_ran(tmp_path, stack):
    common = [*TINY, stack, "trainer.max_epochs=2"]
    for fast in ("true", "false"):
        fit(compose_cfg(*common, f"trainer.fast_step={fast}"), tmp_path / fast)
    summaries = {f: json.loads((tmp_path / f / "summary.json").read_text()) for f in ("true", "false")}
    assert summaries["true"]["step_impl"] == "direct" and summaries["false"]["step_impl"] == "autograd"
    assert summaries["true"]["test"] == summaries["false"]["test"]
    rows = []
    for f in ("true", "false"):
        with open(tmp_path / f / "metrics.csv") as fh:
            rows.append([{k: v for k, v in r.items() if k != "epoch_time_s"} for r in csv.DictReader(fh)])
    assert len(rows[0]) == 2 and rows[0] == rows[1]  # every metric of every epoch, to the last digit


# ----------------------------------------------------------------------------------------- where it applies


@pytest.mark.parametrize("overrides, why", [
    (["trainer.fast_step=false"], "trainer.fast_step=false"),
    (["trainer.compile=model"], "trainer.compile=model"),
    (["trainer.amp=bf16"], "trainer.amp=bf16"),
    (["regularizer=[layer_norm]"], "layer LayerNorm"),
])
def test_other_models_and_settings_train_through_autograd(overrides, why):
    cfg, _, model, loss_fn = _setup(*overrides)
    direct, impl = faststep.plan(model, loss_fn, cfg.trainer, torch.device("cpu"))
    assert direct is None and impl == f"autograd: {why}"


def test_conv_models_gpus_hooks_and_frozen_layers_train_through_autograd():
    cfg, _, model, loss_fn = _setup()
    t = cfg.trainer
    assert faststep.plan(model, loss_fn, t, torch.device("cuda"))[1].startswith("autograd: device cuda")
    conv = build_model(_compose("model=lecture_cnn").model, (1, 28, 28), 10)
    assert faststep.plan(conv, loss_fn, t, torch.device("cpu"))[1] == \
        f"autograd: model {type(conv).__name__} (the direct step covers regbench's mlp)"
    handle = model.head.register_forward_hook(lambda *a: None)
    assert faststep.plan(model, loss_fn, t, torch.device("cpu"))[1] == "autograd: hooks or parametrizations on head"
    handle.remove()
    model.head.weight.requires_grad_(False)
    assert faststep.plan(model, loss_fn, t, torch.device("cpu"))[1] == "autograd: frozen parameter head.weight"
    model.head.weight.requires_grad_(True)
    assert faststep.plan(model.double(), loss_fn, t, torch.device("cpu"))[1] == \
        "autograd: parameters that are not float32"


# ------------------------------------------------------------------------------------- the direct Adam step


def _adam_pair(cls=torch.optim.AdamW, fused=True, **kw):
    """Two identical models with an optimizer each (two parameter groups, different weight decay)."""
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)))
    opts = [cls([{"params": m[0].parameters()}, {"params": m[2].parameters(), "weight_decay": 0.0}],
                lr=0.01, weight_decay=0.1, fused=fused, **kw) for m in models]
    return models, opts


def _grads(models, step):
    g = torch.Generator().manual_seed(step)
    for m in models:
        g.manual_seed(step)
        for p in m.parameters():
            p.grad = torch.randn(p.shape, generator=g)


def _state(opt):
    return [t for s in opt.state.values() for t in s.values()]


def _count_steps(opt) -> list:
    """Count ``opt.step()`` calls by a wrapper that looks and acts like an LR scheduler's (so the direct step
    applies, and a schedule created on ``opt`` afterwards keeps it)."""
    calls, step = [], opt.step

    def counted(*a):
        calls.append(1)
        opt._opt_called = True
        return step(*a)
    opt.step = counted
    opt.step._wrapped_by_lr_sched, opt.step.__wrapped__ = True, type(opt).step
    return calls


def _steps_with_schedules(models, opts, direct, change_after_2nd=None, steps=5):
    """``steps`` steps of the reference optimizer and the direct one, each with a StepLR; ``change_after_2nd(opt)``
    edits both optimizers after the second step."""
    scheds = [torch.optim.lr_scheduler.StepLR(o, 2, 0.5) for o in opts]
    for i in range(steps):
        _grads(models, i)
        opts[0].step()
        direct()
        for sched in scheds:
            sched.step()
        if i == 1 and change_after_2nd is not None:
            for opt in opts:
                change_after_2nd(opt)


@pytest.mark.parametrize("cls, kw", [(torch.optim.Adam, {}), (torch.optim.AdamW, {}),
                                     (torch.optim.Adam, {"amsgrad": True, "maximize": True}),
                                     (torch.optim.Adam, {"decoupled_weight_decay": True, "betas": (0.8, 0.95)})])
def test_the_direct_adam_step_is_the_fused_kernel_call_bitwise(cls, kw):
    (ref, fast), (opt_ref, opt_fast) = _adam_pair(cls, **kw)
    calls = _count_steps(opt_fast)

    def counters_at_2_24(opt):  # step counters where float32 stops counting (2^24): both add 1 the same way
        for state in opt.state.values():
            state["step"].fill_(2.0 ** 24 - 2)
    direct = fastoptim.DirectAdam(opt_fast)
    _steps_with_schedules((ref, fast), (opt_ref, opt_fast), direct, counters_at_2_24)
    # only the first step (it creates the state) and the second (the first direct call, checked against
    # optimizer.step(), which steps) went through optimizer.step(); the direct call ran steps 3-5
    assert calls == [1, 1] and direct.checked and direct.path.on
    for a, b in zip(list(ref.parameters()) + _state(opt_ref), list(fast.parameters()) + _state(opt_fast)):
        assert torch.equal(a, b)


def test_the_direct_adam_step_continues_a_loaded_state_and_keeps_the_schedule_quiet(recwarn):
    (ref, fast), (opt_ref, opt_fast) = _adam_pair()
    for i in range(2):
        _grads((ref, fast), i)
        opt_ref.step()
        opt_fast.step()
    # a resume: a new optimizer loads the state; the direct call runs from its first step, and the schedule
    # created on it does not warn that step() was never called
    torch.manual_seed(0)
    resumed = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    resumed.load_state_dict(fast.state_dict())
    opt = torch.optim.AdamW([{"params": resumed[0].parameters()}, {"params": resumed[2].parameters(),
                                                                   "weight_decay": 0.0}], lr=0.01, fused=True)
    opt.load_state_dict(opt_fast.state_dict())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    direct = fastoptim.DirectAdam(opt)
    for i in range(2, 5):
        _grads((ref, resumed), i)
        opt_ref.step()
        direct()
        sched.step()
    assert not [w for w in recwarn if "lr_scheduler" in str(w.message)]
    for a, b in zip(list(ref.parameters()) + _state(opt_ref), list(resumed.parameters()) + _state(opt)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", ["unfused", "sgd", "pre_hook", "global_hook", "no_grad", "tensor_lr", "wrapped"])
def test_the_direct_adam_step_leaves_anything_else_to_optimizer_step(case):
    cls = torch.optim.SGD if case == "sgd" else torch.optim.AdamW
    kw = {"momentum": 0.9} if case == "sgd" else {}
    (ref, fast), (opt_ref, opt_fast) = _adam_pair(cls, fused=case != "unfused", **kw)
    hooked = []
    for opt in (opt_ref, opt_fast):
        if case == "pre_hook":
            opt.register_step_pre_hook(lambda *a: hooked.append(1))
        if case == "tensor_lr":
            opt.param_groups[0]["lr"] = torch.tensor(0.01)
        if case == "wrapped":  # wrapped by something that is not an LR scheduler
            step = opt.step
            opt.step = lambda *a, step=step: hooked.append(1) or step(*a)
    if case not in ("pre_hook", "wrapped"):  # count the calls, wrapped as an LR scheduler wraps step()
        hooked = _count_steps(opt_fast)
    direct = fastoptim.DirectAdam(opt_fast)
    handle = register_optimizer_step_post_hook(lambda *a: hooked.append(1)) \
        if case == "global_hook" else None
    try:
        for i in range(3):
            _grads((ref, fast), i)
            if case == "no_grad":
                ref[2].bias.grad = fast[2].bias.grad = None
            opt_ref.step()
            direct()
    finally:
        if handle is not None:
            handle.remove()
    # every step through optimizer.step() (a global hook: both optimizers' steps, and the counting wrapper)
    assert len(hooked) == {"pre_hook": 6, "wrapped": 6, "global_hook": 9}.get(case, 3)
    for a, b in zip(list(ref.parameters()) + _state(opt_ref), list(fast.parameters()) + _state(opt_fast)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("change", ["clear", "pop", "replace_state", "replace_exp_avg", "swap_params", "unfuse"])
def test_the_direct_adam_step_never_steps_stale_lists(change):
    """What replaces the optimizer's objects between two direct steps is seen at the next one."""
    (ref, fast), (opt_ref, opt_fast) = _adam_pair()
    direct = fastoptim.DirectAdam(opt_fast)
    for i in range(4):
        _grads((ref, fast), i)
        opt_ref.step()
        direct()
        if i != 1:
            continue
        for opt, model in ((opt_ref, ref), (opt_fast, fast)):
            w = model[0].weight
            if change == "clear":
                opt.state.clear()
            elif change == "pop":
                opt.state.pop(w)
            elif change == "replace_state":
                opt.state[w] = {k: v.clone() for k, v in opt.state[w].items()}
            elif change == "replace_exp_avg":
                opt.state[w]["exp_avg"] = torch.zeros_like(w)
            elif change == "swap_params":  # the same group dict, other parameters
                opt.param_groups[0]["params"][:] = opt.param_groups[0]["params"][::-1]
            elif change == "unfuse":
                opt.param_groups[0]["fused"] = False
    for a, b in zip(list(ref.parameters()) + _state(opt_ref), list(fast.parameters()) + _state(opt_fast)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
def test_the_direct_adam_step_applies_under_a_real_lr_schedule(cls):
    opt = cls(torch.nn.Linear(3, 2).parameters(), fused=True)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)  # wraps opt.step (torch's class step, per class)
    assert fastoptim.DirectAdam(opt).applies()
    plain = cls(torch.nn.Linear(3, 2).parameters(), fused=True)
    direct = fastoptim.DirectAdam(plain)
    for p in plain.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    direct()  # optimizer.step() (no state yet), then the direct call (checked against optimizer.step(), then alone)
    direct()
    direct()
    assert direct.checked and direct.path.on
    assert not hasattr(plain, "_opt_called")  # only an LR scheduler's wrapper notes calls


@pytest.mark.parametrize("kw", [{}, {"momentum": 0.9}, {"momentum": 0.9, "nesterov": True},
                                {"momentum": 0.8, "dampening": 0.1, "maximize": True}])
def test_the_direct_sgd_step_is_the_fused_kernel_call_bitwise(kw):
    (ref, fast), (opt_ref, opt_fast) = _adam_pair(torch.optim.SGD, **kw)
    direct = fastoptim.direct_optimizer(opt_fast)
    assert isinstance(direct, fastoptim.DirectSGD)
    calls = _count_steps(opt_fast)

    def new_buffers(opt):  # buffers replaced (a loaded state): seen at the next step
        for state in opt.state.values():
            if "momentum_buffer" in state:
                state["momentum_buffer"] = state["momentum_buffer"].clone()
    _steps_with_schedules((ref, fast), (opt_ref, opt_fast), direct, new_buffers)
    # with momentum only the first step (it creates the buffers) went through optimizer.step(), and the first
    # direct call's check (optimizer.step() steps, the kernel steps copies: they agree)
    assert calls == ([1, 1] if kw else [1]) and direct.checked and direct.path.on
    for a, b in zip(list(ref.parameters()) + _state(opt_ref), list(fast.parameters()) + _state(opt_fast)):
        assert torch.equal(a, b)


def test_the_direct_sgd_step_follows_momentum_switched_on():
    (ref, fast), (opt_ref, opt_fast) = _adam_pair(torch.optim.SGD)
    direct = fastoptim.direct_optimizer(opt_fast)
    for i in range(4):
        _grads((ref, fast), i)
        opt_ref.step()
        direct()
        if i == 1:  # no buffers so far: the next step creates them (torch's first step with momentum)
            for opt in (opt_ref, opt_fast):
                opt.param_groups[0]["momentum"] = 0.9
    for a, b in zip(list(ref.parameters()) + _state(opt_ref), list(fast.parameters()) + _state(opt_fast)):
        assert torch.equal(a, b)
