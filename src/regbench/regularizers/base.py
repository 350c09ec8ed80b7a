"""The one interface every regularizer implements: optional hooks the training loop calls.

A regularizer overrides only the hooks it needs; the defaults do nothing. Adding one = a module in this
package with a schema dataclass and a ``Regularizer`` subclass decorated with ``@register``, its name placed
in ``ORDER`` (regularizers/__init__.py), a YAML file in ``configs/regularizer/``, and a test.

A member also states how it acts inside a stack (regbench.stacked: K runs trained as one batched model) in its
``stacking`` declaration, and writes its per-step effect once, as its *stacked form*: :meth:`Regularizer.penalty_on`
and :meth:`Regularizer.grads_on` take the tensors they act on, so a single run calls them on its own parameters
(the default ``penalty`` / ``before_step`` hooks do: a single run is a stack of one) and the stacked step on the
member's rows of the stacked leaves. Nothing outside this package names a member.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable, ClassVar, Optional

import torch
from omegaconf import DictConfig

from regbench.errors import RegbenchError
from regbench.models.slots import LayerSlots
from torch import nn

REGISTRY: dict[str, type["Regularizer"]] = {}
PREPARATION_HOOKS = ("setup", "param_groups")  # run on each member's own model / optimizer before a stack is built
# Called on each member's own model at an epoch's end; a stack writes every member's weights into it before and never
# reads them back, so such a hook may read the model, never change it (that member must declare reads_model).
EPOCH_HOOKS = ("on_epoch_end",)
# The hooks run every step, each by default through the member's stacked form (the method named here), which the
# stacked step calls too; a member overriding the hook itself has no stacked form and is refused in a stack.
STEP_FORMS = {"penalty": "penalty_on", "before_step": "grads_on"}
# Hooks without a stacked form (the stacked step does not call them): a member overriding one is refused in a stack,
# with this clause after "it".
UNSTACKED_HOOKS = {"after_step": "acts after every optimizer step", "second_pass": "takes a second pass every step",
                   "eval_model": "evaluates another model than the one trained",
                   "lr_schedule": "replaces the run's learning-rate schedule"}


def register(cls: type["Regularizer"]) -> type["Regularizer"]:
    cls.stacking.validate(cls)
    REGISTRY[cls.name] = cls
    return cls


@dataclass(frozen=True)
class Stacking:
    """How a member acts inside a stack. The default (declaring nothing) is the safe one: stackable, its whole
    config shared by every member of a stack, and no hook overridden but the per-step stacked form.

    refused: why it cannot train in a stack, a clause after "it" ("it freezes layers during the run"); None: it can.
    shared: its config keys every member of one stack must have alike (what shapes the model or the step); every
        other key may differ per member. A member left at the schema's defaults of these keys stacks beside runs
        without it (they act as its zero strength: λ = 0, rate 0, no clipping). None: the whole config is shared.
    shared_nonzero: keys of which only zero / non-zero is shared (dropout's spatial: whether the model has the
        layers; their rates are per member).
    before_training: of the preparation hooks (setup, param_groups), those it overrides that act only on its own
        model and optimizer before the first step (a stacked member is prepared as its single run): they need no
        stacked form. A member overriding another one (fine_tune's setup leaves forward hooks) is refused.
    reads_model: of the epoch hooks (on_epoch_end), those it overrides that only read its model (early stopping's
        best weights, a snapshot): a stack writes each member's weights into its own model before the hook and never
        reads them back, so a hook that changed them would silently part from its single run — refused undeclared.
    """

    refused: Optional[str] = None
    shared: Optional[tuple[str, ...]] = None
    shared_nonzero: tuple[str, ...] = ()
    before_training: tuple[str, ...] = ()
    reads_model: tuple[str, ...] = ()

    def validate(self, cls: type["Regularizer"]) -> None:
        """A declaration naming keys the schema lacks, or hooks that are not preparation hooks, is a bug."""
        named = (*(self.shared or ()), *self.shared_nonzero)
        keys = {f.name for f in fields(cls.schema)} if named else set()
        unknown = [k for k in named if k not in keys]
        unknown += [h for h in self.before_training if h not in PREPARATION_HOOKS]
        unknown += [h for h in self.reads_model if h not in EPOCH_HOOKS]
        if unknown:
            raise TypeError(f"regularizer member {cls.name}: its stacking declaration names {', '.join(unknown)} "
                            f"(keys of {cls.schema.__name__} or one of {', '.join(PREPARATION_HOOKS + EPOCH_HOOKS)})")
        # A formula without the parameters it acts on would never run, in a single run or a stack: a silent no-op.
        for form, params in (("penalty_on", "penalty_params"), ("grads_on", "grad_params")):
            if overrides(cls, form) and not overrides(cls, params):
                raise TypeError(f"regularizer member {cls.name} defines {form} but not {params} (the parameters it "
                                "acts on; without them it would never run)")
        if overrides(cls, "penalty_params") and not overrides(cls, "penalty_on"):
            raise TypeError(f"regularizer member {cls.name} defines penalty_params but not penalty_on (its formula)")

    def structure(self, cls: type["Regularizer"], cfg: Any) -> Optional[dict]:
        """The part of a member's config (a mapping) every member of its stack shares; None: nothing (the shared
        keys at the schema's defaults, or no shared key: the member may be absent beside it)."""
        if self.shared is None:
            return cfg
        defaults = schema_defaults(cls.schema)
        out = {k: cfg.get(k, defaults[k]) for k in self.shared}
        out.update({f"{k}!=0": bool(cfg.get(k) or 0) for k in self.shared_nonzero})
        at_defaults = {**{k: defaults[k] for k in self.shared}, **{f"{k}!=0": False for k in self.shared_nonzero}}
        return None if out == at_defaults else out

    def refusal(self, cls: type["Regularizer"]) -> Optional[str]:
        """Why a member of ``cls`` cannot train in a stack (None: it can): its own word, or a hook it overrides
        that acts inside every step without a stacked form."""
        if self.refused:
            return self.refused
        # The stacked step calls penalty_on / grads_on / loss_options; a step hook overridden itself has no stacked
        # form, and a preparation hook not declared in before_training may leave something acting at every step.
        hooks = [h for h in PREPARATION_HOOKS if overrides(cls, h) and h not in self.before_training]
        hooks += [h for h in STEP_FORMS if overrides(cls, h)]
        if hooks:
            return f"its {', '.join(hooks)} acts inside every step"
        unstacked = [f"{UNSTACKED_HOOKS[h]} (its {h}, which a stack does not run)" for h in UNSTACKED_HOOKS
                     if overrides(cls, h)]
        if unstacked:
            return " and ".join(unstacked)
        epoch = [h for h in EPOCH_HOOKS if overrides(cls, h) and h not in self.reads_model]
        return (f"its {', '.join(epoch)} may change its model between the stack's epochs (a member whose hook only "
                "reads the model declares reads_model)") if epoch else None


def schema_defaults(schema: type) -> dict[str, Any]:
    """A schema dataclass's defaults by key."""
    return {f.name: f.default_factory() if f.default is MISSING else f.default for f in fields(schema)}


def overrides(cls: type, hook: str) -> bool:
    return getattr(cls, hook) is not getattr(Regularizer, hook)


def acts_in(cls: type, hook: str) -> bool:
    """Whether members of ``cls`` act in a step hook: they override it, or its stacked form (penalty: penalty_on;
    before_step: grads_on)."""
    return overrides(cls, hook) or (hook in STEP_FORMS and overrides(cls, STEP_FORMS[hook]))


def optimizer_params(optimizer: torch.optim.Optimizer) -> list:
    """Every parameter an optimizer steps, in its groups' order (a stacked member's optimizer: its rows)."""
    return [p for g in optimizer.param_groups for p in g["params"]]


@dataclass
class Context:
    """What a regularizer may look at when it is checked and set up: the whole config and the run's facts."""

    cfg: DictConfig
    num_classes: int = 10
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


class Regularizer:
    name: ClassVar[str]
    schema: ClassVar[type]
    stacking: ClassVar[Stacking] = Stacking()  # how it acts inside a stack (see Stacking)
    # The position in the stack is the name's place in regularizers.ORDER (one list, not a number per member).

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    @property
    def key(self) -> str:
        return f"regularizer.{self.name}"

    def nothing(self, why: str, fix: str) -> RegbenchError:
        """The error for a member that would apply to nothing: a run recording it as applied would be
        bitwise the run without it. (A zero strength — rate 0, λ = 0 — is allowed: a sweep's baseline point.)"""
        return RegbenchError(f"regularizer member '{self.name}' applies to nothing: {why}; fix: {fix}")

    # --- construction ---------------------------------------------------------------------------
    def check(self, ctx: Context) -> None:
        """Raise ConfigError if this regularizer cannot apply to the chosen model/optimizer/data.

        Pure: it only reads (config validation builds and checks a stack that is then thrown away); state
        belongs in ``__init__`` or :meth:`setup`."""

    def fill_slots(self, slots: LayerSlots, ctx: Context) -> None:
        """Ask for layers in the model with ``slots.set(slot, value, key)`` (dropout rates, a normalisation,
        drop-path...); the model applies them or refuses with a ConfigError naming ``key``."""

    def setup(self, model: nn.Module, ctx: Context) -> None:
        """Called once the model exists (load pretrained weights, freeze layers...)."""

    def param_groups(self, model: nn.Module, optimizer_cfg: DictConfig, ctx: Context) -> Optional[list[dict]]:
        """Optimizer parameter groups, or None to leave the default single group."""
        return None

    # --- every step -----------------------------------------------------------------------------
    def penalty(self, model: nn.Module) -> Optional[torch.Tensor]:
        """A term added to the training loss (logged apart from the data loss): its stacked form
        :meth:`penalty_on` on its own :meth:`penalty_params`, None when it adds none. Override ``penalty_on``, not
        this (a member overriding this hook has no stacked form and is refused in a stack)."""
        params = self.penalty_params()
        return self.penalty_on(params) if params else None

    def loss_options(self) -> dict[str, Any]:
        """Keyword arguments for the training cross-entropy (e.g. label_smoothing)."""
        return {}

    def before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, scaler) -> None:
        """After backward, before optimizer.step() (gradient clipping, decoupled decay): its stacked form
        :meth:`grads_on` on its own :meth:`grad_params`. Override ``grads_on``, not this (as :meth:`penalty`)."""
        params = self.grad_params()
        params = optimizer_params(optimizer) if params is None else params
        if params:
            self.grads_on(params, optimizer)

    def second_pass(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> Optional[Callable[[], None]]:
        """After the first backward, before the gradient rules: move the weights (SAM's ascent step, from the first
        pass's gradients) and return the function that moves them back; None: no second pass this step. The step
        then recomputes the loss and the gradients at the moved weights (those are the gradients the rules and the
        optimizer use), calls the returned function, and goes on. At most one member of a stack takes it."""
        return None

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """After every ``optimizer.step()`` (Keras' kernel constraints, the weight average's update)."""

    # --- its stacked form: the per-step formulas, written once, on the tensors given -----------
    # A single run passes its own parameters (penalty, before_step above); the stacked step (regbench.stacked.step)
    # passes the member's rows of the stacked leaves [K, ...] and their gradients, mapped from the lists below.
    def penalty_params(self) -> list[torch.Tensor]:
        """The parameters :meth:`penalty_on` takes in this run (chosen in setup); [] when it adds no term."""
        return []

    def penalty_on(self, params: list[torch.Tensor]) -> torch.Tensor:
        """Its loss term on ``params``: its own :meth:`penalty_params`, or a stacked member's rows of them."""
        raise NotImplementedError(f"regularizer member {self.name} has penalty_params but no penalty_on")

    def grad_params(self) -> Optional[list[torch.Tensor]]:
        """The parameters :meth:`grads_on` acts on in this run; None: every parameter its optimizer steps, in the
        optimizer's order; []: none (no rule this run)."""
        return []

    def grads_on(self, params: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
        """Its rule between backward and the optimizer step, on ``params`` and their ``.grad`` (its own parameters,
        or a stacked member's rows, whose gradients are views of the stacked ones). ``optimizer``: the member's own
        (in a stack: re-pointed at its rows), read for this step's hyperparameters (lr)."""

    # --- every epoch / the end ------------------------------------------------------------------
    def on_epoch_end(self, epoch: int, row: dict, model: nn.Module) -> bool:
        """Return True to stop training after this epoch."""
        return False

    def on_train_end(self, model: nn.Module, ctx: Context) -> None:
        """Once after the last epoch, before the test evaluation (e.g. restore the best weights)."""

    def eval_model(self, model: nn.Module, train_x: torch.Tensor) -> Optional[nn.Module]:
        """The model validation, the clean training subset and the test set evaluate instead of the trained one
        (weight averaging's averaged model), or None. At most one member of a stack gives one. ``train_x``: the
        training split's inputs as the model reads them, un-augmented, in split order (for a pass that recomputes
        the other model's BatchNorm statistics: torch's update_bn)."""
        return None

    def lr_schedule(self, epoch: int, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> Optional[Any]:
        """Asked at the start of every epoch (a single run's, from 1): the learning-rate schedule stepped after each
        optimizer step of epoch ``epoch`` instead of the run's (SWA's SWALR from its start epoch on), or None: the
        run's. A member giving one builds it and carries its state across a resume (state_dict); the run's own
        schedule is then left where it was. At most one member of a run gives one."""
        return None

    def final_eval(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, evaluate) -> Optional[dict]:
        """An extra evaluation of the test set reported beside the plain one (MC dropout, ensembles)."""
        return None

    @property
    def stopped(self) -> bool:
        """True once this member asked training to stop (and still after a resume)."""
        return False

    # --- what it did ----------------------------------------------------------------------------
    def info(self) -> Optional[dict[str, Any]]:
        """Facts for summary.json's ``regularizer_info`` (what it applied to), or None when it has none."""
        return None

    def log_info(self, model: nn.Module) -> None:
        """Log this member's own lines once the run is set up (e.g. how many parameters it applies to)."""

    # --- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What this member must carry across a resume (tensors and primitives only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
