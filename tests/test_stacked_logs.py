"""A stack's log lines (regbench.stacked.logs): each member's in its own regbench.log; on the console in a single
run's format with its ``[regbench.*][LEVEL]`` label, prefixed by the member — also under the stacked launcher, whose
console handler has Hydra's launcher format ``[time][HYDRA] message`` (issue 25)."""

from __future__ import annotations

import io
import logging

from regbench.stacked.logs import member_logs


def test_console_lines_keep_their_labels_and_files_get_their_members_lines(tmp_path):
    dirs = [tmp_path / "sweep" / f"seed={k}" for k in range(2)]
    for d in dirs:
        d.mkdir(parents=True)
    console = io.StringIO()
    handler = logging.StreamHandler(console)
    handler.setFormatter(logging.Formatter("[%(asctime)s][HYDRA] %(message)s"))  # hydra_logging's console
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    log = logging.getLogger("regbench.train")
    try:
        with member_logs(dirs) as logs:
            with logs.member(1):
                log.info("epoch 1/2 of member 1")
            log.warning("the stack as a whole")
        log.info("after the stack")
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    lines = console.getvalue().splitlines()
    assert lines[0].startswith("[sweep/seed=1] [")
    assert lines[0].endswith("][regbench.train][INFO] - epoch 1/2 of member 1")
    assert "[HYDRA]" not in lines[0] and lines[1].endswith("][regbench.train][WARNING] - the stack as a whole")
    assert lines[2].endswith("][HYDRA] after the stack")  # the handler's own format is back
    files = [(d / "regbench.log").read_text() for d in dirs]
    assert "member 1" not in files[0] and "][regbench.train][INFO] - epoch 1/2 of member 1" in files[1]
    assert all("the stack as a whole" in f for f in files)
