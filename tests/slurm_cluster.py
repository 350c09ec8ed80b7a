"""A throwaway single-node SLURM cluster for the test suite (Debian's slurmctld, slurmd, munge).

Everything lives under one folder (config, munge key and socket, state, spool, logs, PID files); nothing under
/etc or /run is touched and no systemd is needed: ``munged``, ``slurmctld -D`` and ``slurmd -D`` are started
here and stopped by their PID files. Usable by hand too::

    python -m tests.slurm_cluster          # starts a cluster, prints the environment to use, Ctrl-C stops it

Facts this relies on (SLURM 22.05, munge 0.5):
- munged refuses a socket whose parent folders are not all world-executable, and a Unix socket path must stay
  under 108 bytes: the folder is a short one made directly in the temp dir, mode 0755 (pytest's tmp folders
  are 0700 and long);
- without accounting storage the real ``sacct`` fails, and submitit polls ``sacct`` for job states: a small
  stand-in (``bin/sacct``, put first on PATH) answers submitit's query from ``squeue -t all``; MinJobAge keeps
  finished jobs in squeue long enough;
- Slurm's defaults make a requeued job wait for the old credential to expire (120 s) and schedule every 60 s:
  both are shortened (``AuthInfo=...,cred_expire=``, ``SchedulerParameters=sched_interval=``);
- ``EnforcePartLimits=ALL`` turns a request the node cannot satisfy into an immediate sbatch error;
- partition ``urgent`` has a higher PriorityTier and preempts jobs of ``debug`` by requeueing them
  (``PreemptMode=REQUEUE``); with ``preempt_send_user_signal`` and a GraceTime the preempted job first gets
  its ``--signal`` (submitit's USR2), as on a real cluster.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

DAEMONS = ("munged", "slurmctld", "slurmd")
PACKAGES = "slurmctld slurmd slurm-client munge"
# Seconds: a requeued job may start this long after its previous run ended (Slurm's default is 120).
CRED_EXPIRE_S = 5
# Seconds between scheduler passes (Slurm's default is 60; submissions and job ends also trigger one).
SCHED_INTERVAL_S = 1

SACCT = r"""#!/bin/sh
# sacct stand-in for a cluster without accounting storage: submitit asks
#   sacct -o JobID,State,NodeList --parsable2 -j <id> [-j <id> ...]
# and reads a '|'-separated table with a header line. squeue -t all lists running and recently finished jobs
# (finished ones for MinJobAge seconds), one line per array task with -r.
ids=""
while [ $# -gt 0 ]; do
  case "$1" in
    -j) ids="$ids,$2"; shift 2 ;;
    *) shift ;;
  esac
done
echo "JobID|State|NodeList"
[ -n "$ids" ] && squeue -h -r -t all -j "${ids#,}" -o "%i|%T|%N" 2>/dev/null
exit 0
"""


def missing_binaries() -> list[str]:
    return [b for b in ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")
            if shutil.which(b, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _world_executable(path: Path) -> bool:
    return all(os.stat(p).st_mode & 0o001 for p in [path, *path.parents])


def _short_root() -> Path:
    """A fresh folder whose parents are all world-executable and whose socket path stays short."""
    for base in (tempfile.gettempdir(), "/tmp"):
        base_path = Path(base)
        if base_path.is_dir() and _world_executable(base_path) and len(base) < 40:
            root = Path(tempfile.mkdtemp(prefix="rbslurm-", dir=base))
            root.chmod(0o755)
            return root
    raise RuntimeError("no world-executable temp folder with a short path for munged's socket")


class SlurmCluster:
    """One node (this machine, declared with at least 4 CPUs and 8 GB), partitions ``debug`` (default) and
    ``urgent`` (preempts ``debug``)."""

    def __init__(self, root: Optional[Path] = None, mem_mb: int = 8192):
        self.root = root or _short_root()
        self.mem_mb = mem_mb
        # At least 4 CPUs, whatever the machine has: jobs of the tests mostly sleep, and 3 must run at once.
        self.cpus = max(4, os.cpu_count() or 1)
        self.node = socket.gethostname().split(".")[0]
        self.user = getpass.getuser()
        self.conf = self.root / "slurm.conf"
        self.socket = self.root / "munge" / "sock"
        self.bin = self.root / "bin"
        self.logs = self.root / "log"
        self.pids = self.root / "pid"
        self.procs: dict[str, subprocess.Popen] = {}
        self.start_time_s: Optional[float] = None

    # ---------------------------------------------------------------------------------------- environment

    @property
    def env(self) -> dict[str, str]:
        """The environment for SLURM commands and for processes that submit jobs (jobs inherit it)."""
        path = f"{self.bin}:{os.environ.get('PATH', '')}:/usr/sbin:/sbin"
        return {**os.environ, "SLURM_CONF": str(self.conf), "PATH": path}

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, check=check, timeout=timeout)

    # ------------------------------------------------------------------------------------------ start/stop

    def start(self, timeout: float = 60) -> "SlurmCluster":
        t0 = time.perf_counter()
        for sub in ("munge", "state", "spool", "bin", "log", "pid"):
            (self.root / sub).mkdir(exist_ok=True)
        (self.root / "munge").chmod(0o755)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        sacct = self.bin / "sacct"
        sacct.write_text(SACCT)
        sacct.chmod(0o755)
        self._write_conf()
        try:
            self._spawn("munged", ["munged", "-F", "--force", f"--socket={self.socket}", f"--key-file={key}",
                                   f"--pid-file={self.pids / 'munged.pid'}", f"--log-file={self.logs / 'munged.log'}",
                                   f"--seed-file={self.root / 'munge' / 'seed'}"])
            self._wait(lambda: self.socket.exists(), timeout, "munged's socket")
            self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
            self._wait(lambda: self.run("scontrol", "ping", check=False).stdout.find("UP") >= 0, timeout,
                       "slurmctld to answer")
            self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.node])
            self._wait(self._node_ready, timeout, "the node to be idle")
        except BaseException:
            self.stop()
            raise
        self.start_time_s = time.perf_counter() - t0
        return self

    def _node_ready(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%t", check=False).stdout.split()
        return bool(out) and all(s == "idle" for s in out)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = open(self.logs / f"{name}.out", "ab")
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead[0]} exited with status {self.procs[dead[0]].returncode}:\n"
                                   + self.log_tail(dead[0]))
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}\n" + self.log_tail())
            time.sleep(0.1)

    def stop(self, remove: bool = True) -> None:
        """Cancel every job, stop the daemons by their PID files (SIGTERM, then SIGKILL after 10 s), kill what is
        left of the jobs (slurmd does not take its jobs down with it), remove the folder."""
        self._cancel_all()
        for name in reversed(DAEMONS):
            pid = self._pid(name)
            proc = self.procs.get(name)
            if pid is None and proc is not None and proc.poll() is None:
                pid = proc.pid  # died before writing its PID file, or never got that far
            if pid is not None:
                _terminate(pid)
            if proc is not None:
                try:
                    proc.wait(timeout=1)
                except subprocess.TimeoutExpired:
                    pass
        for pid in self._job_processes():
            _terminate(pid, wait_s=0)
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)

    def _cancel_all(self, wait_s: float = 15) -> None:
        if self._pid("slurmctld") is None:
            return
        try:
            jobs = self.run("squeue", "-h", "-o", "%A", check=False, timeout=10).stdout.split()
            if jobs:
                self.run("scancel", *sorted(set(jobs)), check=False, timeout=10)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and self.run("squeue", "-h", "-t", "running,completing,configuring",
                                                           check=False, timeout=10).stdout.strip():
                time.sleep(0.2)
        except subprocess.TimeoutExpired:
            pass

    def _job_processes(self) -> list[int]:
        """This cluster's slurmstepd processes still alive (their environment names this cluster's config) and
        everything below them: the jobs' processes."""
        mark = f"SLURM_CONF={self.conf}".encode()
        children: dict[int, list[int]] = {}
        steps = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                stat = (proc / "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(proc.name))
                if (proc / "comm").read_text().strip() == "slurmstepd" and \
                        mark in (proc / "environ").read_bytes().split(b"\0"):
                    steps.append(int(proc.name))
            except (OSError, ValueError, IndexError):
                pass
        found, todo = [], list(steps)
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo.extend(children.get(pid, []))
        return found

    def _pid(self, name: str) -> Optional[int]:
        try:
            return int((self.pids / f"{name}.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def log_tail(self, *names: str, lines: int = 30) -> str:
        out = []
        for path in sorted(self.logs.glob("*")):
            if names and not any(path.name.startswith(n) for n in names):
                continue
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(out)

    # -------------------------------------------------------------------------------------------- config

    def _write_conf(self) -> None:
        r = self.root
        auth = f"socket={self.socket},cred_expire={CRED_EXPIRE_S}"
        self.conf.write_text(f"""\
# A throwaway single-node cluster for regbench's tests; see tests/slurm_cluster.py.
ClusterName=regbench
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser={self.user}
SlurmdUser={self.user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo={auth}
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={self.pids / 'slurmctld.pid'}
SlurmdPidFile={self.pids / 'slurmd.pid'}
SlurmctldLogFile={self.logs / 'slurmctld.log'}
SlurmdLogFile={self.logs / 'slurmd.log'}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
SchedulerType=sched/builtin
SchedulerParameters=sched_interval={SCHED_INTERVAL_S}
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
EnforcePartLimits=ALL
JobRequeue=1
KillWait=2
MinJobAge=3600
MessageTimeout=10
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.mem_mb} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=10
PartitionName=urgent Nodes={self.node} MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
""")


def _terminate(pid: int, wait_s: float = 10) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        try:  # reap it if it is our child
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            pass
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def for_tests():
    """A started cluster for a test module's fixture (``yield from for_tests()``), stopped after it; the tests skip,
    saying why, where SLURM is not installed, or where it does not start as a non-root user."""
    import pytest

    missing = missing_binaries()
    if missing:
        pytest.skip(f"SLURM is not installed here (missing {', '.join(missing)}); `make test` installs Debian's "
                    f"{PACKAGES} with apt-get where it can (as root)")
    cluster = SlurmCluster()
    try:
        try:
            cluster.start()
        except RuntimeError as e:
            if os.geteuid() == 0:
                raise  # installed, as root: a cluster that does not start is a failure, not a skip
            pytest.skip(f"the test cluster did not start as a non-root user ({str(e).splitlines()[0]}); the "
                        "SLURM tests run as root (as in CI)")
        yield cluster
    finally:
        cluster.stop()


if __name__ == "__main__":
    cluster = SlurmCluster().start()
    print(f"cluster up in {cluster.start_time_s:.1f} s under {cluster.root}")
    print(f"export SLURM_CONF={cluster.conf} PATH={cluster.bin}:$PATH")
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
