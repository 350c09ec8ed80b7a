"""Sweep job folders: named by what the jobs vary, never colliding, never adopting another command's job.

The command line computes the naming before Hydra launches the jobs, and checks the folders a sweep would reuse
(what a job would do with an earlier command's folder is regbench.job_plan's; running the jobs and their
outcomes are regbench.sweep's, which uses the names, never the other way round).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Optional

from regbench.errors import RegbenchError
from regbench.io import load_folder_yaml, refuse_linked_parts
from regbench.job_plan import job_plan
from regbench.rundir import BOOKKEEPING, RESUME_MAY_DIFFER, refuse_links

# ------------------------------------------------------------------------------------ folder names
# A job's folder is <sweep dir>/<what this job varies>/seed=<n>: the overrides that differ between the jobs of
# the sweep (what the sweep compares), never the ones they share (150+ characters for a study's quick form).
# The command computes which keys vary and hands Hydra the others as override_dirname.exclude_keys; the stack
# is written in its fixed order ([dropout,l2] and [l2,dropout] are one run, one folder).
NAMING_KEY = "hydra.job.config.override_dirname.exclude_keys"
# Keys that do not change what a run computes: a job folder of an earlier command may differ in them (one that
# is resumed, in any key a resume may differ in).
NOT_DEFINING = BOOKKEEPING


def canonical_name(override_dirname: str) -> str:
    """``regularizer=[dropout,l2]`` -> ``regularizer=[l2,dropout]`` inside a folder name; "" -> "default"."""
    import re

    from regbench.regularizers import REGISTRY, rank

    def order(name: str):
        member = name if name in REGISTRY else _preset_member(name)
        return (rank(member), name) if member in REGISTRY else (10**6, name)

    def sort(m) -> str:
        members = sorted((x.strip() for x in m.group(2).split(",") if x.strip()), key=order)
        return f"{m.group(1)}[{','.join(members)}]"

    return re.sub(r"((?:^|,)regularizer=)\[([^\]]*)\]", sort, override_dirname) or "default"


@functools.lru_cache(maxsize=None)
def _preset_member(option: str) -> Optional[str]:
    """The member a preset of the regularizer group configures (lecture_dropout -> dropout), from its YAML."""
    import yaml

    path = Path(__file__).resolve().parent / "configs" / "regularizer" / f"{option}.yaml"
    try:
        keys = [k for k in (yaml.safe_load(path.read_text()) or {}) if k != "defaults"]
    except (OSError, yaml.YAMLError, TypeError):
        return None
    return keys[0] if len(keys) == 1 else None


def sweep_jobs(overrides: list[str], params: dict) -> list[list[str]]:
    """Every job of a multirun as its list of task overrides, enumerated as Hydra's basic sweeper does
    (a study's hydra.sweeper.params first, the command line wins for a key)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    given = [o for o in parser.parse_overrides(list(overrides)) if not o.is_hydra_override()]
    keys = {o.key_or_group for o in given}
    lines = [f"{k}={v}" for k, v in params.items() if k not in keys] + [o.input_line for o in given]
    return BasicSweeper.split_arguments(parser.parse_overrides(lines), None)[0]


def _parsed(job: list[str]) -> dict[str, str]:
    """key -> override line of one job."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return {o.key_or_group: o.input_line for o in OverridesParser.create().parse_overrides(job)}


def naming(jobs: list[list[str]]) -> tuple[list[str], list[str]]:
    """(keys left out of folder names, each job's folder name without its seed=<n> part)."""
    parsed = [_parsed(job) for job in jobs]
    keys = sorted({k for p in parsed for k in p})
    varying = {k for k in keys if len({p.get(k) for p in parsed}) > 1} - {"seed"}
    exclude = [k for k in keys if k not in varying] + (["seed"] if "seed" not in keys else [])
    names = [canonical_name(",".join(sorted(p[k] for k in p if k in varying))) for p in parsed]
    return exclude, names


def naming_override(overrides: list[str], params: dict) -> Optional[str]:
    """The override that makes Hydra name each job folder by what varies (None if the user set it)."""
    if any(o.split("=", 1)[0].lstrip("+~") == NAMING_KEY for o in overrides):
        return None
    exclude, _ = naming(sweep_jobs(overrides, params))
    return f"{NAMING_KEY}=[{','.join(repr(k) for k in exclude)}]"


def check_folders(overrides: list[str], params: dict, sweep_dir: Path, default_seed: int) -> None:
    """Refuse (one line, before launching) a sweep whose jobs would share a folder, or that would take over a
    folder of an earlier command's job with other overrides (it would be skipped or resumed as this job)."""
    jobs = sweep_jobs(overrides, params)
    _, names = naming(jobs)
    seen: dict[str, list[str]] = {}
    for job, name in zip(jobs, names):
        seed = _parsed(job).get("seed", f"seed={default_seed}").split("=", 1)[1]
        folder = f"{name}/seed={int(seed) if seed.lstrip('-').isdigit() else seed}"
        if folder in seen:
            a, b = _parsed(seen[folder]), _parsed(job)
            differ = [k for k in a if a[k] != b.get(k)]
            what = (f"{' '.join(a[k] for k in differ)} and {' '.join(b[k] for k in differ)} are the same run (a "
                    "stack's order does not matter)" if differ else f"the job {' '.join(job)} is listed twice")
            raise RegbenchError(f"two jobs of this sweep map to one folder, {folder}: {what}; fix: list each "
                                "configuration once")
        seen[folder] = job
        _check_earlier(sweep_dir / folder, job, sweep_dir)


def _defining(job: list[str], free: tuple[str, ...] = NOT_DEFINING) -> set[str]:
    return {canonical_name(line) for k, line in _parsed(job).items() if k.lstrip("+~") not in free}


def _check_earlier(run_dir: Path, job: list[str], sweep_dir: Path) -> None:
    refuse_linked_parts(run_dir / ".hydra", sweep_dir)  # a job folder is never reached through a link
    refuse_links(run_dir)
    saved = run_dir / ".hydra" / "overrides.yaml"
    if not os.path.lexists(saved):
        return
    action, _ = job_plan(run_dir)
    if action not in ("skip", "resume"):
        return  # a failed or empty earlier attempt is retried (and kept under attempts/)
    free = RESUME_MAY_DIFFER if action == "resume" else NOT_DEFINING
    earlier = load_folder_yaml(saved, "the job's saved overrides", root=sweep_dir)
    valid = isinstance(earlier, list) and all(isinstance(x, str) for x in earlier)
    try:
        earlier_set = _defining(earlier, free) if valid else None
    except Exception:  # noqa: BLE001 - a run folder is data: an override Hydra cannot parse counts as "other"
        earlier_set = None
    if earlier_set != _defining(job, free):
        theirs = " ".join(sorted(earlier_set - _defining(job, free))) if earlier_set is not None else "unreadable"
        raise RegbenchError(
            f"{run_dir}: holds a job of an earlier command with other overrides ({theirs or 'fewer overrides'}; "
            f"now: {' '.join(sorted(_defining(job, free) - (earlier_set or set()))) or 'fewer overrides'}); this "
            f"sweep would {'skip' if action == 'skip' else 'resume'} it as its own; fix: choose another "
            "hydra.sweep.dir=..., or repeat the earlier command's overrides")
