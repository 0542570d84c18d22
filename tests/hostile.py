"""Malicious model files for the security tests: each writes a sentinel file when (and only when) code in it runs.

Every payload returns what the loader expects (a tensor, example inputs), so a loader that runs it goes on
as if nothing happened: only the sentinel tells.
"""
from __future__ import annotations

import builtins
import io
import json
import pickle
import zipfile
from pathlib import Path

import torch


class Payload:
    """Unpickling this evaluates `expression` after creating `sentinel`."""

    def __init__(self, sentinel: Path, expression: str = "None"):
        self.sentinel, self.expression = str(sentinel), expression

    def __reduce__(self):
        code = f"(open({self.sentinel!r}, 'w').write('pwned'), {self.expression})[1]"
        return (builtins.eval, (code,))


def pickled_pt(out: Path, sentinel: Path, protocol: int, container: str = "zip") -> Path:
    """A .pt whose unpickling runs the payload: torch.save's zip format, its legacy format, or a bare pickle."""
    payload = {"weight": Payload(sentinel, "__import__('torch').zeros(2)")}
    if container == "raw":
        out.write_bytes(pickle.dumps(payload, protocol=protocol))
    else:
        torch.save(payload, out, pickle_protocol=protocol, _use_new_zipfile_serialization=container == "zip")
    return out


def _rewrite(benign: Path, out: Path, edit) -> Path:
    """Copy a .pt2 archive, letting `edit(name, data) -> data | None` replace members (None keeps them)."""
    with zipfile.ZipFile(benign) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            new = edit(info.filename, data)
            dst.writestr(info, data if new is None else new)
        extra = getattr(edit, "extra", {})
        root = src.namelist()[0].split("/", 1)[0]
        for name, data in extra.items():
            dst.writestr(f"{root}/{name}", data)
    return out


def _saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def pt2_pickled_weight(benign: Path, out: Path, sentinel: Path) -> Path:
    """weight_0 marked use_pickle and replaced by a payload that returns a tensor of the right shape."""
    def edit(name: str, data: bytes):
        if name.endswith("_weights_config.json"):
            config = json.loads(data)
            first = next(iter(config["config"]))
            config["config"][first]["use_pickle"] = True
            edit.shape = [s["as_int"] for s in config["config"][first]["tensor_meta"]["sizes"]]
            edit.path = config["config"][first]["path_name"]
            return json.dumps(config).encode()
        return None

    with zipfile.ZipFile(benign) as archive:  # learn the first weight's file and shape
        config_name = next(n for n in archive.namelist() if n.endswith("_weights_config.json"))
        edit(config_name, archive.read(config_name))
    shape, path = edit.shape, edit.path

    def edit2(name: str, data: bytes):
        if name.endswith("_weights_config.json"):
            return edit(name, data)
        if name.endswith(f"data/weights/{path}"):
            return _saved(Payload(sentinel, f"__import__('torch').zeros({shape})"))
        return None

    return _rewrite(benign, out, edit2)


def pt2_pickled_constant(benign: Path, out: Path, sentinel: Path) -> Path:
    """A tensor constant stored as a pickle whose payload returns a tensor."""
    def edit(name: str, data: bytes):
        if name.endswith("_constants_config.json"):
            config = json.loads(data)
            config["config"]["lifted_tensor_0"] = {"path_name": "tensor_0", "is_param": False, "use_pickle": True,
                                                   "tensor_meta": None}
            return json.dumps(config).encode()
        return None

    edit.extra = {"data/constants/tensor_0": _saved(Payload(sentinel, "__import__('torch').zeros(1)"))}
    return _rewrite(benign, out, edit)


def pt2_hostile_example_inputs(benign: Path, out: Path, sentinel: Path) -> Path:
    """Example inputs whose safe load fails, so torch retries them with weights_only=False."""
    def edit(name: str, data: bytes):
        if "/data/sample_inputs/" in f"/{name}":
            return _saved(Payload(sentinel, "((__import__('torch').randn(1, 1, 32, 32),), {})"))
        return None

    return _rewrite(benign, out, edit)


def pt2_exec_guard(benign: Path, out: Path, sentinel: Path) -> Path:
    """An input guard torch exec-s when the program becomes a module."""
    def edit(name: str, data: bytes):
        if name.endswith("models/model.json"):
            program = json.loads(data)
            program["guards_code"] = [f"(open({str(sentinel)!r}, 'w').write('pwned') > 0) or True"]
            return json.dumps(program).encode()
        return None

    return _rewrite(benign, out, edit)


def pt2_node_calls(benign: Path, out: Path, target: str) -> Path:
    """A graph node whose target is something other than a torch operator."""
    def edit(name: str, data: bytes):
        if name.endswith("models/model.json"):
            program = json.loads(data)
            program["graph_module"]["graph"]["nodes"][0]["target"] = target
            return json.dumps(program).encode()
        return None

    return _rewrite(benign, out, edit)
