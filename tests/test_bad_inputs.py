"""Bad input, faults and hostile files, tried as a careless or hostile user would: through the installed `deploy`.

Every failure case asserts its exit code, exactly one line on stderr, no traceback, and that nothing was left in
the output folder, the temporary folder or the cache. Hostile files assert that their payload's sentinel file
never appears, for every command that loads a model. Slow commands run side by side (threads around
subprocesses) to keep the file within its few minutes.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import hostile

DEPLOY = str(Path(sys.executable).with_name("deploy"))
DIGITS_ARCH = "deploy.examples.digits_cnn:digits_cnn"
QUICK = ("--measure-seconds", "0.2", "--recover-steps", "0")
LOADERS = {  # every command that loads a model, with what else it needs
    "inspect": lambda m, out: ["inspect", m],
    "compress": lambda m, out: ["compress", m, "--calib", "random", "-o", out],
    "bench": lambda m, out: ["bench", m, "--runtime", "torch", "--quick"],
    "search": lambda m, out: ["search", m, "--calib", "random", "-o", out, "--trials", "1"],
}


class Cli:
    """The installed console script in an isolated environment: its own TMPDIR, cache and measurement lock."""

    def __init__(self, root: Path):
        self.root = root
        self.tmp, self.cache, self.work = root / "tmp", root / "cache", root / "work"
        for folder in (self.tmp, self.cache, self.work):
            folder.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "TMPDIR": str(self.tmp), "DEPLOY_CACHE_DIR": str(self.cache),
                    "DEPLOY_MEASURE_LOCK": str(root / "measure.lock"), "COLUMNS": "200"}
        self.env.pop("DEPLOY_DEBUG", None)

    def __call__(self, *args: object, env: dict | None = None, cwd: Path | None = None,
                 timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([DEPLOY, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                              cwd=cwd or self.work, env={**self.env, **(env or {})})

    def start(self, *args: object) -> subprocess.Popen:
        return subprocess.Popen([DEPLOY, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=self.work, env=self.env)

    def snapshot(self) -> set[str]:
        """What is in the temporary folder and the cache (ONNX Runtime writes its own telemetry session file
        '.ses' into the temporary folder whenever it is imported: not ours, and the same file every time)."""
        return {str(p.relative_to(self.root)) for p in (self.tmp, self.cache) for p in p.rglob("*")
                if p.name != ".ses"}


@pytest.fixture
def cli(tmp_path) -> Cli:
    return Cli(tmp_path)


HEARTBEAT = re.compile(r"^[a-z]+: .*\[\d+%\] \d+ s elapsed")  # the progress line a slow step prints off a terminal


def refused(result: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """Exit `code`, one line on stderr holding every needle (besides progress heartbeats), no traceback."""
    lines = [line for line in result.stderr.strip().splitlines() if not HEARTBEAT.match(line)]
    assert result.returncode == code, result.stderr
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def left_nothing(cli: Cli, before: set[str], *outs: Path) -> None:
    assert cli.snapshot() == before, cli.snapshot() - before
    for out in outs:
        assert not out.exists(), out
        assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")], list(out.parent.iterdir())


def parallel(calls, workers: int = 3) -> list:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda call: call(), calls))


# --- fixtures: models ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory, digits_model) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad-models")
    x = torch.randn(1, 1, 32, 32)
    files = {"pt2": folder / "benign.pt2", "ts": folder / "digits_ts.pt", "weights": folder / "weights.pt"}
    torch.export.save(torch.export.export(digits_model, (x,)), str(files["pt2"]))
    torch.jit.trace(digits_model, x).save(str(files["ts"]))
    torch.save(digits_model.state_dict(), files["weights"])
    from deploy.examples.digits_data import export_calibration_npz

    files["digits"] = export_calibration_npz(folder / "digits.npz", n=256)
    return files


# --- security -----------------------------------------------------------------------------------------------------

PT2_ATTACKS = {
    "pickled_weight": hostile.pt2_pickled_weight,
    "pickled_constant": hostile.pt2_pickled_constant,
    "hostile_example_inputs": hostile.pt2_hostile_example_inputs,
    "exec_guard": hostile.pt2_exec_guard,
}


@pytest.mark.parametrize("attack", sorted(PT2_ATTACKS))
@pytest.mark.parametrize("loader", ["load_model", "load_exported_program"])
def test_crafted_pt2_is_refused_by_both_loaders(tmp_path, models, attack, loader):
    """torch.export.load unpickles weights/constants with weights_only=False, retries example inputs unsafely and
    exec-s input guards: each crafted archive is refused by both loaders the commands use (the model loader, and
    the PyTorch runner's program loader), naming --trust-pickle, and its payload never runs."""
    from deploy.core.errors import ModelLoadError
    from deploy.core.model import load

    sentinel = tmp_path / f"pwned-{attack}"
    path = PT2_ATTACKS[attack](models["pt2"], tmp_path / f"{attack}.pt2", sentinel)
    with pytest.raises(ModelLoadError) as caught:
        getattr(load, loader)(path)
    assert "safe load" in caught.value.one_line() and "--trust-pickle" in caught.value.one_line()
    assert not sentinel.exists()


@pytest.mark.parametrize("attack", ["exec_guard", "pickled_weight"])
def test_crafted_pt2_never_runs_code_without_trust_pickle(cli, models, attack):
    """The same archives through every command that loads a model (a guard exec-ed when the program becomes a
    module, and a pickled weight): refused in one line naming --trust-pickle; the payload never runs."""
    sentinel = cli.root / f"pwned-{attack}"
    path = PT2_ATTACKS[attack](models["pt2"], cli.root / f"{attack}.pt2", sentinel)
    before = cli.snapshot()
    outs = {name: cli.work / f"out-{name}" for name in LOADERS}
    results = parallel([lambda n=n, f=f: (n, cli(*f(path, outs[n]))) for n, f in LOADERS.items()])
    for name, result in results:
        refused(result, 2, "safe load", "--trust-pickle")
        assert not sentinel.exists(), f"{name} ran the payload"
    left_nothing(cli, before, *outs.values())


def test_pt2_node_naming_a_python_callable_is_refused(cli, models):
    path = hostile.pt2_node_calls(models["pt2"], cli.root / "calls.pt2", "torch.load")
    refused(cli("inspect", path), 2, "not a torch operator", "--trust-pickle")


def test_benign_pt2_still_loads(cli, models):
    result = cli("inspect", models["pt2"], "--json")
    assert result.returncode == 0, result.stderr
    layers = {layer["name"]: layer["type"] for layer in json.loads(result.stdout)["layers"]}
    assert layers["layer1.conv1"] == "Conv2d" and layers["fc"] == "Linear"


@pytest.mark.parametrize("protocol", range(6))
def test_every_pickle_protocol_is_refused_as_code_by_the_loader(tmp_path, protocol):
    """A malicious .pt in torch.save's zip container, in each pickle protocol, through the loader every command
    uses (the commands themselves, with each container: the test below): refused as code, never 'corrupt'."""
    from deploy.core.errors import ModelLoadError
    from deploy.core.model.load import load_model

    sentinel = tmp_path / "pwned"
    path = hostile.pickled_pt(tmp_path / f"evil-{protocol}.pt", sentinel, protocol)
    with pytest.raises(ModelLoadError) as caught:
        load_model(path)
    line = caught.value.one_line()
    assert all(needle in line for needle in ("a safe load of", "refused code", "builtins.eval", "--trust-pickle"))
    assert "corrupt" not in line and not sentinel.exists()


@pytest.mark.parametrize("protocol, container", [(2, "zip"), (2, "legacy"), (4, "raw")])
def test_pt_pickle_is_refused_as_code_not_called_corrupt(cli, protocol, container):
    """A malicious .pt was refused, but called 'corrupt'; the line now says a safe load refused code in it, in
    every command that loads a model."""
    sentinel = cli.root / "pwned"
    path = hostile.pickled_pt(cli.root / f"evil-{protocol}-{container}.pt", sentinel, protocol, container)
    before = cli.snapshot()
    outs = {name: cli.work / f"out-{name}" for name in LOADERS}
    results = parallel([lambda f=f, n=n: cli(*f(path, outs[n])) for n, f in LOADERS.items()])
    for result in results:
        line = refused(result, 2, "a safe load of", "refused code", "builtins.eval", "--trust-pickle")
        assert "corrupt" not in line
    assert not sentinel.exists()
    left_nothing(cli, before, *outs.values())


@pytest.mark.parametrize("location", ["/etc/passwd", "../../outside.bin", "sub/../../outside.bin"])
def test_onnx_external_data_outside_its_folder_is_refused(cli, location):
    """An ONNX file naming external data outside its folder is refused before any runtime reads it (and before
    `bench --runner ssh://` would ship it)."""
    import onnx
    from onnx import TensorProto, helper

    weight = helper.make_tensor("w", TensorProto.FLOAT, [2, 2], [0.0] * 4)
    weight.data_location = TensorProto.EXTERNAL
    del weight.float_data[:]
    weight.external_data.add(key="location", value=location)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [weight])
    model_dir = cli.root / "models" / "deep"
    model_dir.mkdir(parents=True)
    path = model_dir / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    runs = (("bench", path, "--quick"), ("bench", path, "--quick", "--runner", "ssh://nobody@127.0.0.1:9"),
            ("regress", path, "--baseline-model", path, "--quick"))
    for result in parallel([lambda a=a: cli(*a) for a in runs]):
        refused(result, 2, "outside the model's folder")


# --- exit codes ---------------------------------------------------------------------------------------------------

USAGE_ERRORS = [
    ("deploy", ("nosuchcommand",), "No such command"),
    ("inspect", ("inspect", "--bogus"), "No such option"),
    ("bench", ("bench",), "Missing argument"),
    ("bench-number", ("bench", "m.onnx", "--threads", "two"), "Invalid value"),
    ("regress", ("regress", "m.onnx", "--threshold", "x"), "Invalid value"),
    ("compress", ("compress", "--budget-ms", "fast"), "Invalid value"),
    ("compress-search-minutes", ("compress", "--example", "--search-minutes", "0"), "must be above zero"),
    ("search", ("search", "--trials", "many"), "Invalid value"),
    ("profiles", ("profiles", "nosuch"), "No such command"),
    ("profiles-list", ("profiles", "list", "--bogus"), "No such option"),
    ("profiles-show", ("profiles", "show"), "Missing argument"),
    ("profiles-calibrate", ("profiles", "calibrate", "--threads", "x", "cpu"), "Invalid value"),
    ("cache", ("cache", "nosuch"), "No such command"),
    ("cache-show", ("cache", "show", "--bogus"), "No such option"),
    ("cache-clear", ("cache", "clear", "extra"), "unexpected extra argument"),
]


@pytest.mark.parametrize("name, args, needle", USAGE_ERRORS, ids=[u[0] for u in USAGE_ERRORS])
def test_usage_error_exits_2_with_one_line(cli, name, args, needle):
    """typer raises its vendored click's exceptions, which main() did not catch: every usage error was exit 1."""
    line = refused(cli(*args), 2, needle)
    assert "--help" in line and "internal error" not in line


def test_dash_h_is_help_and_bare_deploy_prints_help(cli):
    for args in (("-h",), ("compress", "-h"), ("profiles", "-h"), ()):
        result = cli(*args)
        assert result.returncode == 0 and "Usage" in result.stdout and not result.stderr, (args, result.stderr)


@pytest.mark.parametrize("flag", ["--budget-ms", "--speedup", "--size-mb"])
def test_non_finite_budget_is_refused_at_once(cli, flag):
    before = cli.snapshot()
    for value in ("nan", "inf", "-inf"):
        start = time.monotonic()
        refused(cli("compress", "--example", flag, value, "-o", cli.work / "out"), 2, flag)
        assert time.monotonic() - start < 10
    left_nothing(cli, before, cli.work / "out")


def test_unwritable_output_and_output_under_a_file_exit_2(cli):
    blocker = cli.work / "a-file"
    blocker.write_text("x")
    refused(cli("compress", "--example", "-o", blocker / "out"), 2, "is a file, not a folder")
    unwritable = Path("/sys/deploy-test-out") if Path("/sys").is_dir() else None
    if unwritable is None or os.geteuid() != 0:
        unwritable = cli.root / "locked" / "out"
        unwritable.parent.mkdir()
        unwritable.parent.chmod(0o500)
    refused(cli("compress", "--example", "-o", unwritable), 2, "-o")
    refused(cli("bench", "m.onnx", "-o", blocker / "r.json"), 2, "is a file, not a folder")


def test_cache_dir_that_is_a_file_exits_2(cli):
    blocker = cli.root / "cache-file"
    blocker.write_text("x")
    refused(cli("cache", "show", env={"DEPLOY_CACHE_DIR": str(blocker)}), 2, "DEPLOY_CACHE_DIR", "is a file")


def test_debug_keeps_the_exit_code(cli):
    result = cli("--debug", "inspect", cli.work / "missing.pt")
    assert result.returncode == 2 and "Traceback" in result.stderr and "does not exist" in result.stderr


def test_factory_calling_sys_exit_is_an_error_not_a_silent_success(cli, models):
    (cli.work / "exits.py").write_text("import sys\n\ndef build():\n    sys.exit(0)\n")
    refused(cli("inspect", models["weights"], "--arch", "exits:build", "--input-shape", "1x1x32x32"), 2,
            "--arch exits:build", "sys.exit(0)")
    (cli.work / "exits_on_import.py").write_text("import sys\nsys.exit(0)\n")
    refused(cli("inspect", models["weights"], "--arch", "exits_on_import:build", "--input-shape", "1x1x32x32"), 2,
            "sys.exit(0)")


def test_inspect_with_an_absurd_shape_is_refused_before_allocating(cli):
    refused(cli("inspect", "--example", "--input-shape", "image:100000x1x32000x32000"), 2, "GiB")


def test_trusted_main_pickle_names_arch_with_a_state_dict(cli):
    """torch.save(model) from a script keeps its classes in __main__: PYTHONPATH cannot help, --arch can."""
    script = cli.work / "train.py"
    script.write_text("import torch\nclass Net(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
                      "        self.fc = torch.nn.Linear(4, 2)\n    def forward(self, x):\n        return self.fc(x)\n"
                      "torch.save(Net(), 'net.pt')\n")
    subprocess.run([sys.executable, str(script)], cwd=cli.work, check=True)
    refused(cli("inspect", "net.pt", "--trust-pickle", "--input-shape", "1x4"), 2, "__main__", "--arch",
            "state_dict")


# --- crashes on valid input ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def graph_runs(tmp_path_factory, models):
    """Quantization-only compress of the digits model from TorchScript (batch fixed at 2 by --input-shape, which
    crashed ONNX Runtime with calibration batches of 8) and from .pt2, side by side."""
    cli = Cli(tmp_path_factory.mktemp("graph-runs"))
    runs = {"torchscript": (models["ts"], "--input-shape", "image:2x1x32x32", "--calib", models["digits"],
                            "--precision", "int8", "--no-prune"),
            "pt2": (models["pt2"], "--calib", models["digits"], "--precision", "int8", "--no-prune", "--force")}
    outs = {name: cli.work / name for name in runs}
    outs["pt2"].write_text("a file that --force replaces")
    calls = [lambda n=n, a=a: (n, cli("compress", *a, "-o", outs[n], "--json", *QUICK)) for n, a in runs.items()]
    old = os.umask(0o022)
    try:
        results = dict(parallel(calls, workers=2))
    finally:
        os.umask(old)
    return cli, outs, results


@pytest.mark.parametrize("fmt", ["torchscript", "pt2"])
def test_graph_models_compress_to_faithful_int8(graph_runs, fmt):
    """compress on TorchScript and .pt2 failed ('no Conv2d or Linear layer to quantize', 'Guard failed')."""
    cli, outs, results = graph_runs
    result = results[fmt]
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["result"]["precision"] == "int8"
    assert report["result"]["fidelity_detail"]["top1_agreement"] >= 0.99
    import onnx

    ops = {n.op_type for n in onnx.load(str(outs[fmt] / "model.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_input_shape_with_a_fixed_batch_calibrates_in_that_batch(graph_runs):
    cli, outs, results = graph_runs
    report = json.loads(results["torchscript"].stdout)
    assert report["model"]["inputs"][0]["shape"][0] == 2
    assert report["result"]["fidelity_detail"]["samples"] % 2 == 0


def test_force_onto_a_file_and_the_umask(graph_runs):
    """--force onto a file left .NAME.old-PID; outputs were always 0600/0700 whatever the umask."""
    cli, outs, _ = graph_runs
    assert outs["pt2"].is_dir()
    assert not [p for p in cli.work.iterdir() if p.name.startswith(".")]
    assert (outs["pt2"].stat().st_mode & 0o777) == 0o755
    assert {p.stat().st_mode & 0o777 for p in outs["pt2"].iterdir()} == {0o644}


def test_fidelity_below_the_default_floor_is_a_warning(example_runs):
    run = example_runs["sized"]  # conftest's size budget, met only by pruning hard
    assert run.returncode == 0, run.stderr
    report = run.report()
    assert report["result"]["fidelity"] < 0.99 and report["verdict"] == "met"
    assert "fidelity below the default floor" in run.stderr
    assert any("fidelity below the default floor" in w for w in report["warnings"])
    assert "fidelity below the default floor" in (run.out / "report.html").read_text()


def test_missed_budget_exits_4_and_still_writes_the_model(cli, example_runs):
    """A missed latency or size budget exited 0; now exit 4, with the model and the report written."""
    import tomllib

    import tomli_w

    plan = tomllib.loads((example_runs["sized"].out / "deploy.toml").read_text())
    plan["header"]["budget"]["value"] = 0.001  # the same model, judged against a budget it cannot meet
    edited = cli.root / "missed.toml"
    edited.write_text(tomli_w.dumps(plan))
    out = cli.work / "missed"
    result = cli("compress", "--example", "--plan", edited, "-o", out, "--json", *QUICK)
    assert result.returncode == 4, result.stderr
    report = json.loads(result.stdout)
    assert report["verdict"] == "missed" and report["exit_code"] == 4
    assert {"model.onnx", "report.json", "report.html", "deploy.toml"} <= {p.name for p in out.iterdir()}
    assert "budget missed" in result.stderr and "Traceback" not in result.stderr


# --- silent wrong results, lost data ------------------------------------------------------------------------------

def test_nan_weights_are_refused_naming_the_tensor(cli, digits_model):
    state = {k: v.clone() for k, v in digits_model.state_dict().items()}
    state["layer2.conv1.weight"][0, 0, 0, 0] = float("nan")
    path = cli.root / "nan.pt"
    torch.save(state, path)
    before = cli.snapshot()
    start = time.monotonic()
    refused(cli("compress", path, "--arch", DIGITS_ARCH, "--input-shape", "image:batchx1x32x32", "--calib", "random",
                "-o", cli.work / "out"), 2, "layer2.conv1.weight", "NaN")
    assert time.monotonic() - start < 15
    left_nothing(cli, before, cli.work / "out")


def test_candidates_with_non_finite_outputs_are_rejected(cli):
    """An all-NaN output once scored top-1 agreement 1.0; now it scores 0, every such candidate is rejected,
    and with none left the run stops with one line and exit 1."""
    from deploy.core.metrics import fidelity

    reference = torch.randn(16, 10)
    assert fidelity(reference, torch.full_like(reference, float("nan")))["top1_agreement"] == 0.0
    code = ("import sys, deploy.compiler.candidates as candidates; candidates.outputs_finite = lambda *a: False; "
            "from deploy.cli import main; main(sys.argv[1:])")
    before = cli.snapshot()
    result = subprocess.run([sys.executable, "-c", code, "compress", "--example", "--budget-ms", "0.0001",
                             "--no-prune", "-o", cli.work / "out", *QUICK], capture_output=True, text=True,
                            cwd=cli.work, env=cli.env, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and "NaN or infinite" in lines[-1] and "Traceback" not in result.stderr
    assert [line for line in lines if "error" in line] == lines[-1:]  # progress lines may precede it
    # the sensitivities measured on the way are complete cache entries; nothing temporary or partial is left
    assert not [p for p in cli.snapshot() - before if Path(p).name.startswith(".") or "partial" in p]
    assert not (cli.work / "out").exists() and not list(cli.work.iterdir())


def _wait_for(predicate, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.1)


def test_second_run_on_the_same_output_stops_at_once_naming_the_first(cli):
    out = cli.work / "shared"
    first = cli.start("compress", "--example", "-o", out, "--measure-seconds", "3")
    try:
        _wait_for(lambda: (cli.work / ".shared.lock").exists())
        start = time.monotonic()
        refused(cli("compress", "--example", "-o", out, "--force"), 2, "another deploy run is writing",
                f"pid {first.pid}")
        assert time.monotonic() - start < 10
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(60)


def test_output_that_appeared_meanwhile_is_not_replaced(cli):
    out = cli.work / "appears"
    run = cli.start("compress", "--example", "-o", out, "--no-prune", "--precision", "fp32", *QUICK)
    _wait_for(lambda: list(cli.work.glob(".appears.partial-*")))
    out.mkdir()
    (out / "mine.txt").write_text("the user's own file")
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 2 and "appeared while this run worked" in stderr.strip().splitlines()[-1]
    assert (out / "mine.txt").read_text() == "the user's own file"
    kept = [p for p in cli.work.iterdir() if p.name.startswith("appears.deploy-")]
    assert len(kept) == 1 and (kept[0] / "model.onnx").exists()


def test_resumed_search_with_another_target_or_model_is_refused(cli, models, example_runs):
    out = cli.work / "study"
    shutil.copytree(example_runs["search"].out, out)  # conftest's search of the example on this CPU, 5 trials
    other_target, other_model = parallel([
        lambda: cli("search", "--example", "--trials", "6", "-o", out, "--target", "cpu-openvino"),
        lambda: cli("search", models["pt2"], "--calib", models["digits"], "--trials", "6", "-o", out)])
    refused(other_target, 2, "made for another run", "target")
    refused(other_model, 2, "made for another run", "model_sha256")


def test_plan_from_another_model_is_refused(cli, example_runs):
    """A deploy.toml names the model it was made for (weights and layers): another model is refused, naming the
    difference; so is a plan whose passes name layers the model does not have."""
    import tomllib

    import tomli_w

    plan = tomllib.loads((example_runs["sized"].out / "deploy.toml").read_text())  # made for the bundled example
    path = cli.root / "deploy.toml"
    path.write_text(tomli_w.dumps(plan))
    before = cli.snapshot()
    other = dict(plan, header={**plan["header"], "layers_digest": "0123456789abcdef"})
    path.write_text(tomli_w.dumps(other))
    refused(cli("compress", "--example", "--plan", path, "-o", cli.work / "out"), 2, "other layers", "--plan")
    quantize = next(p for p in plan["passes"] if p["type"] == "quantize")
    quantize["data"]["labels"] = {"encoder.layer.0.attention.self.query": "w8a8-pc-sa"}
    plan["header"].pop("layers_digest")
    plan["header"].pop("model_sha256")
    path.write_text(tomli_w.dumps(plan))
    refused(cli("compress", "--example", "--plan", path, "-o", cli.work / "out"), 2,
            "encoder.layer.0.attention.self.query", "made for")
    left_nothing(cli, before, cli.work / "out")


# --- partial output -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)])
def test_signals_remove_the_runs_partial_folder(cli, signum, code):
    out = cli.work / "sig"
    run = cli.start("compress", "--example", "-o", out, "--measure-seconds", "3")
    _wait_for(lambda: list(cli.work.glob(".sig.partial-*")))
    time.sleep(0.5)
    run.send_signal(signum)
    run.wait(60)
    assert run.returncode == code
    assert not out.exists() and not [p for p in cli.work.iterdir() if p.name.startswith(".sig")]


def test_stale_partial_folder_of_a_killed_run_is_removed_by_the_next(cli):
    stale = cli.work / ".out.partial-killed"
    stale.mkdir()
    (stale / "model.onnx").write_text("half")
    (cli.work / ".out.old-12345").mkdir()
    refused(cli("compress", "--example", "--calib", "missing.npz", "-o", cli.work / "out"), 2, "does not exist")
    assert not [p for p in cli.work.iterdir() if p.name.startswith(".out")]


def test_output_dot_is_refused_before_any_work(cli):
    start = time.monotonic()
    refused(cli("compress", "--example", "-o", "."), 2, "folder you are in")
    assert time.monotonic() - start < 10
    assert not list(cli.work.iterdir())


def test_search_input_error_leaves_no_output_folder(cli):
    before = cli.snapshot()
    out = cli.work / "s"
    refused(cli("search", "--example", "--calib", "missing.npz", "-o", out), 2, "does not exist")
    left_nothing(cli, before, out)


def test_held_out_data_that_does_not_fit_leaves_no_output_folder(cli):
    """--held-out is read like --calib: a wrong shape is one line naming the held-out file, exit 2, nothing left."""
    import numpy as np

    np.savez(cli.work / "held.npz", image=np.zeros((8, 3, 32, 32), np.float32))  # the example CNN takes 1 channel
    before = cli.snapshot()
    out = cli.work / "h"
    refused(cli("compress", "--example", "--held-out", "held.npz", "-o", out, *QUICK), 2, "held-out data held.npz",
            "shape")
    left_nothing(cli, before, out)
