"""The shape of the code: every import (function-local and TYPE_CHECKING ones included) points down the layers,
no two files import each other in a circle, modules stay small, and a few rules have exactly one home.

Layers, bottom to top (README "Layout"): core (deploy.core, deploy.profiles, deploy.examples) -> targets ->
export -> compress -> compiler (deploy.compiler) -> cli.
"""
from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"deploy": ROOT / "deploy", "deploy.compress": ROOT / "compress", "deploy.export": ROOT / "export",
                "deploy.targets": ROOT / "targets", "deploy.profiles": ROOT / "profiles",
                "deploy.examples": ROOT / "examples"}
LAYERS = [("deploy.core", 0), ("deploy.profiles", 0), ("deploy.examples", 0), ("deploy.targets", 1),
          ("deploy.export", 2), ("deploy.compress", 3), ("deploy.compiler", 4), ("deploy.cli", 5)]
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "deploy" and parts and f"deploy.{parts[0]}" in PACKAGE_DIRS:
                continue  # a folder mapped elsewhere
            found[name] = path
    return found


MODULES = _modules()


def layer_of(module: str) -> int | None:
    """The layer of a module (the longest matching prefix); the bare `deploy` package is the bottom."""
    matches = [(len(prefix), rank) for prefix, rank in LAYERS if module == prefix or module.startswith(prefix + ".")]
    if matches:
        return max(matches)[1]
    return 0 if module == "deploy" else None


def _resolve(node: ast.ImportFrom, module: str, path: Path) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str) -> list[tuple[str, int]]:
    """Every deploy module `module` imports, anywhere in the file: (name, line)."""
    path = MODULES[module]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.startswith("deploy")]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node, module, path)
            if not base.startswith("deploy"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.append((sub if sub in MODULES else base, node.lineno))
    return out


def test_every_import_resolves():
    missing = [f"{m}:{line} imports {target}" for m in MODULES for target, line in imports_of(m)
               if target not in MODULES and importlib.util.find_spec(target) is None]
    assert not missing, "\n".join(missing)


def test_imports_point_down_the_layers():
    upward = []
    for module in MODULES:
        mine = layer_of(module)
        for target, line in imports_of(module):
            theirs = layer_of(target)
            if mine is not None and theirs is not None and theirs > mine:
                upward.append(f"{module}:{line} (layer {mine}) imports {target} (layer {theirs})")
    assert not upward, "\n".join(upward)


def test_no_file_imports_in_a_circle():
    graph = {m: {t for t, _ in imports_of(m) if t in MODULES and t != m} for m in MODULES}
    # a package's __init__ re-exporting its own modules is not a circle of files
    for m in graph:
        graph[m] = {t for t in graph[m] if not (MODULES[t].name == "__init__.py" and m.startswith(t + "."))}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    import sys

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_modules_stay_small():
    big = [f"{m}: {n} lines" for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not big, big


def test_no_untyped_profile_or_calibration_parameters():
    bad = []
    pattern = re.compile(r"\b(profile|calibration)\s*:\s*Any\b")
    for module, path in MODULES.items():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                bad.append(f"{module}:{number}: {line.strip()}")
    assert not bad, "\n".join(bad)


def test_runners_come_from_targets_only():
    outside = []
    for module, path in MODULES.items():
        if layer_of(module) == 1:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if name == "get_runner":
                    outside.append(f"{module}:{node.lineno}")
    assert not outside, outside


def test_the_float_precision_rule_is_one_function():
    """Which precision float layers run in (bf16 on OpenVINO where the CPU has it) is decided in one place."""
    rule = re.compile(r"BF16_FLAGS\s*=|\"bf16\" if .*== \"bf16\" else|def (float_precision|runtime_float)\(")
    deciders = [m for m, p in MODULES.items() if rule.search(p.read_text())]
    assert deciders == ["deploy.targets.target"], deciders


@pytest.mark.parametrize("module", ["deploy", "deploy.core.model.load", "deploy.cli"])
def test_light_imports_load_no_runtime(module):
    import subprocess
    import sys

    code = (f"import sys, {module}; heavy = [m for m in ('onnxruntime', 'openvino', 'tensorrt', 'optuna') "
            "if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_only_compress_reaches_into_the_passes():
    """The compiler weighs candidates through deploy.compress.families and applies plans as pass configs: no module
    outside compress imports the passes' internals (build_problem, plan_dp, the quantize apply module, distill)."""
    internals = {"build_problem", "plan_dp", "distill"}
    found = []
    for module, path in MODULES.items():
        if layer_of(module) == 3:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("deploy.compress"):
                names = {a.name for a in node.names}
                if names & internals or node.module == "deploy.compress.quant.apply":
                    found.append(f"{module}:{node.lineno} imports {node.module}: {sorted(names)}")
    assert not found, found
