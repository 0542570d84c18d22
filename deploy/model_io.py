"""Load a user's model from any supported file, with one clear line for every way that can go wrong.

Formats: TorchScript `.pt`, `torch.export` `.pt2`, a `state_dict` plus `--arch module:factory`, a pickled
`nn.Module` (only with `trust_pickle`: unpickling runs arbitrary code), and ONNX (for benchmarking).
"""
from __future__ import annotations

import hashlib
import importlib
import pickle
import re
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from deploy.errors import InputSpecError, ModelLoadError
from deploy.pipeline import InputSpec, dtype_name, torch_dtype

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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
        loaded = _load_exported(path, specs)
    elif suffix in TORCH_SUFFIXES:
        loaded = _load_torch_file(path, arch, trust_pickle, specs)
    else:
        raise ModelLoadError(f"unknown model file extension '{suffix or path.name}'", SUPPORTED)
    loaded.path = path
    loaded.sha256 = file_sha256(path)
    if check and loaded.module is not None:
        check_runs(loaded)
    return loaded


def from_module(module: torch.nn.Module, inputs: list[InputSpec]) -> LoadedModel:
    """Wrap an in-memory module (the Python API's entry)."""
    return LoadedModel(module.eval(), list(inputs), "module")


def load_example() -> LoadedModel:
    """The bundled example: a small ResNet-style CNN trained on scikit-learn's digits."""
    from deploy.examples import digits_cnn

    module = digits_cnn.load_example_model()
    spec = InputSpec(digits_cnn.INPUT_NAME, ("batch", *digits_cnn.INPUT_SHAPE[1:]), "float32")
    loaded = LoadedModel(module, [spec], "state_dict", path=digits_cnn.WEIGHTS_PATH)
    loaded.sha256 = file_sha256(digits_cnn.WEIGHTS_PATH)
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
        return LoadedModel(module.eval(), _require_specs(path, specs), "torchscript",
                           notes=["TorchScript: quantization only; pruning and low rank need the Python module "
                                  "(save a state_dict and pass --arch module:factory)"])
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" not in str(exc):  # anything else: not a pickle of Python objects
            raise ModelLoadError(f"{path.name} is not a readable PyTorch file ({_short(exc)})",
                                 "the file may be corrupt or truncated; re-save it") from None
        if not trust_pickle:
            raise ModelLoadError(
                f"{path.name} is a pickled Python object: loading it runs arbitrary code from the file",
                "pass --trust-pickle only if you trust its source, or save a state_dict and pass --arch") from None
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
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ModelLoadError(f"{path.name} could not be unpickled ({_short(exc)})",
                             "the classes it names must be importable here (check PYTHONPATH)") from None
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
    try:
        module = factory()
    except Exception as exc:
        raise ModelLoadError(f"--arch {arch} failed when called ({_short(exc)})",
                             "the factory must build the model with no arguments") from None
    if not isinstance(module, torch.nn.Module):
        raise ModelLoadError(f"--arch {arch} returned a {type(module).__name__}, not an nn.Module",
                             "the factory must return the model")
    return module


def import_object(spec: str, flag: str) -> Callable[..., Any]:
    """Import `package.module:attribute` for a flag such as --arch or a data hook."""
    if ":" not in spec:
        raise ModelLoadError(f"{flag} '{spec}' is not of the form module:function", f"write {flag} package.module:function")
    module_name, _, attr = spec.partition(":")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # let users name modules in the current folder, like `python -m` does
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ModelLoadError(f"{flag} {spec}: cannot import '{module_name}' ({_short(exc)})",
                             "check the module name and PYTHONPATH") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelLoadError(f"{flag} {spec}: '{module_name}' has no attribute '{attr}'", "check the function name")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelLoadError(f"{flag} {spec} is not callable", "name a function")
    return obj


def _load_exported(path: Path, specs: list[InputSpec]) -> LoadedModel:
    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise ModelLoadError(f"{path.name} is not a valid torch.export .pt2 file ({_short(exc)})",
                             "re-save it with torch.export.save") from None
    file_specs = exported_input_specs(program)
    module = program.module()
    return LoadedModel(module, specs or file_specs, "exported",
                       notes=["torch.export program: quantization only; pruning and low rank need the Python module "
                              "(save a state_dict and pass --arch module:factory)"])


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

    try:
        model = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ModelLoadError(f"{path.name} is not a valid ONNX model ({_short(exc)})", "re-export it") from None
    return LoadedModel(None, specs or onnx_input_specs(model), "onnx")


def onnx_input_specs(model: Any) -> list[InputSpec]:
    from onnx import helper

    initializers = {init.name for init in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dims: list[int | str] = []
        for axis, dim in enumerate(tensor.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                dims.append(int(dim.dim_value))
            else:
                dims.append(dim.dim_param or ("batch" if axis == 0 else f"dim{axis}"))
        dtype = helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        specs.append(InputSpec(value.name, tuple(dims), dtype))
    return specs


def check_runs(loaded: LoadedModel, sizes: dict[str, int] | None = None) -> Any:
    """Run the model once on its input spec; a mismatch becomes one line naming the shape that was tried."""
    gen = torch.Generator().manual_seed(0)
    args = tuple(spec.example(sizes, gen) for spec in loaded.inputs)
    try:
        with torch.inference_mode():
            return loaded.module(*args)
    except Exception as exc:
        shapes = ", ".join(f"{s.name}:{'x'.join(map(str, s.concrete_shape(sizes)))}:{s.dtype}" for s in loaded.inputs)
        raise InputSpecError(f"the model does not run on input {shapes} ({_short(exc)})",
                             "pass the right --input-shape NAME:DIMS:DTYPE for each input") from None


def _short(exc: BaseException, limit: int = 120) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
