"""Warning rules: combinations that are legal but probably not what the user meant.

Every rule is a small named function with a row in :data:`RULES` (id, function, one-line doc, when it runs);
docs/warnings.md lists the same ids in the same order and tests/test_lint.py makes each rule fire once and
stay quiet once. A warning is logged once (``warning: ...``) and saved in summary.json's ``warnings``.

Three moments: ``setup`` rules look at the config, the built model, the regularizer stack, the augmentation
policy and the dataset (:func:`run_warnings`, once before training); ``batches`` is the batch-of-one note
(:func:`batch_of_one`, which also tells fit to drop that batch); ``end`` is :func:`chance_warning`, on the
final epoch's metrics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from omegaconf import DictConfig
from torch import nn


@dataclass(frozen=True)
class Setup:
    """What the setup rules look at."""

    cfg: DictConfig
    model: nn.Module
    stack: Any  # regularizers.Stack
    policy: Any  # the augmentation policy (None or one without ops when there is no augmentation)
    info: Any  # data.DatasetInfo: name, flips_label_safe


# ------------------------------------------------------------------------------------ setup rules


def adam_coupled_decay(s: Setup) -> Iterator[str]:
    o, wd = s.cfg.optimizer, s.stack.get("weight_decay")
    if o.name == "adam" and (o.weight_decay > 0 or (wd is not None and wd.cfg.mode == "coupled")):
        yield ("Adam with coupled weight decay is not AdamW: the decay term is divided by √v̂ like the gradient; "
               "use optimizer=adamw or regularizer.weight_decay.mode=decoupled")


def fine_tune_without_stage_2(s: Setup) -> Iterator[str]:
    ft, max_epochs = s.stack.get("fine_tune"), s.cfg.trainer.max_epochs
    if ft is not None and ft.cfg.unfreeze_top != 0 and ft.cfg.freeze_base_epochs >= max_epochs:
        yield (f"fine_tune: stage 2 never starts (freeze_base_epochs={ft.cfg.freeze_base_epochs} >= "
               f"trainer.max_epochs={max_epochs}); set unfreeze_top=0 for a frozen base")


def penalty_and_coupled_decay(s: Setup) -> Iterator[str]:
    o, wd = s.cfg.optimizer, s.stack.get("weight_decay")
    coupled = (o.weight_decay > 0 and o.name != "adamw") or (wd is not None and wd.cfg.mode == "coupled")
    for name in s.stack.names:  # in stack order: elastic_net before l2
        if coupled and name in ("l2", "elastic_net"):
            yield (f"{name} penalty together with coupled weight decay: both shrink the same weights "
                   "(double counting; a penalty λ·Σw² equals coupled decay 2λ)")


def dropout_before_batchnorm(s: Setup) -> Iterator[str]:
    seen_dropout = False
    for m in (m for m in s.model.modules() if not list(m.children())):
        if isinstance(m, (nn.Dropout, nn.Dropout2d)) and m.p > 0:
            seen_dropout = True
        elif seen_dropout and isinstance(m, nn.modules.batchnorm._BatchNorm):
            yield ("dropout placed before batch norm: BN's batch statistics in training see dropout's variance, "
                   "its running statistics at test time do not (variance shift)")
            return


def label_unsafe_flips(s: Setup) -> Iterator[str]:
    if s.policy is not None and s.policy.flips and not s.info.flips_label_safe \
            and not s.cfg.augmentation.allow_label_unsafe:
        yield (f"the augmentation flips images of {s.info.name}, whose labels flips can change (a mirrored '3' is "
               "no 3); use augmentation=digits, or set augmentation.allow_label_unsafe=true if intended")


def smoothing_and_mixing(s: Setup) -> Iterator[str]:
    if s.policy is not None and s.policy.soft_targets and "label_smoothing" in s.cfg.regularizer:
        yield ("label smoothing together with MixUp/CutMix soft targets: the targets are softened twice "
               "(smoothing is applied to the mixed targets)")


def tta_without_mirror(s: Setup) -> Iterator[str]:
    tta = s.cfg.augmentation.tta
    if tta.enabled and tta.hflip and not s.info.flips_label_safe:
        yield f"test-time augmentation leaves out the mirrored view: flips are not label-safe for {s.info.name}"


# ----------------------------------------------------------------------------- batches and the end


def batch_of_one(n_train: int, batch_size: int, drop_last: bool, model: nn.Module) -> Optional[str]:
    """A note when the last training batch of an epoch would hold one image and the model has batch norm:
    fit then drops that image (as data.drop_last=true would), since BN cannot normalise a batch of one."""
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if drop_last or n_train % batch_size != 1 or not has_bn:
        return None
    return (f"the last training batch of each epoch would hold 1 image ({n_train} = {n_train // batch_size}·"
            f"{batch_size} + 1), which batch norm cannot normalise in training: it is dropped (as "
            "data.drop_last=true would); change data.train_size or data.batch_size to keep it")


def chance_warning(final: Optional[dict], num_classes: int, n_val: int) -> Optional[str]:
    """A warning when the run ends at chance: its final val acc is not 3 standard errors above 1/classes.

    Skipped when the validation set is too small to tell (3 standard errors at chance exceed chance itself,
    i.e. about 9 * (classes - 1) images or fewer) or when there is no final epoch.
    """
    if final is None or final["val_acc"] is None or num_classes < 2:
        return None
    p = 1.0 / num_classes
    margin = 3 * math.sqrt(p * (1 - p) / max(n_val, 1))
    if margin > p or final["val_acc"] > p + margin:
        return None
    return (f"the run ended at chance accuracy: final val acc {final['val_acc']:.3f} with {num_classes} classes "
            f"(chance {p:.3f}; not above {p + margin:.3f}, chance + 3 standard errors over {n_val} validation "
            "images): the model did not learn; check optimizer.lr (too high can kill ReLUs, too low stays on the "
            "initial plateau), model.init, gradient spikes (regularizer=[grad_clip]), or train longer")


def one_evaluation(s: Setup) -> Iterator[str]:
    t = s.cfg.trainer
    if t.max_epochs > 1 and t.eval_every >= t.max_epochs:
        yield (f"trainer.eval_every={t.eval_every} >= trainer.max_epochs={t.max_epochs}: only the last epoch is "
               "evaluated, so there is no validation curve and the best epoch is the last; lower trainer.eval_every")


# ------------------------------------------------------------------------------------------ table


@dataclass(frozen=True)
class Rule:
    id: str
    check: Callable
    when: str  # setup | batches | end
    doc: str


RULES = [
    Rule("adam-coupled-decay", adam_coupled_decay, "setup", "Adam's coupled decay is divided by √v̂ (not AdamW)"),
    Rule("fine-tune-no-stage-2", fine_tune_without_stage_2, "setup", "fine_tune never unfreezes within the run"),
    Rule("penalty-and-coupled-decay", penalty_and_coupled_decay, "setup",
         "an l2 / elastic_net penalty and coupled weight decay shrink the same weights twice"),
    Rule("dropout-before-batchnorm", dropout_before_batchnorm, "setup", "a dropout layer feeds a batch norm layer"),
    Rule("label-unsafe-flips", label_unsafe_flips, "setup", "the augmentation flips images whose labels flips change"),
    Rule("smoothing-and-mixing", smoothing_and_mixing, "setup", "label smoothing on MixUp/CutMix soft targets"),
    Rule("tta-no-mirror", tta_without_mirror, "setup", "TTA asked for a mirrored view the dataset cannot take"),
    Rule("one-evaluation", one_evaluation, "setup", "trainer.eval_every leaves only the last epoch evaluated"),
    Rule("batchnorm-batch-of-one", batch_of_one, "batches", "a last training batch of one image under batch norm"),
    Rule("chance-accuracy", chance_warning, "end", "the run ended at chance accuracy"),
]


def run_warnings(cfg: DictConfig, model: nn.Module, stack, policy, info) -> list[str]:
    """Every setup rule's warnings, in table order."""
    setup = Setup(cfg, model, stack, policy, info)
    return [w for rule in RULES if rule.when == "setup" for w in rule.check(setup)]
