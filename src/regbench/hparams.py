"""What TensorBoard's HParams tab shows of a run and of its sweep: the config flattened to columns, the sweep's plan
(the keys it varies and their values, handed to every job), the columns chosen from it, the experiment and session
protos. Pure data: no torch (the CLI imports it to write a sweep's plan; tensorboard's protos are imported when
written)."""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

from omegaconf import DictConfig, OmegaConf

# Which keys a sweep varies and the values they take, written by the sweep's pre-check (``sweep_hparams``) for
# every job: TensorBoard's HParams tab shows the keys that differ, and every key of the sweep, in every job.
SWEEP_HPARAMS_ENV = "REGBENCH_SWEEP_HPARAMS"


# ------------------------------------------------------------------------------------ TensorBoard HParams
# HParams metrics, tag -> column title, in display order (the tab shows the first five by default): the last
# value of each scalar tag. "{c}" is "_clean" (eval-mode plain CE on training images) unless a job turns it off.
HPARAM_METRICS = {
    "test/acc": "test acc", "gap/loss{c}": "final gap (val − {t} loss)", "loss/val": "final val loss",
    "acc/val": "final val acc", "test/loss": "test NLL", "test/ece": "test ECE",
    "gap/acc{c}": "final acc gap ({t} − val)", "loss/train{c}": "final {t} loss",
}
EXTRA_METRICS = ("acc", "nll", "ece")  # of each extra test evaluation (mc_dropout, ensemble, tta)


def flat_hparams(cfg: DictConfig) -> dict[str, Any]:
    """Every leaf of the task config as ``key.path -> bool | int | float | str`` (lists and null as text), plus
    the regularizer stack as one column, ``regularizer`` = ``[l2,dropout]`` (as it is written on the command
    line; it sorts before its members' ``regularizer.<member>.*`` keys)."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                flat[f"{prefix}{k}"] = v if isinstance(v, (bool, int, float, str)) else json.dumps(v)

    task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])  # a pre-check's job has hydra: too
    walk(OmegaConf.to_container(task, resolve=True), "")
    flat["regularizer"] = "[" + ",".join(cfg.regularizer) + "]"
    return flat


def sweep_hparams(cfgs: list[DictConfig]) -> dict[str, list]:
    """Every key of a sweep's jobs with the distinct values it takes (the sweep's HParams columns)."""
    values: dict[str, list] = {}
    for cfg in cfgs:
        for k, v in flat_hparams(cfg).items():
            _add_value(values.setdefault(k, []), v)
    return values


def _add_value(values: list, v: Any) -> None:
    if not any(isinstance(x, bool) == isinstance(v, bool) and x == v for x in values):  # True == 1 in Python
        values.append(v)


def _sweep_plan(own: dict[str, Any]) -> dict[str, list] | None:
    """The sweep's columns from the environment (None for a run outside a sweep), widened by this run's own
    values (a key or value the pre-check's jobs did not show)."""
    text = os.environ.get(SWEEP_HPARAMS_ENV)
    if not text:
        return None
    try:
        plan = json.loads(text)
        if not (isinstance(plan, dict) and all(isinstance(v, list) and all(isinstance(x, (bool, int, float, str))
                                                                            for x in v) for v in plan.values())):
            raise ValueError("expected {key: [values]}")
    except ValueError as e:
        logging.getLogger(__name__).warning("%s ignored (%s): HParams without the sweep's columns",
                                            SWEEP_HPARAMS_ENV, e)
        return None
    for k, v in own.items():
        _add_value(plan.setdefault(k, []), v)
    return plan


def _hparam_type(values: list) -> str:
    if all(isinstance(v, bool) for v in values):
        return "bool"
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return "number"
    return "text"


def _as_text(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def sweep_columns(plan: dict[str, list]) -> dict[str, bool]:
    """The HParams columns of a sweep, ``name -> differs``: every key the sweep varies, the regularizer stack,
    and its members' strengths (their numeric keys: λ, p, α...), which differ when a member is in some of
    the sweep's stacks only. The constant rest of the config is left out: TensorBoard ticks the first five
    columns after sorting by (not differs, name), constants included, so listing them would fill the default
    view whenever a sweep varies fewer than five keys (the Text tab shows the whole config)."""
    stacks = [set(_as_text(v).strip("[]").split(",")) - {""} for v in plan.get("regularizer", [])]
    grouped = bool(_varied(plan))
    columns = {}
    for name, values in plan.items():
        if name == "seed" and grouped:  # a row is a configuration, its seeds averaged (see sweep_label)
            continue
        differs = len({_as_text(v) for v in values}) > 1
        strength = _is_strength(name, values)
        if strength:  # a member's strength differs between a stack with the member and one without it
            differs |= not all(name.split(".")[1] in stack for stack in stacks)
        if differs or strength or name == "regularizer":
            columns[name] = differs
    return columns


def _is_strength(name: str, values: list) -> bool:
    """A member's numeric key (λ, p, α...): ``regularizer.<member>.<key>`` with numbers for values."""
    parts = name.split(".")
    return parts[0] == "regularizer" and len(parts) == 3 and _hparam_type(values) == "number"


def _varied(plan: dict[str, list]) -> list[str]:
    """The keys a sweep gives more than one value, seed aside (its configurations differ in these)."""
    return sorted(k for k, vs in plan.items() if k != "seed" and len({_as_text(v) for v in vs}) > 1)


def sweep_label(plan: dict[str, list], hparams: dict[str, Any]) -> str:
    """A job's configuration in the sweep's own terms, e.g. ``regularizer=[dropout]``: its values of the keys
    the sweep varies (seed aside). It is the HParams session group: the table gets one row per configuration,
    named so, with its metrics averaged over seeds (expand a row for the single runs). "" when the sweep varies
    only the seed (then each run is a row and seed a column)."""
    return ",".join(f"{k}={_as_text(hparams[k])}" for k in _varied(plan) if k in hparams)


def experiment_pb(plan: dict[str, list]):
    """The HParams experiment of a sweep (``sweep_columns``) with its domains and metric columns."""
    from google.protobuf import struct_pb2
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    infos = []
    for name, differs in sorted(sweep_columns(plan).items()):
        values, kind = plan[name], _hparam_type(plan[name])
        info = api_pb2.HParamInfo(name=name, differs=differs)
        if kind == "number":
            info.type = api_pb2.DATA_TYPE_FLOAT64
            info.domain_interval.min_value, info.domain_interval.max_value = min(values), max(values)
        else:
            info.type = api_pb2.DATA_TYPE_BOOL if kind == "bool" else api_pb2.DATA_TYPE_STRING
            info.domain_discrete.CopyFrom(struct_pb2.ListValue(values=[
                struct_pb2.Value(bool_value=v) if kind == "bool" else struct_pb2.Value(string_value=_as_text(v))
                for v in values]))
        infos.append(info)
    clean = all(isinstance(v, int) and v > 0 for v in plan.get("trainer.clean_subset", [1]))
    c, t = ("_clean", "clean train") if clean else ("", "train")
    metrics = {tag.format(c=c): title.format(t=t) for tag, title in HPARAM_METRICS.items()}
    stacks = " ".join(_as_text(v) for v in plan.get("regularizer", []))
    extras = [m for m in ("mc_dropout", "ensemble") if m in stacks]
    extras += ["tta"] if True in plan.get("augmentation.tta.enabled", []) else []
    metrics.update({f"test/{name}_{k}": f"test {k.upper() if k != 'acc' else k} ({name})"
                    for name in extras for k in EXTRA_METRICS})
    return plugin_data_pb2.HParamsPluginData(experiment=api_pb2.Experiment(hparam_infos=infos, metric_infos=[
        api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag), display_name=title) for tag, title in metrics.items()]))


def _session_start(hparams: dict[str, Any], types: dict[str, str], group: str = ""):
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = plugin_data_pb2.SessionStartInfo(group_name=group)
    for k, v in hparams.items():
        kind = types.get(k) or _hparam_type([v])
        if kind == "bool":
            start.hparams[k].bool_value = v
        elif kind == "number":
            start.hparams[k].number_value = v
        else:
            start.hparams[k].string_value = _as_text(v)
    return plugin_data_pb2.HParamsPluginData(session_start_info=start)


def _hparams_summary(which: str, data):
    """A Summary with the HParams plugin's ``_hparams_/<which>`` tag carrying ``data`` (the plugin reads only the
    metadata)."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import metadata

    return Summary(value=[Summary.Value(tag=f"_hparams_/{which}", metadata=metadata.create_summary_metadata(data))])


def test_scalars(test: dict[str, float], extra: dict[str, dict]) -> dict[str, float]:
    """The test results as scalar tags (written once, at the last epoch's step); NaN/inf are left out."""
    values = {"test/acc": test["acc"], "test/loss": test["loss"], "test/ece": test["ece"]}
    for name, result in extra.items():
        values.update({f"test/{name}_{k}": result[k] for k in EXTRA_METRICS if k in result})
    return {k: float(v) for k, v in values.items() if v is not None and math.isfinite(v)}


def session_start(cfg: DictConfig) -> list:
    """The HParams summaries that open a run's session: the sweep's experiment (in every job of a sweep: the plugin
    reads any one) and this run's values, typed as the sweep's columns and grouped by its configuration."""
    hparams = flat_hparams(cfg)
    plan = _sweep_plan(hparams)
    summaries = []
    if plan is not None:
        summaries.append(_hparams_summary("experiment", experiment_pb(plan)))
        # A member absent from this job's stack applies with strength 0: its columns get 0, not a gap (the
        # parallel-coordinates view drops a session that lacks a column's value).
        hparams.update({name: 0 for name in sweep_columns(plan) if name not in hparams
                        and _is_strength(name, plan[name])})
    # Values typed as the sweep's column (a key that is a number in one job and text in another is text).
    types = {k: _hparam_type(vs) for k, vs in (plan or {}).items()}
    start = _session_start(hparams, types, sweep_label(plan, hparams) if plan else "")
    return summaries + [_hparams_summary("session_start_info", start)]


def session_end():
    """The summary that closes a run's HParams session as a success."""
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS)
    return _hparams_summary("session_end_info", plugin_data_pb2.HParamsPluginData(session_end_info=end))
