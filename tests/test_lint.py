"""Warning rules (regbench.lint), table-tested like docs/errors.md: every rule of lint.RULES has a row in
docs/warnings.md (same order) and a case here that makes it fire with the documented message, and one where
it stays quiet. End-to-end (printed once, saved in summary.json): tests/test_regularizers.py, test_augment.py."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
from torch import nn

from regbench import lint
from regbench.regularizers import Context, build_stack
from tests.conftest import REPO, compose_cfg

DOC = REPO / "docs" / "warnings.md"
DIGITS = SimpleNamespace(name="mnist5k", flips_label_safe=False)
PHOTOS = SimpleNamespace(name="cifar10", flips_label_safe=True)
FLIPS = SimpleNamespace(flips=True, soft_targets=False)  # what the rules read of an augmentation policy
MIXING = SimpleNamespace(flips=False, soft_targets=True)
PLAIN = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))


def setup_rule(rule_id: str, *overrides: str, model: nn.Module = PLAIN, policy=None, info=PHOTOS) -> list[str]:
    """The messages of one setup rule for the composed config (stack checked as a run would)."""
    cfg = compose_cfg(*overrides)
    facts = lint.Setup(cfg, model, build_stack(cfg, Context(cfg)), policy, info)
    return list(RULE[rule_id].check(facts))


def listed(message) -> list[str]:
    return [] if message is None else [message]


def bn_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3))


RULE = {r.id: r for r in lint.RULES}

# id -> (a case that fires, a case that stays quiet); each returns the rule's messages.
CASES = {
    "adam-coupled-decay": (
        lambda: setup_rule("adam-coupled-decay", "optimizer=adam", "optimizer.weight_decay=0.01"),
        lambda: setup_rule("adam-coupled-decay", "optimizer=adamw", "optimizer.weight_decay=0.01")),
    "fine-tune-no-stage-2": (
        lambda: setup_rule("fine-tune-no-stage-2", "regularizer=[fine_tune]", "trainer.max_epochs=3",
                           "regularizer.fine_tune.freeze_base_epochs=3"),
        lambda: setup_rule("fine-tune-no-stage-2", "regularizer=[fine_tune]", "trainer.max_epochs=3",
                           "regularizer.fine_tune.freeze_base_epochs=3", "regularizer.fine_tune.unfreeze_top=0")),
    "penalty-and-coupled-decay": (
        lambda: setup_rule("penalty-and-coupled-decay", "regularizer=[l2]", "optimizer=sgd",
                           "optimizer.weight_decay=0.001"),
        lambda: setup_rule("penalty-and-coupled-decay", "regularizer=[l2]", "optimizer=adamw",
                           "optimizer.weight_decay=0.001")),
    "dropout-before-batchnorm": (
        lambda: setup_rule("dropout-before-batchnorm", model=nn.Sequential(nn.Dropout(0.5), nn.BatchNorm1d(4))),
        lambda: setup_rule("dropout-before-batchnorm", model=nn.Sequential(nn.BatchNorm1d(4), nn.Dropout(0.5)))),
    "label-unsafe-flips": (
        lambda: setup_rule("label-unsafe-flips", policy=FLIPS, info=DIGITS),
        lambda: setup_rule("label-unsafe-flips", "augmentation.allow_label_unsafe=true", policy=FLIPS, info=DIGITS)),
    "smoothing-and-mixing": (
        lambda: setup_rule("smoothing-and-mixing", "regularizer=[label_smoothing]", policy=MIXING),
        lambda: setup_rule("smoothing-and-mixing", "regularizer=[label_smoothing]", policy=FLIPS)),
    "tta-no-mirror": (
        lambda: setup_rule("tta-no-mirror", "augmentation.tta.enabled=true", "augmentation.tta.hflip=true",
                           info=DIGITS),
        lambda: setup_rule("tta-no-mirror", "augmentation.tta.enabled=true", "augmentation.tta.hflip=true",
                           info=PHOTOS)),
    "one-evaluation": (
        lambda: setup_rule("one-evaluation", "trainer.max_epochs=5", "trainer.eval_every=5"),
        lambda: setup_rule("one-evaluation", "trainer.max_epochs=5", "trainer.eval_every=4")),
    "batchnorm-batch-of-one": (
        lambda: listed(lint.batch_of_one(65, 32, False, bn_mlp())),
        lambda: listed(lint.batch_of_one(65, 32, False, PLAIN))),
    "chance-accuracy": (
        lambda: listed(lint.chance_warning({"val_acc": 0.1}, 10, 400)),
        lambda: listed(lint.chance_warning({"val_acc": 0.5}, 10, 400))),
}


def doc_rows() -> list[tuple[str, str, str]]:
    """(id, when, message) of each row of docs/warnings.md."""
    return re.findall(r"^\| `([a-z0-9-]+)` \| (\w+) \|[^|]*\| `([^`]*)` \|$", DOC.read_text(), flags=re.M)


def as_pattern(documented: str) -> re.Pattern:
    """The documented message with each ``<placeholder>`` standing for the run's value."""
    return re.compile(".+".join(re.escape(part) for part in re.split(r"<[^>]+>", documented)))


def test_docs_warnings_table_lists_every_rule_in_order():
    rows = doc_rows()
    assert [(i, when) for i, when, _ in rows] == [(r.id, r.when) for r in lint.RULES]
    assert list(CASES) == [r.id for r in lint.RULES]


@pytest.mark.parametrize("rule_id", list(CASES))
def test_each_rule_fires_with_its_documented_message_and_stays_quiet_otherwise(rule_id):
    fires, quiet = CASES[rule_id]
    documented = dict((i, m) for i, _, m in doc_rows())[rule_id]
    messages = fires()
    assert len(messages) == 1 and as_pattern(documented).fullmatch(messages[0]), messages
    assert quiet() == []


def test_every_rule_is_a_small_named_function_with_a_doc_line():
    for rule in lint.RULES:
        assert rule.check.__name__ != "<lambda>" and rule.check.__module__ == "regbench.lint"
        assert rule.when in ("setup", "batches", "end") and rule.doc and "\n" not in rule.doc


def test_run_warnings_gives_every_setup_rule_in_table_order():
    cfg = compose_cfg("optimizer=adam", "optimizer.weight_decay=0.01", "regularizer=[l2,elastic_net]",
                      "augmentation.tta.enabled=true", "augmentation.tta.hflip=true")
    model = nn.Sequential(nn.Dropout(0.5), nn.BatchNorm1d(4))
    found = lint.run_warnings(cfg, model, build_stack(cfg, Context(cfg)), FLIPS, DIGITS)
    assert [w.split(" ")[0] for w in found] == ["Adam", "elastic_net", "l2", "dropout", "the", "test-time"]
    assert "flips images of mnist5k" in found[4]


def test_a_zero_rate_dropout_before_batchnorm_and_drop_last_are_quiet():
    assert setup_rule("dropout-before-batchnorm", model=nn.Sequential(nn.Dropout(0.0), nn.BatchNorm1d(4))) == []
    assert lint.batch_of_one(65, 32, True, bn_mlp()) is None and lint.batch_of_one(64, 32, False, bn_mlp()) is None


def test_the_readme_tta_example_on_digits_does_not_warn():
    """README: `regbench augmentation=digits augmentation.tta.enabled=true` — the digits preset keeps TTA to
    label-safe views (no mirror), so its own example on its own dataset is quiet."""
    assert setup_rule("tta-no-mirror", "augmentation=digits", "augmentation.tta.enabled=true", info=DIGITS) == []
