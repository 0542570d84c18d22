"""Shared test fixtures: small models saved in every supported format."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # small models; avoids OpenMP spin-contention with the subprocesses tests start

ARCH = "deploy.examples.digits_cnn:digits_cnn"
SHAPE = "image:1x1x32x32:float32"


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real console entry point, so exit codes and stderr are what a user sees."""
    return subprocess.run([sys.executable, "-m", "deploy.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {})}, timeout=600)


@pytest.fixture(scope="session")
def digits_model() -> torch.nn.Module:
    from deploy.examples.digits_cnn import load_example_model

    return load_example_model()


@pytest.fixture(scope="session")
def model_files(tmp_path_factory, digits_model) -> dict[str, Path]:
    """The example CNN as TorchScript, torch.export, state_dict and pickled module."""
    folder = tmp_path_factory.mktemp("models")
    x = torch.randn(1, 1, 32, 32)
    files = {
        "torchscript": folder / "model_ts.pt",
        "exported": folder / "model.pt2",
        "state_dict": folder / "weights.pt",
        "pickle": folder / "pickled.pt",
    }
    torch.jit.trace(digits_model, x).save(str(files["torchscript"]))
    torch.export.save(torch.export.export(digits_model, (x,)), str(files["exported"]))
    torch.save(digits_model.state_dict(), files["state_dict"])
    torch.save(digits_model, files["pickle"])
    return files
