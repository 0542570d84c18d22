"""The search study: resumable after kill -9 on SQLite; two workers sharing one study on a real PostgreSQL."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

WORKER = Path(__file__).parent / "search_worker.py"


def _worker(out: Path, storage: str, trials: int, hang_at: int | None = None, lock: Path | None = None,
            barrier: Path | None = None):
    args = [sys.executable, str(WORKER), str(out), storage, str(trials)] + ([str(hang_at)] if hang_at else [])
    env = {**os.environ, "DEPLOY_MEASURE_LOCK": str(lock or out.parent / "measure.lock")}
    if barrier is not None:
        env["DEPLOY_TEST_BARRIER"] = str(barrier)
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _study(url: str):
    import optuna

    return optuna.load_study(study_name="deploy-search", storage=url)


def test_killed_search_resumes_with_completed_trials_intact(tmp_path):
    from optuna.trial import TrialState

    out = tmp_path / "search"
    proc = _worker(out, "-", trials=6, hang_at=4)
    deadline = time.time() + 120
    while not (out / "hanging").exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    url = f"sqlite:///{out / 'study.db'}"
    before = _study(url).get_trials(deepcopy=False)
    completed_before = {t.number: t.values for t in before if t.state == TrialState.COMPLETE}
    killed = [t for t in before if t.state == TrialState.RUNNING]
    assert len(completed_before) == 3 and len(killed) == 1
    hung_params = json.loads((out / "hanging").read_text())

    resumed = _worker(out, "-", trials=6)
    stdout, stderr = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, stderr
    after = _study(url).get_trials(deepcopy=False)
    complete = {t.number: t for t in after if t.state == TrialState.COMPLETE}
    assert len(complete) == 6
    for number, values in completed_before.items():  # intact: same trials, same values
        assert complete[number].values == values
    assert any(t.state == TrialState.FAIL for t in after)  # the killed trial was failed ...
    retried = [t for t in complete.values() if t.user_attrs["params"] == hung_params]
    assert retried, "the killed trial's parameters were retried"  # ... and retried
    artifacts = sorted(p.name for p in (out / "trials").iterdir())
    assert not [a for a in artifacts if a.startswith(".")]  # no partial folder left
    keys = {t.user_attrs["artifact"] for t in complete.values()}
    assert len(artifacts) == len(keys)  # one artifact per distinct parameter set, no duplicates


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url(tmp_path_factory):
    """A real PostgreSQL server: DEPLOY_TEST_POSTGRES_URL if given, else a private cluster started here."""
    if os.environ.get("DEPLOY_TEST_POSTGRES_URL"):
        yield os.environ["DEPLOY_TEST_POSTGRES_URL"]
        return
    pytest.importorskip("psycopg", reason="psycopg is not installed (dev extra)")
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not bins:
        pytest.skip("PostgreSQL server binaries are not installed here")
    bindir = bins[-1].parent
    data = Path(tempfile.mkdtemp(prefix="deploy-pg-"))  # not under pytest's root-only temp folder
    run_as = []
    if os.geteuid() == 0:  # the server refuses to run as root
        shutil.chown(data, "postgres")
        os.chmod(data, 0o700)
        run_as = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    subprocess.run(run_as + [str(bindir / "initdb"), "-D", str(data / "db"), "-A", "trust", "-U", "deploy"],
                   check=True, capture_output=True)
    subprocess.run(run_as + [str(bindir / "pg_ctl"), "-D", str(data / "db"), "-l", str(data / "log"), "-w", "-o",
                             f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start"],
                   check=True, capture_output=True)
    subprocess.run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "deploy", "study"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql://deploy@127.0.0.1:{port}/study"
    finally:
        subprocess.run(run_as + [str(bindir / "pg_ctl"), "-D", str(data / "db"), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


def test_two_workers_share_one_study_on_postgresql(tmp_path, postgres_url):
    from optuna.trial import TrialState

    lock = tmp_path / "measure.lock"
    barrier = tmp_path / "barrier"
    workers = [_worker(tmp_path / f"worker{i}", postgres_url, trials=12, lock=lock, barrier=barrier) for i in range(2)]
    deadline = time.time() + 120
    while len(list(tmp_path.glob("barrier.ready.*"))) < 2:  # both imported and ready: start them together
        assert time.time() < deadline and all(p.poll() is None for p in workers)
        time.sleep(0.05)
    (tmp_path / "barrier.go").write_text("")
    for proc in workers:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
    trials = [t for t in _study(postgres_url).get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    assert len(trials) >= 12
    folders = {Path(t.user_attrs["artifact"]).parent.parent.name for t in trials}
    assert folders == {"worker0", "worker1"}  # both workers contributed to the one study
    windows = sorted(tuple(t.user_attrs["details"]["window"]) for t in trials)
    for (start_a, end_a), (start_b, end_b) in zip(windows, windows[1:]):
        assert end_a <= start_b, "two measurement windows overlapped"


def test_search_command_produces_a_front(example_runs, tmp_path):
    """conftest's search of the example (5 trials): a front, its plot and every front trial's model; resumed (in a
    copy of its folder), it runs nothing again."""
    from conftest import run_cli

    run = example_runs["search"]
    assert run.returncode == 0, run.stderr
    summary = json.loads((run.out / "front.json").read_text())
    assert summary["completed"] == 5 and summary["front"]
    assert (run.out / "front.png").stat().st_size > 0
    for row in summary["front"]:
        assert (Path(row["artifact"]) / "model.onnx").exists()
    import onnx

    int8 = [t for t in summary["trials"] if t["params"]["precision"] == "int8"]
    assert int8  # the allocator's seeds include the all-int8 plan
    for trial in int8:  # an int8 trial is int8, even where this CPU runs the tiny model's fp32 faster
        ops = {n.op_type for n in onnx.load(str(Path(trial["artifact"]) / "model.onnx")).graph.node}
        assert "DequantizeLinear" in ops, trial
    out = tmp_path / "search"
    shutil.copytree(run.out, out)
    env = {"DEPLOY_CACHE_DIR": str(tmp_path / "cache"), "DEPLOY_MEASURE_LOCK": str(tmp_path / "lock")}
    again = run_cli("search", "--example", "--trials", "5", "-o", out, "--json", env=env)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["completed"] == 5  # resumed: nothing re-run


def test_a_finished_search_resumed_builds_no_pruning_family(example_runs, tmp_path, monkeypatch):
    """Resuming a study whose trials are all done reads the front back without pricing anything: neither the
    pruning family (measured sensitivity curves) nor the low-rank one is built for it."""
    from deploy.compiler import candidates
    from deploy.compiler.job import DEFAULT_PRECISIONS, CompressRequest
    from deploy.compiler.search import SearchRequest, search
    from deploy.compress.study import StudyConfig

    out = tmp_path / "search"
    shutil.copytree(example_runs["search"].out, out)
    monkeypatch.setenv("DEPLOY_CACHE_DIR", str(tmp_path / "cache"))

    def refused(*args, **kwargs):
        raise AssertionError("a finished study built a family")

    monkeypatch.setattr(candidates, "pruning_family", refused)
    monkeypatch.setattr(candidates.Planner, "lowrank_family", refused)
    request = CompressRequest(example=True, out=str(out), force=True, precisions=DEFAULT_PRECISIONS,
                              recover_steps=0, measure_seconds=0.2)
    summary = search(SearchRequest(request, StudyConfig(trials=5)))
    assert summary["completed"] == 5 and summary["front"]
