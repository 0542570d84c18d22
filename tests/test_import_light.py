"""`import deploy` (and the CLI module) must not load the heavy runtimes: they are imported lazily."""
from __future__ import annotations

import subprocess
import sys

HEAVY = ("onnxruntime", "openvino", "tensorrt", "transformers", "torch_pruning", "optuna", "matplotlib")


def test_import_deploy_loads_no_runtime():
    code = ("import sys, deploy, deploy.cli, deploy.core.passes, deploy.core.model.load, deploy.core.data, deploy.core.metrics, "
            "deploy.core.analysis, deploy.core.atomic_io, deploy.export, deploy.targets, deploy.compress, deploy.profiles; "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
