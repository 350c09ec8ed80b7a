"""Binary files a user may receive from someone else (checkpoints, model.weights state dicts): hostile pickles
refused by the global they name, for every pickle protocol, zip and pre-1.6 layout; compressed zip records,
links, FIFOs, folders and oversized files refused before torch reads them; the test-hook variables checked."""

from __future__ import annotations

import io
import os
import pickle
import struct
import threading
import zipfile
from pathlib import Path

import pytest
import torch
import torchvision

from regbench import safe_load
from regbench.checkpoint import CHECKPOINT_LIMIT, check_test_hooks, fault_point, load_checkpoint
from regbench.errors import ConfigError, RegbenchError
from regbench.models.torchvision import TorchvisionNet, load_state

ARCH = "mobilenet_v3_small"


class SystemPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class EvalPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w')",))


PAYLOADS = {"posix.system": SystemPayload, "builtins.eval": EvalPayload}


def hostile(tmp_path: Path, payload: str, protocol: int, layout: str) -> Path:
    """A file whose pickle would run ``payload`` (creating tmp_path/pwned): a torch.save zip, torch's pre-1.6
    non-zip layout, or a bare pickle."""
    obj = {"model": {"weight": torch.zeros(2)}, "epoch": 1, "evil": PAYLOADS[payload](tmp_path / "pwned")}
    path = tmp_path / f"evil_{layout}_{protocol}.pt"
    if layout == "raw":
        path.write_bytes(pickle.dumps(obj, protocol=protocol))
    else:
        torch.save(obj, path, pickle_protocol=protocol, _use_new_zipfile_serialization=layout == "zip")
    return path


@pytest.fixture
def torch_load_forbidden(monkeypatch):
    """torch.load must not be reached (the file is refused before torch reads it)."""
    def forbidden(*args, **kwargs):
        raise AssertionError("torch.load was called on a file that should be refused first")

    monkeypatch.setattr(torch, "load", forbidden)


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "weights_only=False" not in msg, msg
    return msg


# ------------------------------------------------------------------------------------------ hostile pickles


@pytest.mark.parametrize("layout", ["zip", "legacy", "raw"])
@pytest.mark.parametrize("protocol", range(6))
@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_a_hostile_pickle_is_refused_naming_its_global_for_every_protocol(payload, protocol, layout, tmp_path,
                                                                          torch_load_forbidden):
    path = hostile(tmp_path, payload, protocol, layout)
    # A bare pickle of a tensor also references torch.storage._load_from_bytes (a torch.load of its own)
    names = f"torch.storage._load_from_bytes, {payload}" if layout == "raw" else payload
    with pytest.raises(RegbenchError) as e:
        load_checkpoint(path)
    assert one_line(e).startswith(f"checkpoint {path}: cannot be loaded safely (it references {names}, which "
                                  "the weights-only loader refuses; regbench never loads checkpoints unsafely); fix:")
    with pytest.raises(RegbenchError) as e:
        load_state(ARCH, str(path), False, 1 << 30)
    assert one_line(e).startswith(f"model.weights={path}: cannot be loaded safely (it references {names}, which "
                                  "the weights-only loader refuses; regbench never loads weights files unsafely)")
    assert not (tmp_path / "pwned").exists()


def test_a_hostile_weights_file_is_refused_by_the_model_naming_its_global(tmp_path):
    """The issue's case: a malicious model.weights file through the model, torch.load not monkeypatched."""
    path = hostile(tmp_path, "posix.system", 4, "zip")
    with pytest.raises(RegbenchError) as e:
        TorchvisionNet(ARCH, 3, (1, 28, 28), str(path), input_size=32)
    assert "(it references posix.system, which the weights-only loader refuses;" in one_line(e)
    assert not (tmp_path / "pwned").exists()


def test_torch_s_own_refusal_is_quoted_without_its_advice(tmp_path):
    """A pickle with only allowed globals that torch still refuses (protocol 4's FRAME opcode): torch's reason,
    cut before its advice."""
    path = tmp_path / "frame.pt"
    torch.save({"a": torch.zeros(2), "b": [1, 2]}, path, pickle_protocol=4)
    with pytest.raises(RegbenchError) as e:
        load_checkpoint(path)
    assert "the weights-only loader refuses it: Unsupported operand" in one_line(e)


# ------------------------------------------------------------------------------------ what torch never reads


def deflated(src: bytes) -> bytes:
    """The same zip, every record compressed (as a 'zip bomb' would have it)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(src)) as z, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as w:
        for info in z.infolist():
            w.writestr(info.filename, z.read(info))
    return out.getvalue()


def test_compressed_zip_records_are_refused_before_torch_reads_them(tmp_path, torch_load_forbidden):
    buf = io.BytesIO()
    torch.save({"model": {"w": torch.zeros(16 << 20, dtype=torch.uint8)}, "epoch": 1}, buf)  # 16 MiB of zeros
    bomb = tmp_path / "bomb.pt"
    bomb.write_bytes(deflated(buf.getvalue()))
    assert bomb.stat().st_size < 100_000  # inflates 200-fold
    with pytest.raises(RegbenchError) as e:
        load_checkpoint(bomb)
    assert one_line(e).startswith(f"checkpoint {bomb}: cannot be loaded safely (its record archive/data.pkl is "
                                  "compressed (zip method 8); torch.save writes uncompressed records only")
    with pytest.raises(RegbenchError, match="is compressed"):
        load_state(ARCH, str(bomb), False, 1 << 30)


def test_storages_claiming_more_than_the_file_holds_are_refused(tmp_path, torch_load_forbidden):
    """torch's pre-1.6 layout allocates each storage at the size its pickle claims, before reading it."""
    storage = object()

    class Claims(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", 10**11, None) if obj is storage else None

    body = io.BytesIO()
    Claims(body, protocol=2).dump({"weight": storage})
    data = b"".join([pickle.dumps(safe_load.LEGACY_MAGIC, 2), pickle.dumps(1001, 2),
                     pickle.dumps({"protocol_version": 1001, "little_endian": True}, 2), body.getvalue(),
                     pickle.dumps(["0"], 2), struct.pack("<q", 10**11)])
    path = tmp_path / "legacy.pt"
    path.write_bytes(data)
    with pytest.raises(RegbenchError) as e:
        load_state(ARCH, str(path), False, 1 << 30)
    assert "truncated or corrupt: its tensors claim 400,000,000,000 bytes, the file holds" in one_line(e)


def test_torch_s_pre_zip_layout_loads_as_weights_but_never_as_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    source = torchvision.models.mobilenet_v3_small()
    path = tmp_path / "old.pth"
    torch.save(source.state_dict(), path, _use_new_zipfile_serialization=False)
    net = TorchvisionNet(ARCH, 3, (1, 28, 28), str(path), input_size=32)
    assert torch.equal(net.base[0][0].weight, source.features[0][0].weight)
    with pytest.raises(RegbenchError, match="it is in torch's pre-1.6 non-zip format, which regbench never writes"):
        load_checkpoint(path)


def a_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "epoch_0001.pt"
    torch.save({"model": {"w": torch.ones(3)}, "epoch": 1}, path)
    return path


def test_links_fifos_and_folders_are_refused_without_blocking(tmp_path):
    real = a_checkpoint(tmp_path)
    assert load_checkpoint(real)["epoch"] == 1
    link = tmp_path / "link.pt"
    link.symlink_to(real)
    device = tmp_path / "zero.pt"
    device.symlink_to("/dev/zero")
    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)
    cases = {link: f"is a symbolic link (to {real}); regbench reads checkpoints only from regular files, never "
                   "through a link; fix: give the file itself",
             device: "is a symbolic link (to /dev/zero)",
             fifo: "is a FIFO, not a regular file; regbench reads checkpoints only from regular files",
             tmp_path: "is a folder, not a regular file"}
    for path, expected in cases.items():
        result = {}

        def load():
            try:
                load_checkpoint(path)
            except RegbenchError as e:
                result["msg"] = str(e)

        reader = threading.Thread(target=load, daemon=True)
        reader.start()
        reader.join(timeout=30)
        assert not reader.is_alive(), f"{path} blocked the reader"
        assert result["msg"].startswith(f"checkpoint {path}: {expected}"), result["msg"]
        with pytest.raises(RegbenchError, match=expected.split(";")[0].replace("(", r"\(").replace(")", r"\)")):
            safe_load.load_weights_only(path, "model.weights", safe_load.WEIGHTS, 1 << 30)


def test_files_larger_than_the_bound_are_refused_unread(tmp_path, torch_load_forbidden):
    sparse = tmp_path / "huge.pt"
    with open(sparse, "wb") as f:
        f.truncate(CHECKPOINT_LIMIT + 1)  # sparse: no disk used, and never read
    with pytest.raises(RegbenchError) as e:
        load_checkpoint(sparse)
    assert one_line(e).startswith(f"checkpoint {sparse}: is {CHECKPOINT_LIMIT + 1:,} bytes, more than the "
                                  f"{CHECKPOINT_LIMIT:,} regbench reads from one of its checkpoints (regbench's bound "
                                  "for one checkpoint); fix:")
    weights = tmp_path / "weights.pt"
    with open(weights, "wb") as f:
        f.truncate(200 << 20)  # mobilenet_v3_small's state dict is 10 MB: its bound is 2 x that + 64 MiB
    with pytest.raises(RegbenchError, match=r"is 209,715,200 bytes, more than the [\d,]+ regbench reads from one of "
                                            r"its weights files \(twice a mobilenet_v3_small state dict \+ 64 MiB\)"):
        TorchvisionNet(ARCH, 3, (1, 28, 28), str(weights), input_size=32)


def test_a_linked_weights_file_is_refused_when_the_config_is_checked(tmp_path):
    from regbench.validation import validate
    from tests.conftest import TINY, compose_cfg

    real = tmp_path / "real.pth"
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), real)
    link = tmp_path / "link.pth"
    link.symlink_to(real)
    with pytest.raises(RegbenchError, match=f"model.weights={link}: is a symbolic link"):
        validate(compose_cfg(*TINY, "model=torchvision", f"model.arch={ARCH}", f"model.weights={link}"))


# ------------------------------------------------------------------------------------------- test hooks


@pytest.mark.parametrize("var,value", [("REGBENCH_FAULT", "after_metrics"), ("REGBENCH_FAULT", "after_metrics:two"),
                                       ("REGBENCH_FAULT", "after metrics:1"), ("REGBENCH_PAUSE", "1"),
                                       ("REGBENCH_PAUSE", "1:soon"), ("REGBENCH_PAUSE", "x:1"),
                                       ("REGBENCH_PAUSE", "1:99999999999999999999")])  # overflowed time.sleep
def test_a_malformed_test_hook_variable_is_one_line(var, value, monkeypatch):
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError, match=f"^{var}='{value}': expected .*; unset it \\(unset {var}\\)"):
        check_test_hooks()
    with pytest.raises(ConfigError):  # the hook itself never ignores it, nor fails with a traceback
        fault_point("after_summary", 1)


@pytest.mark.parametrize("value", ["after_checkpoint:3", "after_member_record_2:1", "during_write:summary.json"])
def test_well_formed_test_hook_values_are_accepted(value, monkeypatch):
    monkeypatch.setenv("REGBENCH_FAULT", value)
    monkeypatch.setenv("REGBENCH_PAUSE", "1:0")
    check_test_hooks()
    fault_point("after_summary", 1)  # pauses 0 s; the fault is at another point


@pytest.mark.parametrize("body", [lambda n: b"N" * n + b"(t" * (n // 2),   # many MARK/TUPLE pairs over a deep stack
                                  lambda n: b"".join(b"c" + b"m%d\nf\n" % i + b"0" for i in range(n // 8))],  # globals
                         ids=["marks", "globals"])
def test_the_pickle_scan_is_linear_in_the_file(body, tmp_path):
    """A hostile pickle cannot stall the scan: 1 MB of MARK-closing opcodes over a deep stack (quadratic before:
    minutes), or of distinct refused globals, is scanned in well under a second's work per MB."""
    import time

    data = b"\x80\x02" + body(1 << 20) + b"N."
    start = time.process_time()
    scan = safe_load.scan_pickles(io.BytesIO(data), 1)
    assert time.process_time() - start < 20  # linear: ~1 s on a slow core; quadratic: far beyond
    assert len(scan.refused) <= 8
