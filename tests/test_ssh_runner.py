"""The ssh runner against a real sshd on 127.0.0.1 (tests/sshd.py): this machine plays the remote device, with this
venv's python as the remote python so onnxruntime is there."""
from __future__ import annotations

import fcntl
import json
import os
import socket
import stat
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from deploy.core.errors import MeasurementError, RuntimeUnavailableError, UserInputError
from deploy.targets.runners import remote_measure, remote_trtexec
from deploy.targets.measure.fingerprint import fingerprint
from deploy.targets.measure.loop import MeasureConfig, Measurement
from deploy.targets.runners.remote import measure_remote
from deploy.targets.runners.ssh import RemoteConfig, SshConfig, parse_ssh_url
import sshd
from sshd import free_port, keygen

QUICK = MeasureConfig.quick(min_samples=20, min_seconds=0.05)
sshd_server = sshd.sshd_server  # the fixture: a real sshd on 127.0.0.1


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    """x[batch, 64] -> relu(x @ W): small enough that remote start-up, not the model, is the cost."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["y"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    onnx.save(model, str(path))
    return path


def config_for(server, tmp_path: Path, **changes) -> RemoteConfig:
    ssh_changes = {k: changes.pop(k) for k in list(changes) if k in SshConfig.__dataclass_fields__}
    ssh = SshConfig(**{"identity_file": str(server.identity), "remote_python": sys.executable,
                       "remote_workdir": str(tmp_path / "remote"), "remote_lock": str(tmp_path / "lock"),
                       "connect_timeout_s": 5, **ssh_changes})
    return RemoteConfig(**{"threads": 1, "measure": QUICK, "ssh": ssh, "target": "cpu", **changes})


def remote_leftovers(tmp_path: Path) -> list[str]:
    folder = tmp_path / "remote"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_remote_measurement_over_ssh(sshd_server, tiny_onnx, tmp_path):
    m = measure_remote(sshd_server.url, tiny_onnx, None, config_for(sshd_server, tmp_path))
    assert m.summary["n"] >= 20 and len(m.samples_ms) == m.summary["n"]
    assert 0 < m.summary["p50"] <= m.summary["p99"]
    assert m.fingerprint["remote"] is True and m.fingerprint["ssh"] == sshd_server.url
    assert m.fingerprint["hostname"] == socket.gethostname() and m.fingerprint["threads"] == 1
    assert m.fingerprint["versions"]["onnxruntime"]
    assert set(fingerprint(1, "cpu")) <= set(m.fingerprint)  # same keys as a local fingerprint, plus remote ones
    assert m.runtime["runtime"] == "onnxruntime" and m.runtime["io_binding"] is True
    assert m.model["inputs"] == [{"name": "x", "shape": [1, 64], "dtype": "float32"}]
    assert m.lock.path == str(tmp_path / "lock") and m.lock.end >= m.lock.start > 0
    again = Measurement.from_dict(json.loads(json.dumps(m.to_dict())))  # the bench --json schema
    assert again.samples_ms == m.samples_ms and again.target == "cpu"
    assert remote_leftovers(tmp_path) == []  # the remote temp folder is gone


def test_closed_port_is_unreachable_quickly(tiny_onnx, tmp_path):
    start = time.monotonic()
    with pytest.raises(RuntimeUnavailableError) as info:
        measure_remote(f"ssh://nobody@127.0.0.1:{free_port()}", tiny_onnx, None,
                       RemoteConfig(measure=QUICK, ssh=SshConfig(connect_timeout_s=3)))
    assert time.monotonic() - start < 5
    text = info.value.one_line()
    assert "cannot reach ssh://nobody@127.0.0.1" in text and "\n" not in text


@pytest.mark.parametrize("url, words", [
    ("jetson.local", "not an ssh:// URL"),
    ("http://jetson.local", "not an ssh:// URL"),
    ("ssh://", "names no valid host"),
    ("ssh://user@host:port", "malformed"),
    ("ssh://user@host:99999", "malformed"),
    ("ssh://user:secret@host", "password"),
    ("ssh://user@host/some/path", "has a path"),
    ("ssh://user@host?colour=red", "unknown option 'colour'"),
    ("ssh://-oProxyCommand=x", "names no valid host"),
])
def test_bad_url_is_one_line(url, words):
    with pytest.raises(UserInputError) as info:
        parse_ssh_url(url)
    assert words in info.value.one_line() and "\n" not in info.value.one_line()


def test_url_options_reach_the_config():
    url = parse_ssh_url("ssh://nvidia@[fe80::1]:2222/?python=/opt/py/bin/python3&option=ProxyJump=gw&option=A=B")
    assert (url.user, url.host, url.port, str(url)) == ("nvidia", "fe80::1", 2222, "ssh://nvidia@[fe80::1]:2222")
    ssh = url.apply(SshConfig(ssh_options=("Compression=yes",)))
    assert ssh.remote_python == "/opt/py/bin/python3"
    assert ssh.ssh_options == ("Compression=yes", "ProxyJump=gw", "A=B")


def test_login_refused_with_a_key_not_authorized(sshd_server, tiny_onnx, tmp_path):
    stranger = keygen(tmp_path / "stranger")
    with pytest.raises(RuntimeUnavailableError, match="refused the ssh login"):
        measure_remote(sshd_server.url, tiny_onnx, None, config_for(sshd_server, tmp_path, identity_file=str(stranger)))


def test_missing_remote_python(sshd_server, tiny_onnx, tmp_path):
    with pytest.raises(RuntimeUnavailableError, match="has no python '/nonexistent/python3'"):
        measure_remote(sshd_server.url, tiny_onnx, None,
                       config_for(sshd_server, tmp_path, remote_python="/nonexistent/python3"))


def test_missing_remote_onnxruntime_is_named_and_cleaned_up(sshd_server, tiny_onnx, tmp_path):
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "onnxruntime.py").write_text("raise ImportError('No module named onnxruntime')\n")
    python = tmp_path / "python-without-ort"
    python.write_text(f"#!/bin/sh\nPYTHONPATH={shim} exec {sys.executable} \"$@\"\n")
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    with pytest.raises(RuntimeUnavailableError) as info:
        measure_remote(sshd_server.url, tiny_onnx, None, config_for(sshd_server, tmp_path, remote_python=str(python)))
    assert "onnxruntime is not installed" in info.value.one_line()
    assert remote_leftovers(tmp_path) == []


def test_timeout_stops_the_remote_run_and_cleans_up(sshd_server, tiny_onnx, tmp_path):
    config = config_for(sshd_server, tmp_path, timeout_s=2.5,
                        measure=MeasureConfig(min_seconds=30, max_seconds=30, min_samples=10))
    with pytest.raises(MeasurementError, match="did not finish within"):
        measure_remote(sshd_server.url, tiny_onnx, None, config)
    assert remote_leftovers(tmp_path) == []
    with open(tmp_path / "lock", "a") as handle:  # the remote process is gone: its lock is free again
        deadline = time.monotonic() + 3
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                assert time.monotonic() < deadline, "the remote measurement still holds its lock"
                time.sleep(0.05)


FAKE_TRTEXEC = """#!{python}
import json, sys
args = dict(a[2:].partition("=")[::2] for a in sys.argv[1:])
open("trtexec-args.json", "w").write(json.dumps(sys.argv[1:]))
open({record!r}, "w").write(json.dumps(sys.argv[1:]))
print("&&&& RUNNING TensorRT.trtexec [TensorRT v100300] # trtexec --onnx=model.onnx")
print("[I] Selected Device: Orin")
n = int(args["iterations"]) + 3
times = [{{"count": n}}] + [{{"startComputeMs": i, "endComputeMs": i + 1.5, "computeMs": 1.0 + i / 100,
                            "latencyMs": 2.0 + i / 100}} for i in range(n)]
json.dump(times, open(args["exportTimes"], "w"))
"""


def test_tensorrt_runtime_runs_trtexec_there(sshd_server, tiny_onnx, tmp_path):
    record = tmp_path / "trtexec-args.json"
    trtexec = tmp_path / "trtexec"
    trtexec.write_text(FAKE_TRTEXEC.format(python=sys.executable, record=str(record)))
    trtexec.chmod(0o755)
    config = config_for(sshd_server, tmp_path, runtime="tensorrt", precisions=("f16", "int8"), trtexec=str(trtexec))
    m = measure_remote(sshd_server.url, tiny_onnx, None, config)
    assert m.samples_ms == tuple(1.0 + i / 100 for i in range(23))
    assert m.runtime["version"] == "10.3.0" and m.runtime["precision"] == "f32+f16+int8"
    assert m.fingerprint["versions"]["tensorrt"] == "10.3.0" and m.fingerprint["gpu"] == "Orin"
    args = json.loads(record.read_text())
    assert "--fp16" in args and "--int8" in args and "--iterations=20" in args
    assert "--loadInputs=x:inputs/input_0.bin" in args and "--shapes=x:1x64" in args
    assert remote_leftovers(tmp_path) == []


def test_trtexec_times_parser_on_synthetic_json():
    times = [{"count": 3},
             {"startComputeMs": 10.0, "endComputeMs": 11.5, "computeMs": 1.5, "latencyMs": 1.9, "h2dMs": 0.2},
             {"startComputeMs": 12.0, "endComputeMs": 13.25, "latencyMs": 1.6},  # no computeMs: from start/end
             {"startComputeMs": 14.0, "endComputeMs": 15.0, "computeMs": 1.0, "latencyMs": 1.3}]
    assert remote_trtexec.parse_trtexec_times(times) == [1.5, 1.25, 1.0]
    assert remote_trtexec.parse_trtexec_times(times, "latencyMs") == [1.9, 1.6, 1.3]
    with pytest.raises(ValueError, match="no computeMs"):
        remote_trtexec.parse_trtexec_times([{"count": 0}])
    with pytest.raises(ValueError, match="bad"):
        remote_trtexec.parse_trtexec_times([{"computeMs": -1}])
    assert remote_trtexec._trtexec_info("[TensorRT v8601] # trtexec")["version"] == "8.6.1"


def test_remote_script_needs_no_deploy():
    """It runs where deploy is not installed: only the standard library, numpy and onnxruntime."""
    import ast

    for script in (remote_measure, remote_trtexec):  # shipped together, beside each other
        tree = ast.parse(Path(script.__file__).read_text(), feature_version=(3, 6))  # JetPack 4 has 3.6
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert names - set(sys.stdlib_module_names) <= {"numpy", "onnxruntime", "remote_trtexec"}
    assert os.path.basename(remote_measure.__file__) == "remote_measure.py"


def test_bench_cli_runner_ssh(sshd_server, tiny_onnx, tmp_path):
    from urllib.parse import urlencode

    from conftest import run_cli

    query = urlencode({"identity": sshd_server.identity, "python": sys.executable, "workdir": tmp_path / "remote",
                       "lock": tmp_path / "lock"})
    done = run_cli("bench", tiny_onnx, "--runner", f"{sshd_server.url}?{query}", "--quick", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["fingerprint"]["remote"] is True and data["summary"]["n"] >= 16
    assert data["runtime"]["remote"] == sshd_server.url and remote_leftovers(tmp_path) == []
