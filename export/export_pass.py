"""The `export` pass, always last: the module (and the Q/DQ plan a quantize pass attached) written in the target's
formats: model.onnx (Q/DQ in the target's policy where there is a plan), OpenVINO IR beside it for OpenVINO
targets, a TensorRT engine where TensorRT runs here (else a warning record gives the trtexec command that builds it on the
device, export.trtexec, and the `deploy bench --runner ssh://` line that measures it from here).
"""
from __future__ import annotations

from dataclasses import dataclass

from deploy.core.errors import ConfigError
from deploy.core.model.onnx_export import OnnxExportConfig, export_onnx
from deploy.core.passes import Context, State, register_pass


@dataclass(frozen=True)
class ExportConfig:
    openvino_ir: bool = False  # also write model.xml / model.bin
    tensorrt_engine: bool = False  # also build model.plan where TensorRT and a GPU are here
    batch: int = 1  # the batch the engine is built for (dynamic batch axes)

    def __post_init__(self) -> None:
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")


@register_pass("export", ExportConfig)
class ExportPass:
    def __init__(self, config: ExportConfig):
        self.config = config

    def run(self, state: State, ctx: Context) -> State:
        if ctx.out_dir is None:
            raise ConfigError("the export pass needs an output folder (Context.out_dir)")
        path = ctx.out_dir / "model.onnx"
        plan = state.attached.get("quant_plan")
        notes: list[str] = []
        if plan is not None:
            from deploy.export.qdq.writer import export_quantized

            exported = export_quantized(plan, state.module, state.inputs, path)
            notes = list(exported.notes)
            if exported.openvino_xml is not None:
                state.artifacts["model.xml"] = exported.openvino_xml
        else:
            export_onnx(state.module, state.inputs, path, OnnxExportConfig(output_names=("output",)))
        state.artifacts["model.onnx"] = path
        if self.config.openvino_ir and "model.xml" not in state.artifacts:
            from deploy.export.openvino import save_ir

            state.artifacts["model.xml"] = save_ir(path, ctx.out_dir / "model.xml")
        if self.config.tensorrt_engine:
            self._engine(state, ctx, path)
        state.record(self.name, "decision", files=sorted(p.name for p in state.artifacts.values()), notes=notes)
        return state

    def _engine(self, state: State, ctx: Context, path) -> None:
        from deploy.targets.measure.feeds import make_feeds
        from deploy.targets.runners.tensorrt import save_engine, tensorrt_available

        if not tensorrt_available():
            from deploy.export.trtexec import hand_off

            plan = state.attached.get("quant_plan")
            precisions = {_float_kind(label) for label in plan.labels().values()} if plan is not None else set()
            steps = hand_off(path, state.inputs, precisions, state.target.profile.name, {"batch": self.config.batch})
            state.record(self.name, "warning", message="no TensorRT here, so model.plan was not built; " +
                         "; ".join(steps), trtexec=steps[0])
            return
        specs = [s.__class__(s.name, s.concrete_shape({"batch": self.config.batch}), s.dtype) for s in state.inputs]
        state.artifacts["model.plan"] = save_engine(path, ctx.out_dir / "model.plan", make_feeds(specs),
                                                    state.target.profile)


def _float_kind(label: str) -> str:
    """The float precision a layer label names (fp16, bf16), or the label itself."""
    return "fp16" if label.startswith(("fp16", "f16")) else "bf16" if label.startswith("bf16") else label
