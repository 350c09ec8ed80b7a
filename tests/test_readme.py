"""The README walker: every command in README.md's ```bash blocks runs as printed (with tiny budgets), so the
README cannot rot. The blocks are parsed, never hard-coded: whatever the README shows is what is run.

- ``regbench ...`` lines run in-process through ``regbench.cli.main`` in a temporary working folder, with
  ``BUDGET`` appended (tiny data, one epoch) and ``hydra.run.dir`` / ``hydra.sweep.dir`` set into the folder
  where the line does not choose its own. Torchvision datasets come from small generated copies
  (``tv_root``), so lines such as ``data=cifar10`` run offline; ``~`` is a temporary home folder.
- Lines that cannot run here are listed in ``CANNOT_RUN_HERE`` with the reason, and assert what they can: a
  CUDA line fails with the documented one-line ``no-cuda`` error on a machine without CUDA (and runs on one
  with it); the SLURM line is composed and validated only (no cluster).
- ``make <target>`` lines: the target exists (``make -n``); ``tensorboard`` lines: the program resolves;
  ``. .venv/bin/activate``: the venv the Makefile creates; ``pip ...`` lines are not run (installs).
- Any other command fails the fast test below: teach the walker about it (or move the line out of a bash block).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from regbench.cli import check, main
from tests.conftest import REPO

README = REPO / "README.md"
BUDGET = ["data.train_size=64", "data.batch_size=32", "data.val_fraction=0.025", "data.test_size=100",
          "trainer.max_epochs=2", "trainer.progress_bar=false"]  # 2: warmup_cosine warms up for one epoch

# Lines (matched by a substring of the command) that cannot run on this machine, and why.
CANNOT_RUN_HERE = {
    "hydra/launcher=slurm": "needs a SLURM cluster (sbatch); here the sweep is composed and validated only",
}
# Lines that fail on this branch for a known, filed reason: strict xfail, so the entry must go once fixed.
KNOWN_BROKEN: dict[str, str] = {}


@dataclass
class Command:
    block: int       # index of the bash block in the README
    line: str        # as printed (continuations joined, comment dropped)
    argv: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.argv[:3] in (["python", "-m", "regbench"], ["python3", "-m", "regbench"]):
            self.argv = ["regbench", *self.argv[3:]]  # the same command (`python -m regbench`)

    @property
    def kind(self) -> str:
        prog = self.argv[0] if self.argv else ""
        if prog == "regbench":
            return "regbench"
        if prog in (".", "source"):
            return "activate"
        if prog == "pip" or self.argv[:3] in (["python", "-m", "pip"], ["python3", "-m", "pip"]):
            return "pip"  # installs: not run here (the wheel test in tests/test_cli.py installs regbench)
        if prog == "make":
            return "make"
        if Path(prog).name == "tensorboard":
            return "tensorboard"
        if prog in ("python", "python3") and self.argv[1:2] == ["-m"] and self.argv[2].startswith("tests."):
            return "test-module"  # a contributor's tool from tests/ (e.g. the SLURM test cluster)
        return "unknown"


def readme_commands(text: str) -> list[Command]:
    """Every command line of the README's ```bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block, body in enumerate(re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)):
        for line in body.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                commands.append(Command(block, " ".join(shlex.quote(a) for a in argv), argv))
    return commands


COMMANDS = readme_commands(README.read_text())


def _id(c: Command) -> str:
    return f"block{c.block}:{c.line[:60]}"


# ------------------------------------------------------------------------------------------- fast checks


def test_the_walker_knows_every_readme_command():
    assert sum(c.kind == "regbench" for c in COMMANDS) >= 15  # the README's examples were found
    unknown = [c.line for c in COMMANDS if c.kind == "unknown"]
    assert unknown == [], f"README bash lines the walker cannot check: {unknown}"


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if c.kind == "make"], ids=_id)
def test_make_targets_exist(cmd):
    proc = subprocess.run(["make", "-n", *cmd.argv[1:]], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if c.kind == "activate"], ids=_id)
def test_activated_venv_is_the_one_make_creates(cmd):
    venv = re.search(r"^VENV\s*\?=\s*(\S+)", (REPO / "Makefile").read_text(), flags=re.M).group(1)
    assert cmd.argv[1:] == [f"{venv}/bin/activate"]


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if c.kind == "tensorboard"], ids=_id)
def test_tensorboard_resolves(cmd):
    prog = cmd.argv[0]
    here = Path(sys.executable).parent / "tensorboard"  # the venv this suite runs in (make test: .venv)
    if "/" in prog:  # a venv path such as .venv/bin/tensorboard: that venv, or the one these tests run in
        assert (REPO / prog).exists() or (prog.startswith(".venv/bin/") and here.exists()), prog
    else:  # bare: on PATH, or in the venv once activated (`. .venv/bin/activate`, as the README says)
        assert shutil.which(prog) or here.exists()
    assert cmd.argv[1:2] == ["--logdir"] and len(cmd.argv) >= 3


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if c.kind == "test-module"], ids=_id)
def test_test_modules_exist_and_run_as_scripts(cmd):
    path = REPO / (cmd.argv[2].replace(".", "/") + ".py")
    assert path.is_file(), path
    assert 'if __name__ == "__main__":' in path.read_text()


# ------------------------------------------------------------------------------- running regbench lines


def _runs_something(argv: list[str]) -> bool:
    return not any(a in ("--help", "-h", "--cfg", "-c", "--info", "--hydra-help") for a in argv)


def _with_budget(cmd: Command, tmp: Path, i: int) -> list[str]:
    """The line's arguments with tiny budgets and folders inside ``tmp`` (where the line picks none)."""
    args = cmd.argv[1:]
    verb = args[0] if args and args[0] in ("rerun", "resume", "report") else None
    if verb in ("resume", "report") or not _runs_something(args):
        return args
    extra = [] if verb == "rerun" else list(BUDGET)
    multirun = "-m" in args or "--multirun" in args
    named_study = any(a.startswith("sweep=") for a in args)  # a fixed folder: later lines read it
    if multirun and not named_study and not any(a.startswith("hydra.sweep.dir=") for a in args):
        extra.append(f"hydra.sweep.dir={tmp}/sweeps/{i}")
    if not multirun and not any(a.startswith("hydra.run.dir=") for a in args):
        extra.append(f"hydra.run.dir={tmp}/runs/{i}")
    return [*args, *extra]


def _stand_in_runs(argv: list[str]) -> None:
    """The README's example run folders (outputs/runs/<date>/<time>) are made, tiny, where a line names one."""
    for a in argv:
        if re.fullmatch(r"outputs/runs/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d", a) and not Path(a).exists():
            main([*BUDGET, f"hydra.run.dir={a}"])


def _documented(error_id: str) -> str:
    row = next(ln for ln in (REPO / "docs" / "errors.md").read_text().splitlines() if ln.startswith(f"| `{error_id}`"))
    return row.rsplit("| `", 1)[1].rstrip("` |")


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = 0 if e.code is None else e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def readme_env(tmp_path, tv_root, monkeypatch):
    """A fresh working folder, datasets offline from generated copies, ``~`` a temporary home."""
    work = tmp_path / "work"
    work.mkdir()
    home = tmp_path / "home"
    home.mkdir()
    (home / "datasets").symlink_to(tv_root, target_is_directory=True)
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("REGBENCH_DATA", str(tv_root))
    monkeypatch.setenv("REGBENCH_DOWNLOAD", "false")  # never the network, whatever a line says by default
    monkeypatch.setattr(sys, "argv", ["regbench"])
    return work


BLOCKS = sorted({c.block for c in COMMANDS if c.kind == "regbench"})


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"block{b}:" + next(
    c.line[:50] for c in COMMANDS if c.block == b and c.kind == "regbench"))
def test_readme_block_runs_as_printed(block, readme_env, capsys):
    """The regbench lines of one bash block, in order (a later line may read what an earlier one wrote)."""
    failures = []
    for i, cmd in enumerate(c for c in COMMANDS if c.block == block and c.kind == "regbench"):
        broken = next((why for key, why in KNOWN_BROKEN.items() if key in cmd.line), None)
        reason = next((why for key, why in CANNOT_RUN_HERE.items() if key in cmd.line), None)
        argv = _with_budget(cmd, readme_env, i)
        if reason is not None:  # compose and validate every job; run nothing
            check([a for a in argv if a not in ("-m", "--multirun")], multirun=True, runs=False)
            continue
        _stand_in_runs(argv)
        code, out, err = _run(argv, capsys)
        needs_cuda = any(a.startswith("trainer.device=cuda") for a in argv)
        if needs_cuda and not torch.cuda.is_available():
            expected = f"regbench: error: {_documented('no-cuda')}\n"
            ok = code == 2 and err == expected
        else:
            ok = code == 0
        if broken is not None:
            ok = not ok  # must still fail; once it passes, remove its KNOWN_BROKEN entry
        if not ok:
            failures.append(f"{cmd.line}\n  ran: regbench {' '.join(argv)}\n  exit {code}; stderr: "
                            f"{err.strip()[-600:]}" + (f"\n  (listed as broken: {broken} — it now works: remove "
                                                       "the entry)" if broken else ""))
    assert not failures, "README lines that do not work as printed:\n" + "\n".join(failures)
