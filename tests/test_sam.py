"""sam (SAM, Foret et al. 2021; ASAM, Kwon et al. 2021): the member's step against the paper's algorithm
written out by hand with torch autograd (perturb, gradient at w + e, restore, the optimizer's step) as davda54/sam
takes it; BatchNorm statistics from the first pass only; the undo exact; rho = 0 is the plain step; the run
composes, trains, resumes bitwise; the refusals (mixed precision, a stack) are one line."""

from __future__ import annotations

import copy
import json
from contextlib import nullcontext

import pytest
import torch

from regbench.experiment import build_experiment
from regbench.loop import AutogradStep
from regbench.regularizers.stacking import stack_refusals
from regbench.run import single_step
from regbench.runtime import Runtime
from regbench.train import fit
from tests.conftest import F32_REL, TINY, compose_cfg, one_line_error

CPU = torch.device("cpu")
SMALL = [*TINY, "data.train_size=128", "model.hidden=[16,8]", "optimizer=momentum", "optimizer.lr=0.1",
         "trainer.fused=false"]


def _exp(*overrides):
    return build_experiment(compose_cfg(*SMALL, *overrides), CPU)


def _batches(exp, n):
    it = iter(exp.train_batches(torch.Generator().manual_seed(0)))
    return [next(it) for _ in range(n)]


def _runtime():
    return Runtime(CPU, torch.get_num_threads(), nullcontext, None)


def _sam_by_hand(model, optimizer, xb, yb, rho, adaptive, loss_fn, penalty):
    """One SAM step as Foret et al.'s Algorithm 1 (ASAM: Kwon et al.'s T = |w|), in davda54/sam's arithmetic:
    e = rho / (||T g|| + 1e-12) * T^2 g, the norm over every parameter as one vector; the second pass on the same
    batch at w + e, its BatchNorm statistics thrown away (saved and put back here: an implementation independent
    of the member's momentum-0 bypass); w restored; the optimizer's step with the second gradient."""
    params = [p for p in model.parameters() if p.requires_grad]

    def objective():
        loss = loss_fn(model(xb), yb)
        return loss if penalty is None else loss + penalty(model)

    g = torch.autograd.grad(objective(), params)
    with torch.no_grad():
        norm = torch.norm(torch.stack([((p.abs() if adaptive else 1.0) * gi).norm(p=2) for p, gi in zip(params, g)]),
                          p=2)
        scale = rho / (norm + 1e-12)
        saved = [p.clone() for p in params]
        for p, gi in zip(params, g):
            p.add_((torch.pow(p, 2) if adaptive else 1.0) * gi * scale)
    stats = {n: b.clone() for n, b in model.named_buffers()}
    g2 = torch.autograd.grad(objective(), params)
    with torch.no_grad():
        for (n, b) in model.named_buffers():
            b.copy_(stats[n])
        for p, w, gi in zip(params, saved, g2):
            p.copy_(w)
            p.grad = gi
    optimizer.step()


def _l2_of(exp, model):
    """The l2 member's own formula (its anchor is tested elsewhere) on ``model``'s copies of its parameters."""
    member = exp.stack.get("l2")
    if member is None:
        return None
    names = {id(p): n for n, p in exp.model.named_parameters()}
    chosen = [names[id(p)] for p in member.penalty_params()]
    return lambda m: member.penalty_on([dict(m.named_parameters())[n] for n in chosen])


@pytest.mark.parametrize("adaptive,rho,stack,cma", [
    (False, 0.05, ["regularizer=[l2,sam]", "regularizer.l2.lam=1e-3"], False),  # the penalty in both passes
    (True, 1.0, ["regularizer=[l2,sam]", "regularizer.l2.lam=1e-3"], False),
    (False, 0.05, ["regularizer=[batchnorm,dropout,sam]", "regularizer.dropout.rate=0.3"], False),
    (True, 2.0, ["regularizer=[batchnorm,sam]"], True),
], ids=["sam-l2", "asam-l2", "sam-bn-dropout", "asam-bn-cumulative"])
def test_sam_steps_equal_the_papers_algorithm_by_hand(adaptive, rho, stack, cma):
    exp = _exp(*stack, f"regularizer.sam.rho={rho}", f"regularizer.sam.adaptive={adaptive}")
    if cma:  # torch's cumulative average (momentum None): the counter decides the factor, 1/num_batches_tracked
        for m in exp.model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = None
    ref = copy.deepcopy(exp.model)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, foreach=False)
    plain = copy.deepcopy(exp.model)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9, foreach=False)
    step = single_step(exp, _runtime())
    assert isinstance(step, AutogradStep) and exp.step_plan.startswith("autograd")
    step.train(), ref.train(), plain.train()
    penalty = _l2_of(exp, ref)
    for i, (xb, yb) in enumerate(_batches(exp, 3)):
        torch.manual_seed(100 + i)  # the same dropout masks: the forward passes draw them in the same order
        step.step(xb, yb)
        torch.manual_seed(100 + i)
        _sam_by_hand(ref, ref_opt, xb, yb, rho, adaptive, exp.loss_fn, penalty)
        torch.manual_seed(100 + i)
        plain_opt.zero_grad()
        loss = exp.loss_fn(plain(xb), yb)
        (loss if _l2_of(exp, plain) is None else loss + _l2_of(exp, plain)(plain)).backward()
        plain_opt.step()
    ours, theirs = exp.model.state_dict(), ref.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:  # weights, momentum-updated, and the BatchNorm statistics: bitwise
        assert torch.equal(ours[k], theirs[k]), k
    # It is not the plain step (SAM moved it), and the statistics are the plain step's count: one per step.
    assert any(not torch.equal(ours[k], v) for k, v in plain.state_dict().items() if "weight" in k)
    for k, v in ours.items():
        if k.endswith("num_batches_tracked"):
            assert int(v) == 3
    for m in exp.model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            assert m.momentum == (None if cma else 0.1)  # put back after every step


def test_batchnorm_statistics_are_the_first_pass_ones_by_number():
    """After one step, running_mean = (1 - m)·0 + m·mean(h) of the first pass's BatchNorm input h at w; the second
    pass at w + e sees another h (its statistics would differ), and the step leaves no trace of it."""
    exp = _exp("regularizer=[batchnorm,sam]", "regularizer.sam.rho=0.5")
    bn = next(m for m in exp.model.modules() if isinstance(m, torch.nn.BatchNorm1d))
    inputs = []
    hook = bn.register_forward_hook(lambda m, args, out: inputs.append(args[0].detach().clone()))
    (xb, yb), = _batches(exp, 1)
    single_step(exp, _runtime()).step(xb, yb)
    hook.remove()
    assert len(inputs) == 2 and not torch.equal(inputs[0], inputs[1])  # two passes, at w and at w + e
    first, second = inputs
    assert torch.allclose(bn.running_mean, 0.1 * first.mean(0), rtol=F32_REL, atol=1e-7)
    assert torch.allclose(bn.running_var, 0.9 + 0.1 * first.var(0, unbiased=True), rtol=F32_REL, atol=1e-7)
    assert not torch.allclose(bn.running_mean, 0.1 * second.mean(0), rtol=1e-3, atol=1e-6)
    assert int(bn.num_batches_tracked) == 1 and bn.momentum == 0.1


@pytest.mark.parametrize("adaptive", [False, True])
def test_the_ascent_has_length_rho_and_the_undo_restores_the_weights_bitwise(adaptive):
    exp = _exp("regularizer=[batchnorm,sam]", "regularizer.sam.rho=0.3", f"regularizer.sam.adaptive={adaptive}")
    model, opt = exp.model, exp.optimizer
    (xb, yb), = _batches(exp, 1)
    model.train()
    opt.zero_grad(set_to_none=True)
    exp.loss_fn(model(xb), yb).backward()
    before = [p.detach().clone() for p in model.parameters()]
    undo = exp.second_pass(model, opt)
    moved = [p.detach() - w for p, w in zip(model.parameters(), before)]
    # SAM: ||e|| = rho; ASAM: ||T^-1 e|| = rho (T = |w|): the neighbourhood's radius in its own metric
    # (where w = 0, ASAM does not move it: e = 0 there)
    assert all(torch.equal(e[w == 0], torch.zeros_like(e[w == 0])) for e, w in zip(moved, before)) or not adaptive
    steps = [(e / w.abs())[w != 0] for e, w in zip(moved, before)] if adaptive else moved
    length = torch.linalg.vector_norm(torch.cat([s.flatten() for s in steps]))
    assert abs(float(length) - 0.3) < 1e-4 * 0.3 * (10 if adaptive else 1)  # (w + e) - w rounds e
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and all(m.momentum == 0 for m in bns)
    exp.loss_fn(model(xb), yb).backward()
    undo()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), before))
    assert all(m.momentum == 0.1 and int(m.num_batches_tracked) == 1 for m in bns)


def test_rho_zero_is_the_plain_step_bitwise():
    """rho = 0: e = 0, the second pass recomputes the gradient at w itself — bitwise the plain step (without
    dropout: with it the second pass's masks are new draws, as the reference's)."""
    sam = _exp("regularizer=[l2,batchnorm,sam]", "regularizer.sam.rho=0")
    plain = _exp("regularizer=[l2,batchnorm]")
    a = single_step(sam, _runtime())
    b = AutogradStep(plain.model, plain.optimizer, loss_fn=plain.loss_fn, penalty_fn=plain.penalty_fn,
                     before_step=plain.before_step)
    a.train(), b.train()
    for xb, yb in _batches(sam, 2):
        la = a.step(xb, yb)
        lb = b.step(xb, yb)
        assert all(torch.equal(u, v) for u, v in zip(la[1:], lb[1:]))  # the reported loss and penalty
    sa, sb = sam.model.state_dict(), plain.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_composes_from_the_cli_trains_and_resumes_bitwise(tmp_path, monkeypatch):
    import regbench.run as train
    from regbench.cli import main
    from tests.test_resume import assert_same_run

    args = [*SMALL, "data.train_size=64", "trainer.max_epochs=2", "regularizer=[dropout,batchnorm,sam]",
            "regularizer.sam.adaptive=true", "regularizer.sam.rho=1.0", "scheduler=cosine"]
    main([*args, f"hydra.run.dir={tmp_path}/ref"])
    s = json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert s["status"] == "completed" and s["step_impl"] == "autograd"
    assert s["regularizer_info"]["sam"] == {"rho": 1.0, "adaptive": True, "batchnorm_layers": 2}
    real = train.fault_point

    def interrupt(point, epoch, settle=None):
        if (point, epoch) == ("after_summary", 1):
            if settle is not None:
                settle()
            raise KeyboardInterrupt
        real(point, epoch, settle)

    monkeypatch.setattr(train, "fault_point", interrupt)
    with pytest.raises(SystemExit):
        main([*args, f"hydra.run.dir={tmp_path}/run"])
    monkeypatch.setattr(train, "fault_point", real)
    main(["resume", str(tmp_path / "run")])
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["resumed_from_epoch"] == 1
    assert_same_run(tmp_path / "ref", tmp_path / "run")


def test_with_rho_zero_a_run_equals_the_plain_run_and_only_the_step_differs(tmp_path):
    """The plain run takes the direct step (faststep), sam's the autograd step: the same numbers, bitwise."""
    common = [*SMALL, "data.train_size=64", "trainer.max_epochs=2"]
    fit(compose_cfg(*common, "regularizer=[sam]", "regularizer.sam.rho=0"), tmp_path / "sam")
    fit(compose_cfg(*common), tmp_path / "plain")
    a, b = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("sam", "plain"))
    assert (a["step_impl"], b["step_impl"]) == ("autograd", "direct")
    assert a["test"] == b["test"] and a["final"]["train_loss"] == b["final"]["train_loss"]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_is_refused_in_one_line(amp, capsys):
    msg = one_line_error(capsys, *TINY, "regularizer=[sam]", f"trainer.amp={amp}")
    assert msg.startswith(f"regbench: error: trainer.amp='{amp}': expected none with regularizer sam (")
    assert msg.endswith("; set trainer.amp=none, or drop sam from the stack")


def test_rho_must_be_non_negative(capsys):
    msg = one_line_error(capsys, *TINY, "regularizer=[sam]", "regularizer.sam.rho=-0.1")
    assert "regularizer.sam.rho=-0.1: expected a number >= 0" in msg


def test_a_stack_refuses_it_in_one_line(capsys):
    refusals = stack_refusals(compose_cfg(*TINY, "regularizer=[l2,sam]"))
    assert [(r.key, r.value) for r in refusals] == [("regularizer", "sam")]
    assert refusals[0].why == "takes a second pass every step (its second_pass, which a stack does not run)"
    msg = one_line_error(capsys, *TINY, "regularizer=[sam,bagging]")
    assert "sam" in msg and "second pass" in msg
