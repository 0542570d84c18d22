"""The CLI as a user runs it: exit codes, one-line errors, JSON output."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from conftest import ARCH, SHAPE, run_cli


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("deploy ")


@pytest.mark.parametrize("args", [(), ("profiles",), ("inspect",), ("profiles", "show")])
def test_every_command_has_help(args):
    result = run_cli(*args, "--help")
    assert result.returncode == 0 and "Usage" in result.stdout


def test_profiles_list_shows_every_builtin():
    from deploy.profiles import builtin_names

    result = run_cli("profiles", "list", "--json")
    assert result.returncode == 0
    names = {p["name"] for p in json.loads(result.stdout)}
    assert names == set(builtin_names()) and len(names) == 13
    assert {"jetson-orin-nano", "cpu-avx512-vnni-openvino", "cpu-amx-openvino", "cpu-avx2-openvino"} <= names


def test_profiles_show_alias():
    result = run_cli("profiles", "show", "jetson", "--json")
    data = json.loads(result.stdout)
    assert data["name"] == "jetson-orin-nano" and "resolved" in data["note"]


def test_unknown_target_exit_2_with_suggestion():
    result = run_cli("profiles", "show", "nvidia-h10")
    assert result.returncode == 2
    assert "did you mean 'nvidia-h100'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_inspect_json_on_state_dict(model_files):
    result = run_cli("inspect", model_files["state_dict"], "--arch", ARCH, "--input-shape", SHAPE, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["format"] == "state_dict" and data["total_params"] == sum(l["params"] for l in data["layers"])
    assert any("prune" in p for l in data["layers"] for p in l["passes"])


def test_inspect_example_and_graph_formats_agree(model_files):
    example = json.loads(run_cli("inspect", "--example", "--json").stdout)
    exported = json.loads(run_cli("inspect", model_files["exported"], "--json").stdout)
    assert example["total_macs"] == exported["total_macs"] and example["total_params"] == exported["total_params"]
    assert all("prune" not in " ".join(l["passes"]) for l in exported["layers"])


@pytest.mark.parametrize("setup, args, message", [
    ("zero", (), "empty (0 bytes)"),
    ("state_dict", ("--input-shape", SHAPE), "--arch"),
    ("pickle", ("--input-shape", SHAPE), "--trust-pickle"),
    ("wrong_ext", (), "unknown model file extension"),
])
def test_inspect_errors_are_one_line_exit_2(tmp_path, model_files, setup, args, message):
    if setup == "zero":
        path = tmp_path / "zero.pt"
        path.write_bytes(b"")
    elif setup == "wrong_ext":
        path = tmp_path / "model.xyz"
        path.write_bytes(b"abc")
    else:
        path = model_files[setup]
    result = run_cli("inspect", path, *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_debug_shows_the_traceback(tmp_path):
    path = tmp_path / "zero.pt"
    path.write_bytes(b"")
    for args in (("--debug", "inspect", path), ("inspect", path, "--debug")):  # where a one-line error says to add it
        result = run_cli(*args)
        assert result.returncode != 0 and "Traceback" in result.stderr and "No such option" not in result.stderr


def test_pickle_with_the_flag(model_files):
    result = run_cli("inspect", model_files["pickle"], "--trust-pickle", "--input-shape", SHAPE, "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["format"] == "pickle"


def test_a_native_crash_prints_where_python_was():
    """A segfault in a runtime's native code cannot be caught; main() has Python print the stack it crashed in."""
    crash = ("import ctypes, deploy.cli as cli\n"
             "def measuring_candidates(args, debug):\n"
             "    ctypes.string_at(0)\n"
             "cli._run = measuring_candidates\n"
             "cli.main(['compress'])\n")
    result = subprocess.run([sys.executable, "-c", crash], capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGSEGV
    assert "Segmentation fault" in result.stderr and "measuring_candidates" in result.stderr
