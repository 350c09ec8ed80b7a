"""The house rules of issue 13, checked: no module in src/ over 400 lines, no function over 80 lines."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
FILES = sorted(SRC.rglob("*.py"))


def test_the_source_tree_is_found():
    assert len(FILES) > 40 and (SRC / "regbench" / "train.py") in FILES


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_module_and_function_sizes(path):
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 400, f"{path} has {len(text.splitlines())} lines (at most 400)"
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(ast.parse(text))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 80]
    assert not long, f"{path}: functions over 80 lines: {long}"


# ------------------------------------------------------------------------------------------- layers (issue 26)
# The layers, top to bottom. A module may import from its own layer and the layers below it, never from a layer
# above; the import graph (module-level AND function-local imports) has no cycle. A new module is placed here.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("entry points", ("regbench.__main__", "regbench.cli", "hydra_plugins.*")),
    ("commands", ("regbench.cli_check", "regbench.cli_saved", "regbench.cli_errors", "regbench.report",
                  "regbench.report_files", "regbench.report_plots", "regbench.report_figures", "regbench.slurm",
                  "regbench.stacked.launcher", "regbench.sweep", "regbench.sweep_names", "regbench.job_plan",
                  "regbench.search")),
    ("dispatch", ("regbench.train",)),
    ("engines", ("regbench.stacked", "regbench.stacked.*")),  # (stacked.launcher: matched first, above)
    ("one run", ("regbench.run",)),
    ("a run's parts", ("regbench.state", "regbench.rundir", "regbench.logs", "regbench.hparams", "regbench.loop",
                       "regbench.provenance")),
    ("experiment", ("regbench.experiment", "regbench.validation")),
    ("components", ("regbench.regularizers", "regbench.regularizers.*", "regbench.models", "regbench.models.*",
                    "regbench.optim", "regbench.augment", "regbench.augment.*", "regbench.data", "regbench.datasets",
                    "regbench.splits", "regbench.accel", "regbench.faststep", "regbench.fastoptim",
                    "regbench.runtime", "regbench.registry", "regbench.lint", "regbench.conventions")),
    ("foundation", ("regbench.records", "regbench.evaluation", "regbench.metrics", "regbench.config",
                    "regbench.checkpoint", "regbench.safe_load", "regbench.io", "regbench.speed",
                    "regbench.compile_cache", "regbench.errors", "regbench.stats", "regbench")),
]
# Function-local imports of regbench modules: each must be listed here with the reason it is lazy (a lazy import
# hides an edge from a reader; the checks below see it all the same).
LAZY: dict[tuple[str, str], str] = {
    ("regbench.cli", "regbench.train"): "the command line imports the training stack only for a run it starts "
                                        "(`regbench report` and the pre-run check need none of it)",
    ("regbench.cli", "regbench.sweep"): "likewise: a sweep job's bookkeeping, only inside a sweep's job",
    ("regbench.cli", "regbench.report"): "`regbench report` needs neither Hydra's app nor the training stack",
    ("regbench.stacked.launcher", "regbench.train"): "Hydra imports every hydra_plugins module at each start (also "
                                                     "`regbench --help`); the training stack imports torch",
    ("regbench.stacked.launcher", "regbench.stacked.grouping"): "likewise: grouping asks the members (torch)",
    ("regbench.sweep_names", "regbench.regularizers"): "reached from the SLURM plugin's scan (slurm -> sweep -> "
                                                       "sweep_names); the members' order imports torch",
}


def _modules() -> dict[str, Path]:
    out = {}
    for p in FILES:
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _layer(module: str) -> int:
    for i, (_, patterns) in enumerate(LAYERS):
        for pattern in patterns:
            if module == pattern or (pattern.endswith(".*") and module.startswith(pattern[:-1])):
                return i
    raise AssertionError(f"module {module} is in no layer of tests/test_structure.py LAYERS: place it")


def _imports(module: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported regbench module, line, function-local) for every import statement of ``module``."""
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f)}
    out = []
    for n in ast.walk(tree):
        names = []
        if isinstance(n, ast.Import):
            names = [a.name for a in n.names]
        elif isinstance(n, ast.ImportFrom):
            base = module.split(".") if is_pkg else module.split(".")[:-1]
            if n.level:
                base = base[:len(base) - (n.level - 1)]
                target = ".".join(base + ([n.module] if n.module else []))
            else:
                target = n.module or ""
            names = [f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target for a in n.names]
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module and (name.startswith("regbench") or name.startswith("hydra_plugins")):
                out.append((name, n.lineno, id(n) in local))
    return out


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def test_every_module_has_a_layer():
    for m in MODULES:
        _layer(m)


def test_no_import_reaches_up_a_layer():
    up = [f"{m}:{line} imports {t} ({LAYERS[_layer(t)][0]} above {LAYERS[_layer(m)][0]})"
          for m, edges in GRAPH.items() for t, line, _ in edges if _layer(t) < _layer(m)]
    assert not up, "upward imports:\n" + "\n".join(up)


def test_the_import_graph_has_no_cycle():
    edges = {m: sorted({t for t, _, _ in es}) for m, es in GRAPH.items()}
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for t in edges[m]:
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_function_local_imports_are_listed_with_a_reason():
    lazy = sorted({(m, t) for m, es in GRAPH.items() for t, _, is_local in es if is_local})
    unlisted = [f"{m} -> {t}" for m, t in lazy if (m, t) not in LAZY]
    assert not unlisted, ("function-local imports without a reason in LAZY (import at the top of the module, or "
                          "list it with why it must stay lazy):\n" + "\n".join(unlisted))
    stale = [f"{m} -> {t}" for m, t in LAZY if (m, t) not in lazy]
    assert not stale, "LAZY lists imports that are no longer lazy: " + ", ".join(stale)


def test_the_layer_check_sees_function_local_imports(tmp_path):
    """The checks above parse imports inside functions too (a lazy upward import is still upward)."""
    edges = GRAPH["regbench.cli"]
    assert any(t == "regbench.train" and is_local for t, _, is_local in edges)


def test_the_engines_drive_runs_by_public_methods():
    """No module under stacked/ sets a field of a member's Run (``run.bar = ...``) or touches a private attribute of
    an optimizer or schedule (``optimizer._opt_called``): a member's Run and torch's objects are driven by their
    public methods only (issue 26)."""
    import dataclasses
    import re

    from regbench.run import Run

    fields = {f.name for f in dataclasses.fields(Run)}
    bad = []
    for path in sorted((SRC / "regbench" / "stacked").glob("*.py")):
        if _layer(f"regbench.stacked.{path.stem}") != _layer("regbench.stacked.engine"):
            continue  # the launcher (commands layer) restores Hydra's own config as Hydra's run_job does
        for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = n.targets if isinstance(n, ast.Assign) else [n.target] if isinstance(n, ast.AugAssign) else []
            for t in targets:
                if isinstance(t, ast.Attribute) and t.attr in fields and not ast.unparse(t.value) == "self":
                    bad.append(f"{path.name}:{n.lineno} sets {ast.unparse(t)}")
            if (isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__")
                    and re.search(r"optimizer|scheduler|\bopt\b|sched", ast.unparse(n.value))):
                bad.append(f"{path.name}:{n.lineno} reads {ast.unparse(n)}")
    assert not bad, "\n".join(bad)
