"""Load a user's model from any supported file, with one clear line for every way that can go wrong.

Formats: TorchScript `.pt`, `torch.export` `.pt2`, a `state_dict` plus `--arch module:factory`, a pickled
`nn.Module` (only with `trust_pickle`: unpickling runs arbitrary code), and ONNX (for benchmarking).
"""
from __future__ import annotations

import hashlib
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from deploy.core.errors import InputSpecError, ModelLoadError
from deploy.core.spec import InputSpec, dtype_name, torch_dtype
from deploy.core.model.checks import check_input_sizes, check_runs
from deploy.core.model.files import file_sha256, onnx_input_specs
from deploy.core.user_code import call_user, import_object, short as _short

TORCH_SUFFIXES = (".pt", ".pth", ".ts", ".bin")
SUPPORTED = "give .pt/.pth (TorchScript, state_dict or pickled module), .pt2 (torch.export) or .onnx"


@dataclass
class LoadedModel:
    """A model as loaded: the torch module (None for ONNX), its inputs, and what it was loaded from."""

    module: torch.nn.Module | None
    inputs: list[InputSpec]
    format: str  # torchscript | exported | state_dict | pickle | onnx | module
    path: Path | None = None
    sha256: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def structural(self) -> bool:
        """True when the Python module is at hand, so structural passes (pruning, low rank) can edit it."""
        return self.format in ("state_dict", "pickle", "module")


def layer_names(module: torch.nn.Module) -> list[str]:
    """The names of the modules that hold weights: what plans, reports and deploy.toml name."""
    return [name for name, m in module.named_modules()
            if name and any(True for _ in m.parameters(recurse=False))]


def layer_digest(module: torch.nn.Module) -> str:
    """A short digest of the weight-holding layers' names and shapes: the model a plan was made for."""
    digest = hashlib.sha256()
    for name in layer_names(module):
        for pname, param in module.get_submodule(name).named_parameters(recurse=False):
            digest.update(f"{name}.{pname}:{tuple(param.shape)}\n".encode())
    return digest.hexdigest()[:16]


# --- input shapes ----------------------------------------------------------------------------------------------

_SHAPE_RE = re.compile(r"^(?:(?P<name>[A-Za-z_][\w.]*):)?(?P<dims>[\w]+(?:x[\w]+)*)(?::(?P<dtype>\w+))?$")


def parse_input_shape(text: str, index: int = 0) -> InputSpec:
    """Parse `name:1x128:int64` (name and dtype optional; a dim may be a name such as `batch` for a dynamic axis)."""
    match = _SHAPE_RE.match(text.strip())
    if not match:
        raise InputSpecError(f"cannot read input shape '{text}'", "write NAME:1x3x224x224:float32 (name and dtype optional)")
    dims: list[int | str] = []
    for part in match["dims"].split("x"):
        if part.isdigit():
            if int(part) < 1:
                raise InputSpecError(f"input shape '{text}' has a zero dimension", "every dimension must be >= 1")
            dims.append(int(part))
        else:
            dims.append(part)
    dtype = match["dtype"] or "float32"
    try:
        torch_dtype(dtype)
    except Exception:
        raise InputSpecError(f"input shape '{text}' has unknown dtype '{dtype}'",
                             "use float32, float16, int64, int32, uint8 or bool") from None
    return InputSpec(match["name"] or ("input" if index == 0 else f"input_{index}"), tuple(dims), dtype)


def parse_input_shapes(texts: Iterable[str]) -> list[InputSpec]:
    specs = [parse_input_shape(t, i) for i, t in enumerate(texts)]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise InputSpecError("two --input-shape entries share a name", "give each input its own NAME:")
    return specs


# --- loading ------------------------------------------------------------------------------------------------------

def load_model(path: str | Path, arch: str | None = None, trust_pickle: bool = False,
               input_shapes: Iterable[str] = (), check: bool = True) -> LoadedModel:
    """Load any supported model file. `check` runs the model once on its input spec to catch shape mistakes."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model file {path} does not exist", "check the path")
    if path.is_dir():
        raise ModelLoadError(f"{path} is a folder, not a model file", SUPPORTED)
    if path.stat().st_size == 0:
        raise ModelLoadError(f"model file {path} is empty (0 bytes)", "re-save or re-export the model")
    specs = parse_input_shapes(input_shapes)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        loaded = _load_onnx(path, specs)
    elif suffix == ".pt2":
        loaded = _load_exported(path, specs, trust_pickle)
    elif suffix in TORCH_SUFFIXES:
        loaded = _load_torch_file(path, arch, trust_pickle, specs)
    else:
        raise ModelLoadError(f"unknown model file extension '{suffix or path.name}'", SUPPORTED)
    loaded.path = path
    loaded.sha256 = file_sha256(path)
    if check and loaded.module is not None:
        check_runs(loaded.module, loaded.inputs)
    return loaded


def from_module(module: torch.nn.Module, inputs: list[InputSpec]) -> LoadedModel:
    """Wrap an in-memory module (the Python API's entry)."""
    return LoadedModel(module.eval(), list(inputs), "module")


def load_example(input_shapes: Iterable[str] = ()) -> LoadedModel:
    """The bundled example: a small ResNet-style CNN trained on scikit-learn's digits (`input_shapes` may set
    its input, as for any model)."""
    from deploy.examples import digits_cnn

    module = digits_cnn.load_example_model()
    specs = parse_input_shapes(input_shapes) or [
        InputSpec(digits_cnn.INPUT_NAME, ("batch", *digits_cnn.INPUT_SHAPE[1:]), "float32")]
    loaded = LoadedModel(module, specs, "state_dict", path=digits_cnn.WEIGHTS_PATH)
    loaded.sha256 = file_sha256(digits_cnn.WEIGHTS_PATH)
    if input_shapes:
        check_runs(loaded.module, loaded.inputs)
    return loaded


def _require_specs(path: Path, specs: list[InputSpec], module: torch.nn.Module | None = None) -> list[InputSpec]:
    if specs:
        return specs
    declared = getattr(module, "input_specs", None) if module is not None else None
    if callable(declared):
        return list(declared())
    raise InputSpecError(f"the input shape of {path.name} is unknown (this format does not store it)",
                         "pass --input-shape NAME:1x3x224x224:float32 (repeat it for several inputs)")


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def _load_torch_file(path: Path, arch: str | None, trust_pickle: bool, specs: list[InputSpec]) -> LoadedModel:
    if _is_torchscript(path):
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise ModelLoadError(f"{path.name} looks like TorchScript but does not load ({_short(exc)})",
                                 "re-save it with torch.jit.save") from None
        specs = _require_specs(path, specs)
        return LoadedModel(_lifted(torchscript_program(module, specs), module, specs), specs, "torchscript",
                           notes=["TorchScript: quantization only; pruning and low rank need the Python module "
                                  "(save a state_dict and pass --arch module:factory)"])
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        from deploy.core.model.unsafe_pickle import describe, unsafe_imports

        names = unsafe_imports(path.read_bytes())
        if not names:  # the safe load failed on something that is not a pickle of Python objects
            raise ModelLoadError(f"{path.name} is not a readable PyTorch file ({_short(exc)})",
                                 "the file may be corrupt or truncated; re-save it") from None
        if not trust_pickle:
            raise ModelLoadError(
                f"a safe load of {path.name} refused code in it: {describe(names)} (a pickled model or object)",
                "pass --trust-pickle only if you trust its source; better, save model.state_dict() and pass "
                "--arch module:factory") from None
        return _load_pickle(path, specs)
    except Exception as exc:
        raise ModelLoadError(f"{path.name} is not a readable PyTorch file ({_short(exc)})",
                             "the file may be corrupt or truncated; re-save it") from None
    state_dict = _as_state_dict(obj)
    if state_dict is None:
        raise ModelLoadError(f"{path.name} holds a {type(obj).__name__}, not a model or a state_dict", SUPPORTED)
    if not arch:
        raise ModelLoadError(f"{path.name} is a state_dict: it holds weights but not the architecture",
                             "pass --arch module:factory naming a function that builds the model")
    module = build_arch(arch)
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"the weights in {path.name} do not fit --arch {arch} ({_short(exc, 160)})",
                             "check that --arch builds the same architecture the weights came from") from None
    module.eval()
    return LoadedModel(module, _require_specs(path, specs, module), "state_dict")


def _load_pickle(path: Path, specs: list[InputSpec]) -> LoadedModel:
    """A trusted pickle: classes may come from modules in the current folder, as for --arch."""
    import sys

    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")
    try:
        obj = call_user(lambda: torch.load(str(path), map_location="cpu", weights_only=False), "--trust-pickle",
                        path.name, what="could not be unpickled")
    except ModelLoadError as exc:
        if "__main__" in exc.message:
            raise ModelLoadError(
                f"{path.name} was pickled from a script: its classes live in that script's __main__, which no other "
                "program can import", "save model.state_dict() instead and pass --arch module:factory (a function "
                "that builds the model, in a module in the current folder)") from None
        raise ModelLoadError(exc.message, "the classes it names must be importable here (a module in the current "
                                          "folder or on PYTHONPATH); or save a state_dict and pass --arch") from None
    if not isinstance(obj, torch.nn.Module):
        raise ModelLoadError(f"{path.name} unpickles to a {type(obj).__name__}, not an nn.Module", SUPPORTED)
    obj.eval()
    return LoadedModel(obj, _require_specs(path, specs, obj), "pickle")


def _as_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return obj
    return None


def build_arch(arch: str) -> torch.nn.Module:
    """Import `module:factory` (the user's own code, like any import) and call it with no arguments."""
    factory = import_object(arch, "--arch")
    module = call_user(factory, "--arch", arch, what="failed when called (the factory must build the model with "
                                                        "no arguments)")
    if not isinstance(module, torch.nn.Module):
        raise ModelLoadError(f"--arch {arch} returned a {type(module).__name__}, not an nn.Module",
                             "the factory must return the model")
    return module


def load_exported_program(path: Path, trust_pickle: bool = False) -> Any:
    """torch.export.load behind the archive check: without `trust_pickle` nothing in the file can run code."""
    import contextlib

    from deploy.core.model.pt2_guard import check_pt2
    from deploy.core.model.unsafe_pickle import weights_only_loads

    if not trust_pickle:
        check_pt2(path)
    try:
        with contextlib.nullcontext() if trust_pickle else weights_only_loads():
            return torch.export.load(str(path))
    except Exception as exc:
        from deploy.core.model.unsafe_pickle import refused_by_safe_load

        if not trust_pickle and refused_by_safe_load(exc):
            from deploy.core.model.pt2_guard import TRUST_HINT

            raise ModelLoadError(f"a safe load of {path.name} refused pickled code in it ({_short(exc, 80)})",
                                 TRUST_HINT) from None
        raise ModelLoadError(f"{path.name} is not a valid torch.export .pt2 file ({_short(exc)})",
                             "re-save it with torch.export.save") from None


def _load_exported(path: Path, specs: list[InputSpec], trust_pickle: bool = False) -> LoadedModel:
    program = load_exported_program(path, trust_pickle)
    specs = specs or exported_input_specs(program)
    check_input_sizes(specs)
    module = _lifted(program, None, specs)
    return LoadedModel(module, specs, "exported",
                       notes=["torch.export program: quantization only; pruning and low rank need the Python module "
                              "(save a state_dict and pass --arch module:factory)"])


def torchscript_program(module: Any, specs: list[InputSpec]) -> Any:
    from deploy.core.model.graph_lift import torchscript_to_program

    check_input_sizes(specs)
    return torchscript_to_program(module, specs)


def _lifted(program: Any, original: Any, specs: list[InputSpec]) -> torch.nn.Module:
    """The graph with real layers (deploy.core.model.graph_lift), checked against the original: TorchScript, or the
    program's own module."""
    from deploy.core.model.graph_lift import check_same, lift_layers

    graph_module = program.module()
    order = [name for name, _ in original.named_modules()] if original is not None else []
    lifted = lift_layers(graph_module, order)
    check_same(lifted, original if original is not None else graph_module, specs)
    return lifted


def exported_input_specs(program: Any) -> list[InputSpec]:
    """Input names, shapes (symbolic dims as names) and dtypes stored in an ExportedProgram."""
    user_inputs = list(program.graph_signature.user_inputs)
    specs = []
    for node in program.graph.nodes:
        if node.op != "placeholder" or node.name not in user_inputs:
            continue
        val = node.meta.get("val")
        if val is None or not hasattr(val, "shape"):
            continue
        dims: list[int | str] = []
        for axis, dim in enumerate(val.shape):
            try:
                dims.append(int(dim))
            except Exception:
                dims.append("batch" if axis == 0 else f"dim{axis}")
        specs.append(InputSpec(node.name, tuple(dims), dtype_name(val.dtype)))
    return specs


def _load_onnx(path: Path, specs: list[InputSpec]) -> LoadedModel:
    import onnx

    from deploy.core.model.onnx_guard import external_data_files

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelLoadError(f"{path.name} is not a valid ONNX model ({_short(exc)})", "re-export it") from None
    external_data_files(model, path)  # before anything reads the data
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ModelLoadError(f"{path.name} is not a valid ONNX model ({_short(exc)})", "re-export it") from None
    return LoadedModel(None, specs or onnx_input_specs(model), "onnx")
