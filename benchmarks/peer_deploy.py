"""The `deploy` rows: ask our own `deploy compress` for a latency budget, then time its output like any peer's.

The pipeline is being written alongside this benchmark, so its Python API (`deploy.compiler.job.compress` with a
`CompressRequest`) is looked up when the benchmark runs; while it, or a module it needs, cannot be imported, the
rows say "not yet available" and nothing is made up. deploy gets what a user would give the CLI: the model file
(a trusted pickle), its input shapes, the same calibration samples the peers got (.npz), the target profile and
the budget; it keeps a part of them for its own held-out checks. The held-out evaluation data stays unseen.

Each call runs in a child process (this file run as a script) under a time limit, so one slow compression cannot
stall the whole benchmark: a call past the limit is a row that says so.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TARGET = "cpu-avx512-vnni-openvino"  # this machine's CPU (AVX-512 VNNI + BF16) run by OpenVINO, as NNCF's rows
NOT_AVAILABLE = "not yet available"
HERE = Path(__file__).resolve().parent


@dataclass
class Outcome:
    """status: ok | not yet available | infeasible | timeout | error; `onnx` is set when status is ok."""

    status: str
    note: str = ""
    onnx: Path | None = None
    report: dict[str, Any] = field(default_factory=dict)


def find_api() -> Any | None:
    """The deploy.compiler.job module when it offers compress(CompressRequest), else None."""
    try:
        job = importlib.import_module("deploy.compiler.job")
    except ImportError:
        return None
    return job if callable(getattr(job, "compress", None)) and hasattr(job, "CompressRequest") else None


def write_inputs(case: Any, folder: Path) -> tuple[Path, Path]:
    """The model as a pickle and the peers' calibration samples as one .npz (arrays named after the inputs)."""
    import numpy as np
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    model = folder / "model.pt"
    torch.save(case.module, model)
    calib = folder / "calibration.npz"
    np.savez(calib, **{s.name: np.concatenate([f[s.name] for f in case.calib]) for s in case.inputs})
    return model, calib


def _onnx_output(report: dict[str, Any], out: Path) -> Path:
    """The ONNX model in deploy's output folder (the report may name it; otherwise the only one there)."""
    for key in ("model", "onnx", "model_path", "onnx_path"):
        value = report.get(key)
        if isinstance(value, str) and value.endswith(".onnx") and (out / value).is_file():
            return out / value
    found = sorted(p for p in out.rglob("*.onnx") if not any(part.startswith(".") for part in p.parts))
    if len(found) != 1:
        raise RuntimeError(f"deploy's output folder holds {len(found)} .onnx files; cannot tell which to time")
    return found[0]


def compress_for_budget(case: Any, budget_ms: float, folder: Path, threads: int, quick: bool,
                        timeout_s: float) -> Outcome:
    """Run deploy compress for `budget_ms` in a child process limited to `timeout_s` seconds."""
    if find_api() is None:
        return Outcome(NOT_AVAILABLE, f"{NOT_AVAILABLE}: deploy.compiler.job.compress is not importable")
    model, calib = write_inputs(case, folder / "inputs")
    out = folder / "out"
    request = {"model": str(model), "trust_pickle": True, "target": TARGET, "calib": str(calib),
               "input_shapes": [f"{s.name}:{'x'.join(map(str, s.shape))}:{s.dtype}" for s in case.inputs],
               "out": str(out), "force": True, "threads": threads,
               **({"recover_minutes": 0.2, "measure_seconds": 0.5} if quick else {})}
    spec = folder / "request.json"
    spec.write_text(json.dumps({"request": request, "budget_ms": budget_ms, "threads": threads}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run([sys.executable, __file__, str(spec)], env=env, timeout=timeout_s,
                              capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return Outcome("timeout", f"deploy compress did not finish within {timeout_s:.0f} s (raise --deploy-timeout)")
    answer_path = folder / "answer.json"
    if proc.returncode != 0 or not answer_path.exists():
        tail = " ".join((proc.stderr or "").strip().splitlines()[-1:]) or f"exit code {proc.returncode}"
        return Outcome("error", f"deploy compress crashed: {tail[:300]}")
    answer = json.loads(answer_path.read_text())
    if answer["status"] != "ok":
        return Outcome(answer["status"], answer["note"])
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    return Outcome("ok", "deploy.compiler.job.compress", _onnx_output(report, out), report)


def _child(spec_path: str) -> int:
    """In the child: build the CompressRequest, call the API, write answer.json beside the request."""
    spec = json.loads(Path(spec_path).read_text())
    answer_path = Path(spec_path).with_name("answer.json")
    import torch

    torch.set_num_threads(spec["threads"])
    job = find_api()
    from deploy.compiler.budget import Budget

    request = job.CompressRequest(**{**spec["request"], "input_shapes": tuple(spec["request"]["input_shapes"])},
                                  budget=Budget("latency_ms", spec["budget_ms"]))
    try:
        job.compress(request)
        answer = {"status": "ok", "note": ""}
    except ImportError as exc:  # the API exists but a part of the pipeline it calls is not written yet
        if not (getattr(exc, "name", "") or "").startswith("deploy"):
            raise
        answer = {"status": NOT_AVAILABLE, "note": f"{NOT_AVAILABLE}: deploy.compiler.job.compress needs {exc.name}"}
    except Exception as exc:  # deploy's own refusal (an infeasible budget) or a failure: one line for the table
        text = " ".join(str(exc).split())[:300]
        status = "infeasible" if type(exc).__name__ == "BudgetInfeasibleError" else "error"
        answer = {"status": status, "note": f"{type(exc).__name__}: {text}"}
    answer_path.write_text(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1]))
