"""Shared test fixtures: small models saved in every supported format, and the example's CLI runs that several
test modules read (each run is minutes of a 2-core CI budget, so it is made once per session)."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # small models; avoids OpenMP spin-contention with the subprocesses tests start

ARCH = "deploy.examples.digits_cnn:digits_cnn"
SHAPE = "image:1x1x32x32:float32"
FAST = ("--measure-seconds", "0.2", "--recover-steps", "16")
PROGRESS_S = 2.0  # DEPLOY_PROGRESS_SECONDS for the example runs: test_what_a_person_sees checks the lines' spacing


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


class Run:
    """One finished CLI run: exit code, stdout, stderr lines stamped with when they arrived, and its output folder."""

    def __init__(self, returncode: int, stdout: str, lines: list[tuple[float, str]], out: Path):
        self.returncode, self.stdout, self.lines, self.out = returncode, stdout, lines, out

    @property
    def stderr(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def report(self) -> dict:
        import json

        return json.loads((self.out / "report.json").read_text())


def timed_cli(*args: object, env: dict[str, str]) -> tuple[int, str, list[tuple[float, str]]]:
    """The CLI with stderr piped (not a terminal), each stderr line stamped with when it arrived."""
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "deploy.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
    lines: list[tuple[float, str]] = []

    def read() -> None:
        for line in proc.stderr:
            lines.append((time.monotonic() - start, line.rstrip("\n")))

    reader = threading.Thread(target=read)
    reader.start()
    stdout = proc.stdout.read()
    proc.wait(timeout=600)
    reader.join()
    return proc.returncode, stdout, lines


EXAMPLE_RUNS = {
    # a speed-up budget on this CPU, one thread: candidates measured, a plan of per-layer precisions (or pruning)
    "budget": ("compress", "--example", "--target", "cpu", "--speedup", "1.25", "--threads", "1",
               "--search-minutes", "30", *FAST),
    # a device not at hand: latency predicted with a band
    "predicted": ("compress", "--example", "--target", "jetson", "--no-prune", *FAST),
    # no budget flag: the fastest model within the default fidelity floor
    "floor": ("compress", "--example", "--target", "cpu", *FAST),
    # a size budget met only by pruning hard and int8 (prune, recover, quantize, export): fidelity near 0.9
    "sized": ("compress", "--example", "--size-mb", "0.045", *FAST),
    "search": ("search", "--example", "--trials", "5", "--measure-seconds", "0.2"),
}


PAIRED = ("predicted", "floor", "sized")  # their progress lines are not timed: two at a time
ALONE = ("budget", "search")  # test_what_a_person_sees times their progress lines: each runs by itself


@pytest.fixture(scope="session")
def example_runs(tmp_path_factory) -> dict[str, Run]:
    """The example compressed under a latency budget, for a predicted device, to the default floor and to a size
    budget, and a search, as a CI log sees them (stderr piped, 80 columns, a progress line every PROGRESS_S).
    They share one measurement lock, so no two measure at the same time."""
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path_factory.mktemp("example-runs")
    env = {"DEPLOY_CACHE_DIR": str(root / "cache"), "DEPLOY_MEASURE_LOCK": str(root / "measure.lock"),
           "DEPLOY_PROGRESS_SECONDS": str(PROGRESS_S), "COLUMNS": "80"}

    def run(name: str) -> tuple[str, Run]:
        out = root / name
        code, stdout, lines = timed_cli(*EXAMPLE_RUNS[name], "-o", out, env=env)
        return name, Run(code, stdout, lines, out)

    with ThreadPoolExecutor(2) as pool:
        done = dict(pool.map(run, PAIRED))
    done.update(run(name) for name in ALONE)
    return done
