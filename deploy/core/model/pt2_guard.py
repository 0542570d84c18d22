"""Check a torch.export `.pt2` archive before torch reads it: `torch.export.load` is not a safe loader.

torch 2.13's archive reader unpickles weights and constants with `weights_only=False`, its artifact reader retries
example inputs with `weights_only=False` after a safe load fails, AOTInductor members are native libraries, opaque
constants go through `pickle.loads`, symbolic shapes go through `sympy.sympify` (an `eval`), input guards are
`exec`-ed when the program becomes a module, and graph nodes name the callables they call. A crafted file can run
code through any of these. So, unless the user trusts the file:

- every member torch would unpickle is scanned and refused if it names a callable the weights-only unpickler does
  not allow, and the load itself runs with every `torch.load` forced to weights only (unsafe_pickle);
- compiled code and opaque / custom-object constants are refused;
- every node's target must resolve to a torch operator or a plain arithmetic function, every symbolic expression
  and guard must be plain arithmetic on shapes, and tree specs may name builtins and collections only.
"""
from __future__ import annotations

import ast
import json
import zipfile
from pathlib import Path
from typing import Any, Iterator

from deploy.core.errors import ModelLoadError
from deploy.core.model.unsafe_pickle import describe, unsafe_imports

TRUST_HINT = ("pass --trust-pickle only if you trust its source (loading it may run code), or re-export the model "
              "with torch.export.save from your own code")

_OPERATOR_OK = {"getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs", "eq", "ne",
                "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_", "invert", "lshift", "rshift", "truth"}
_MATH_OK = {"ceil", "floor", "trunc", "sqrt", "log", "log2", "exp", "pow", "fabs", "isnan", "isinf", "isfinite",
            "sin", "cos", "tan", "tanh", "pi", "e", "inf", "gcd", "prod", "copysign"}
_SYMPY_NAMES = {"Symbol", "Integer", "Rational", "Float", "Max", "Min", "Mod", "Abs", "floor", "ceiling", "Eq", "Ne",
                "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "oo", "zoo", "nan", "true", "false", "S", "Piecewise",
                "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
                "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv", "TruncToFloat",
                "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity", "IsNonOverlappingAndDenseIndicator",
                "BitwiseFn_bitwise_and", "BitwiseFn_bitwise_or", "OpaqueUnaryFn_sqrt", "OpaqueUnaryFn_exp",
                "OpaqueUnaryFn_log", "Pow", "Mul", "Add", "True", "False"}
_SYMBOL_KEYWORDS = {"positive", "integer", "real", "nonnegative", "negative", "nonpositive", "finite", "zero"}
_GUARD_METHODS = {"size", "stride", "storage_offset", "dim", "numel"}
_ARITH_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Compare, ast.BoolOp, ast.operator, ast.unaryop,
                ast.cmpop, ast.boolop, ast.Load, ast.Tuple)


def check_pt2(path: Path) -> None:
    """Refuse (ModelLoadError, exit 2) an archive from which torch.export.load could run code."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelLoadError(f"{path.name} is not a valid torch.export .pt2 file ({exc})",
                             "re-save it with torch.export.save") from None
    with archive:
        names = archive.namelist()
        for name in names:
            _check_member(path, archive, name)


def _refuse(path: Path, member: str, why: str) -> ModelLoadError:
    return ModelLoadError(f"a safe load of {path.name} refused {member.split('/', 1)[-1]}: {why}", TRUST_HINT)


def _check_member(path: Path, archive: zipfile.ZipFile, name: str) -> None:
    lower = name.lower()
    base = lower.rsplit("/", 1)[-1]
    if "/aotinductor/" in f"/{lower}" or base.endswith((".so", ".dll", ".dylib", ".pyd", ".py", ".cpp", ".o")):
        raise _refuse(path, name, "it is compiled or source code, which loading would run")
    if "/constants/" in f"/{lower}" and base.startswith(("custom_obj", "opaque_obj")):
        raise _refuse(path, name, "it is a pickled Python object, which loading would unpickle with code")
    if base.endswith((".pt", ".pkl")) or "/weights/" in f"/{lower}" or "/constants/" in f"/{lower}":
        data = archive.read(name)
        if base.endswith((".pt", ".pkl")) or data[:4] == b"PK\x03\x04" or _looks_pickled(archive, name):
            names = unsafe_imports(data)
            if names:
                raise _refuse(path, name, describe(names))
    if base.endswith(".json") and ("models/" in lower or base == "serialized_exported_program.json"):
        try:
            program = json.loads(archive.read(name))
        except (ValueError, UnicodeDecodeError):
            return  # torch's own reader reports a broken program
        problem = _program_problem(program)
        if problem:
            raise _refuse(path, name, problem)


def _looks_pickled(archive: zipfile.ZipFile, name: str) -> bool:
    """A weights or constants member that its payload config marks `use_pickle` (torch unpickles it)."""
    folder, _, member = name.rpartition("/")
    for config_name in archive.namelist():
        if config_name.startswith(folder + "/") and config_name.endswith("_config.json"):
            try:
                config = json.loads(archive.read(config_name)).get("config", {})
            except (ValueError, UnicodeDecodeError, AttributeError):
                return True  # a config we cannot read: scan the member
            for meta in config.values() if isinstance(config, dict) else ():
                if isinstance(meta, dict) and meta.get("path_name") == member and meta.get("use_pickle"):
                    return True
    return False


def _program_problem(program: Any) -> str | None:
    """The first thing in a serialized program that would run code on load or when it runs, or None."""
    for guard in program.get("guards_code") or () if isinstance(program, dict) else ():
        if not isinstance(guard, str) or not _safe_guard(guard):
            return f"its input guard {str(guard)[:80]!r} is not plain shape arithmetic (torch would exec it)"
    for key, value, parent in _walk(program):
        if key == "target" and isinstance(parent, dict) and "inputs" in parent:
            if not isinstance(value, str) or not _safe_target(value):
                return f"a graph node calls {str(value)[:80]!r}, which is not a torch operator"
        elif key == "expr_str":
            if not isinstance(value, str) or not _safe_sym_expr(value):
                return f"the shape expression {str(value)[:80]!r} is not plain arithmetic (sympy would eval it)"
        elif key in ("in_spec", "out_spec") and isinstance(value, str):
            if not _safe_treespec(value):
                return f"its {key} names a module to import"
    return None


def _walk(node: Any, key: str | None = None, parent: Any = None) -> Iterator[tuple[str | None, Any, Any]]:
    stack = [(key, node, parent)]
    while stack:
        key, node, parent = stack.pop()
        yield key, node, parent
        if isinstance(node, dict):
            stack.extend((k, v, node) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((key, v, parent) for v in node)


def _safe_target(target: str) -> bool:
    import torch
    from torch._ops import HigherOrderOperator, OpOverload, OpOverloadPacket

    parts = target.split(".")
    if any(not p or p.startswith("__") for p in parts):
        return False
    if parts[0] == "_operator":
        return len(parts) == 2 and parts[1] in _OPERATOR_OK
    if parts[0] == "math":
        return len(parts) == 2 and parts[1] in _MATH_OK
    if parts[0] == "torch" and len(parts) == 2:
        return parts[1].startswith(("sym_", "_sym_"))
    if parts[:2] != ["torch", "ops"] or len(parts) not in (4, 5):
        return False
    obj: Any = torch.ops
    for part in parts[2:]:
        try:
            obj = getattr(obj, part)
        except Exception:  # an operator this torch does not have: torch reports it
            return True
        if callable(obj) and not isinstance(obj, (OpOverload, OpOverloadPacket, HigherOrderOperator)) \
                and not type(obj).__name__.endswith("Namespace"):
            return False
    return isinstance(obj, (OpOverload, OpOverloadPacket, HigherOrderOperator))


def _parse(text: str) -> ast.AST | None:
    try:
        return ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def _safe_sym_expr(text: str) -> bool:
    tree = _parse(text)
    if tree is None:
        return False
    for node in ast.walk(tree):
        if isinstance(node, _ARITH_NODES):
            continue
        if isinstance(node, ast.Constant):
            if not isinstance(node.value, (int, float, bool, str)) or (isinstance(node.value, str)
                                                                     and not node.value.isidentifier()):
                return False
        elif isinstance(node, ast.Name):
            if not (node.id in _SYMPY_NAMES or _symbol_name(node.id)):
                return False
        elif isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in _SYMPY_NAMES:
                return False
        elif isinstance(node, ast.keyword):
            if node.arg not in _SYMBOL_KEYWORDS or not isinstance(node.value, ast.Constant):
                return False
        else:
            return False
    return True


def _symbol_name(name: str) -> bool:
    """Symbols torch creates: s0, s77, u3, c1, zuf0, ..."""
    head = name.rstrip("0123456789")
    return head != name and head.isalpha() and len(head) <= 4 and head.islower()


def _safe_guard(text: str) -> bool:
    """`L['x'].size()[0] <= 64` and the like: comparisons and arithmetic over input sizes."""
    tree = _parse(text)
    if tree is None:
        return False
    for node in ast.walk(tree):
        if isinstance(node, _ARITH_NODES + (ast.Subscript, ast.Slice)):
            continue
        if isinstance(node, ast.Constant):
            if not isinstance(node.value, (int, float, bool, str)):
                return False
        elif isinstance(node, ast.Name):
            if node.id not in ("L", "math") and node.id not in _SYMPY_NAMES:
                return False
        elif isinstance(node, ast.Attribute):
            allowed = _GUARD_METHODS if not (isinstance(node.value, ast.Name) and node.value.id == "math") else _MATH_OK
            if node.attr not in allowed:
                return False
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute):
                continue  # checked as an Attribute
            if not (isinstance(func, ast.Name) and func.id in _SYMPY_NAMES) or node.keywords:
                return False
        else:
            return False
    return True


def _safe_treespec(text: str) -> bool:
    """Tree specs are JSON; torch imports a defaultdict's factory module and an enum's module by name."""
    if "default_factory_module" not in text and "__enum__" not in text:
        return True
    try:
        spec = json.loads(text)
    except ValueError:
        return False
    for key, value, parent in _walk(spec):
        if isinstance(value, str) and ("default_factory_module" in value or "__enum__" in value):
            if not _safe_treespec(value):
                return False
        if key == "default_factory_module" and value not in ("builtins", "collections"):
            return False
        if key == "__enum__":
            return False
    return True
