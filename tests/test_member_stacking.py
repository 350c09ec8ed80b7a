"""A member owns its stacked form (issue 26, item 1): which members stack, what they share inside a stack and how
their per-step effect is computed there is each member's own declaration (regbench.regularizers.base.Stacking,
penalty_on / grads_on); the stacked engine, the launcher's grouping and bagging ask the members and name none.
Shown with toy members registered here: a new member needs nothing outside its module."""

from __future__ import annotations

import ast
import copy
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf, open_dict
from torch import nn

import regbench.regularizers as regularizers
from regbench.errors import ConfigError, RegbenchError
from regbench.optim import build_optimizer
from regbench.regularizers import REGISTRY, Context, Regularizer, build_stack
from regbench.regularizers.base import Stacking, register
from regbench.regularizers.stacking import Refusal, stack_refusals
from regbench.stacked.grouping import stack_key
from regbench.stacked.model import StackedModel
from regbench.stacked.optim import StackedOptimizer
from regbench.stacked.step import StepRules, check_stackable
from tests.conftest import compose_cfg

SRC = Path(__file__).resolve().parents[1] / "src" / "regbench"


# ------------------------------------------------------------------------------------------- the source scan
MEMBER_NAMES = {"l1", "l2", "elastic_net", "weight_decay", "grad_clip", "label_smoothing", "dropout",
                "stochastic_depth", "transfer", "fine_tune", "bagging", "early_stopping", "mc_dropout", "ensemble",
                "batchnorm", "group_norm", "layer_norm", "DropPath", "StochasticDepth",
                "max_norm", "unit_norm", "non_neg", "min_max_norm", "activity",  # issue 28, items 1-2
                "sam",  # issue 28, item 5
                "weight_averaging",  # issue 28, item 4
                "gaussian_noise", "gaussian_dropout", "alpha_dropout", "dropblock",  # issue 28, items 3 and 6
                "GaussianNoise", "GaussianDropout", "DropBlock2d"}
# Literals in files this item does not own, each with why it is still there; the scan fails on any other.
PENDING: dict = {}  # (file, name) -> why it may stay; empty: no file names a member


def _literals(path: Path):
    """(line, text) of every string literal naming a member (equal to a name, or a key regularizer.<name>)."""
    names = MEMBER_NAMES | set(REGISTRY)
    key = re.compile(r"regularizer\.(" + "|".join(sorted(names)) + r")\b")
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value in names or key.search(node.value):
                yield node.lineno, node.value


def test_no_file_of_the_stacked_engines_names_a_member():
    files = sorted((SRC / "stacked").glob("*.py")) + [SRC / "faststep.py"]
    assert len(files) > 5
    found = [(str(f.relative_to(SRC)), line, text) for f in files for line, text in _literals(f)]
    assert not [hit for hit in found if hit[::2] not in PENDING], found


def test_the_scan_finds_a_member_name(tmp_path):
    """The scan above is not vacuous: the tables this item removed would be found, prose would not."""
    probe = tmp_path / "probe.py"
    probe.write_text('"""dropout in prose"""\nFREE = {"l2": (), "dropout": ("placement",)}\n'
                     'KEY = "regularizer.weight_decay"\nNOTE = "add regularizer grad_clip"\n')
    assert sorted(t for _, t in _literals(probe)) == ["dropout", "l2", "regularizer.weight_decay"]


# ------------------------------------------------------------------------------------------- toy members
@dataclass
class ToyPenaltyConfig:
    lam: float = 0.01
    power: float = 3.0


class ToyPenalty(Regularizer):
    """λ·Σ|w|^power over the kernels: its formula written once, in penalty_on."""

    name, schema = "toy_penalty", ToyPenaltyConfig
    stacking = Stacking(shared=(), before_training=("setup",))

    def setup(self, model, ctx):
        self.params = [p for p in model.parameters() if p.ndim >= 2]

    def penalty_params(self):
        return self.params if self.cfg.lam != 0 else []

    def penalty_on(self, params):
        return self.cfg.lam * torch.stack([p.abs().pow(self.cfg.power).sum() for p in params]).sum()


@dataclass
class ToyGradConfig:
    factor: float = 0.5
    biases: bool = False  # structural: whether the biases' gradients are scaled too


class ToyGradScale(Regularizer):
    """g ← g·factor + lr·w on its parameters: a gradient rule written once, in grads_on."""

    name, schema = "toy_grad", ToyGradConfig
    stacking = Stacking(shared=("biases",), before_training=("setup",))

    def setup(self, model, ctx):
        self.params = [p for p in model.parameters() if self.cfg.biases or p.ndim >= 2]

    def grad_params(self):
        return self.params

    @torch.no_grad()
    def grads_on(self, params, optimizer):
        lr = optimizer.param_groups[0]["lr"]
        for p in params:
            p.grad.mul_(self.cfg.factor).add_(p, alpha=lr)


@dataclass
class ToyPrivateConfig:
    copies: int = 1


class ToyPrivate(Regularizer):
    name, schema = "toy_private", ToyPrivateConfig
    stacking = Stacking(refused="it keeps a private copy of the weights per run")


class ToyOldStyle(Regularizer):
    """Declares nothing and overrides the penalty hook itself: it has no stacked form."""

    name, schema = "toy_old_style", ToyPrivateConfig

    def penalty(self, model):
        return sum(p.sum() for p in model.parameters())


TOYS = (ToyPenalty, ToyGradScale, ToyPrivate, ToyOldStyle)


@pytest.fixture
def toys(monkeypatch):
    """The toy members registered (their module's @register) and placed last, for this test only."""
    for i, cls in enumerate(TOYS):
        monkeypatch.setitem(REGISTRY, cls.name, cls)
        monkeypatch.setitem(regularizers._RANK, cls.name, len(regularizers.ORDER) + i)
        register(cls)


def with_members(members: dict, *overrides):
    cfg = compose_cfg(*overrides)
    with open_dict(cfg):
        for name, values in members.items():
            cfg.regularizer[name] = OmegaConf.merge(OmegaConf.structured(REGISTRY[name].schema), values)
    return cfg


def small_model():
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def test_a_new_members_stacked_form_equals_its_single_runs_bitwise(toys):
    """Three steps of a stack of three (toy penalty, toy gradient rule, both, with other strengths) against each
    member's single run: weights bitwise equal."""
    members = [{"toy_penalty": {"lam": 0.02}}, {"toy_grad": {"factor": 0.3}},
               {"toy_penalty": {"power": 1.5}, "toy_grad": {}}]
    cfgs = [with_members(m, "optimizer=adam", "optimizer.lr=0.01") for m in members]
    torch.manual_seed(0)
    models = [small_model() for _ in cfgs]
    alone = copy.deepcopy(models)
    stacks, own = ([build_stack(c, Context(c)) for c in cfgs] for _ in range(2))
    for s, m in (*zip(stacks, models), *zip(own, alone)):
        s.setup(m)
    opts = [build_optimizer(c.optimizer, s.param_groups(m, c.optimizer)) for c, s, m in zip(cfgs, stacks, models)]
    refs = [build_optimizer(c.optimizer, s.param_groups(m, c.optimizer)) for c, s, m in zip(cfgs, own, alone)]
    stacked = StackedModel(models)
    optimizer = StackedOptimizer(stacked.params, [stacked.member_params(k) for k in range(3)], opts)
    rules = StepRules(stacks, [stacked.member_params(k) for k in range(3)], torch.device("cpu"))
    assert rules.has_penalty == [True, False, True]
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(3, 8, 6, generator=g), torch.randint(0, 3, (3, 8), generator=g)
        loss, penalty = rules.loss(stacked(x), y), rules.penalty(stacked.params)
        optimizer.zero_grad()
        (loss + penalty).sum().backward()
        rules.before_step(stacked.params, optimizer)
        optimizer.step()
        for k, (m, o, s) in enumerate(zip(alone, refs, own)):
            objective = F.cross_entropy(m(x[k]), y[k])
            term = s.penalty_fn()(m) if s.penalty_fn() else None
            assert term is None if k == 1 else torch.equal(term, penalty[k]), k
            o.zero_grad()
            (objective if term is None else objective + term).backward()
            s.before_step_fn()(m, o, None) if s.before_step_fn() else None
            o.step()
    for k, m in enumerate(alone):
        for leaf, p in zip(stacked.params, m.parameters()):
            assert torch.equal(leaf[k].detach(), p.detach()), k


def test_what_a_new_member_shares_in_a_stack_is_its_declaration(toys):
    plain = stack_key(compose_cfg())[0]
    assert plain is not None
    # strengths differ per member; at the shared keys' defaults the member stacks beside runs without it
    assert stack_key(with_members({"toy_penalty": {"lam": 0.5, "power": 2.0}}))[0] == plain
    assert stack_key(with_members({"toy_grad": {"factor": 0.9}}))[0] == plain
    # a declared shared key splits the stacks
    assert stack_key(with_members({"toy_grad": {"biases": True}}))[0] not in (plain, None)


def test_a_member_declaring_itself_unstackable_is_refused_with_its_own_reason(toys):
    cfg = with_members({"toy_private": {}})
    assert stack_key(cfg) == (None, "regularizer member toy_private: it keeps a private copy of the weights per run")
    with pytest.raises(RegbenchError, match=r"'toy_private' cannot be trained in a stack \(it keeps a private copy"):
        check_stackable(build_stack(cfg, Context(cfg)))
    bagged = with_members({"toy_private": {}}, "regularizer=[bagging]")
    with pytest.raises(ConfigError, match=r"regularizer='\[bagging,toy_private\]': expected bagging without "
                                          r"toy_private .*it keeps a private copy of the weights per run"):
        build_stack(bagged, Context(bagged))


def test_a_member_overriding_a_step_hook_without_a_stacked_form_is_refused(toys):
    cfg = with_members({"toy_old_style": {}})
    assert stack_key(cfg) == (None, "regularizer member toy_old_style: its penalty acts inside every step")
    with pytest.raises(RegbenchError, match="'toy_old_style' cannot be trained in a stack .its penalty acts"):
        check_stackable(build_stack(cfg, Context(cfg)))


def test_a_declaration_naming_what_the_member_lacks_fails_at_registration():
    class Typo(ToyGradScale):
        name = "toy_typo"
        stacking = Stacking(shared=("bias",))

    class Hook(ToyGradScale):
        name = "toy_hook"
        stacking = Stacking(before_training=("penalty",))

    for cls in (Typo, Hook):
        with pytest.raises(TypeError, match=f"regularizer member {cls.name}: its stacking declaration names"):
            register(cls)
        assert cls.name not in REGISTRY


def test_the_stack_wide_refusals_are_one_function():
    assert stack_refusals(compose_cfg()) == []
    cfg = compose_cfg("trainer.amp=bf16", "trainer.compile=model", "model=resnet", "model.depth=8",
                      "regularizer=[stochastic_depth,bagging]")
    got = stack_refusals(cfg)
    assert [(r.key, r.value) for r in got] == [("regularizer", "stochastic_depth"), ("regularizer", "bagging"),
                                               ("trainer.amp", "bf16"), ("trainer.compile", "model")]
    assert got[2] == Refusal("trainer.amp", "bf16", "a stack trains in float32", "trainer.amp=none")
    assert [r.value for r in stack_refusals(cfg, ignore=("bagging",))][:2] == ["stochastic_depth", "bf16"]
    tv = stack_refusals(OmegaConf.to_container(compose_cfg("model=torchvision"), resolve=True))
    assert [(r.key, r.value) for r in tv] == [("model", "torchvision")]


def test_a_layer_says_itself_that_it_cannot_be_stacked():
    class Noise(nn.Module):  # any name: the class attribute is what counts
        stack_refusal = "it adds noise from the global RNG"

        def forward(self, x):
            return x + torch.randn_like(x)

    with pytest.raises(ValueError, match=r"layer 1 \(Noise\) .*: it adds noise from the global RNG"):
        StackedModel([nn.Sequential(nn.Linear(2, 2), Noise())])
    StackedModel([nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1))], input_shape=(2,))  # torch's own: stacked


def test_an_epoch_hook_that_may_change_the_model_is_refused_unless_it_only_reads_it():
    """A stack writes each member's weights into its own model before on_epoch_end and never reads them back: a hook
    that changed them would silently part from its single run, so overriding it needs ``reads_model`` (review)."""

    class Averaging(ToyGradScale):
        name = "toy_averaging"

        def on_epoch_end(self, epoch, row, model):
            return False

    class Reader(Averaging):
        name = "toy_reader"
        stacking = Stacking(shared=("biases",), before_training=("setup",), reads_model=("on_epoch_end",))

    assert "on_epoch_end may change its model between the stack's epochs" in Averaging.stacking.refusal(Averaging)
    assert Reader.stacking.refusal(Reader) is None
    assert REGISTRY["early_stopping"].stacking.refusal(REGISTRY["early_stopping"]) is None  # reads: best weights
    assert REGISTRY["ensemble"].stacking.refusal(REGISTRY["ensemble"]) is None  # reads: snapshots


def test_a_formula_without_its_parameters_fails_at_registration():
    """grads_on / penalty_on without grad_params / penalty_params would never run: a silent no-op (review)."""

    class NoParams(Regularizer):
        name, schema = "toy_no_params", ToyGradConfig

        def grads_on(self, params, optimizer):
            raise AssertionError("never called")

    with pytest.raises(TypeError, match="defines grads_on but not grad_params"):
        register(NoParams)
    assert NoParams.name not in REGISTRY


def test_parameters_without_a_formula_fail_at_registration():
    class NoFormula(Regularizer):
        name, schema = "toy_no_formula", ToyGradConfig

        def penalty_params(self):
            return []

    with pytest.raises(TypeError, match="defines penalty_params but not penalty_on"):
        register(NoFormula)
    assert NoFormula.name not in REGISTRY
