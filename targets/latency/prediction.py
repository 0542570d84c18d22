"""Predicted latency of an exported model for a device not at hand, with its error band (see
deploy.targets.latency.model for the roofline model and how its band is earned)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from deploy.core.spec import InputSpec
from deploy.targets.target import Target


def _precision_of(path: Path) -> str:
    """int8 when the exported graph carries Q/DQ pairs, else fp32."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return "int8" if any(n.op_type == "QuantizeLinear" for n in model.graph.node) else "fp32"


def predict_onnx(path: str | Path, target: Target, inputs: Sequence[InputSpec], float_path: str | Path | None = None,
                 precisions: Mapping[str, str] | None = None) -> dict[str, Any]:
    """{latency_ms, band_ms, verified, label, source: predicted}. A Q/DQ file is priced from its float graph with
    each layer at its planned precision (`precisions`, {module: precision, '*': rest}) or, without a plan, every
    layer at int8 (the portable roofline model reads layer shapes, not kernels that only exist on the device)."""
    from deploy.targets.latency.model import predict_latency

    path = Path(path)
    precision = dict(precisions) if precisions is not None else _precision_of(path)
    source = Path(float_path) if float_path is not None else path
    prediction = predict_latency(source, list(inputs), target.profile, precision_map=precision, threads=None)
    return {"latency_ms": prediction.ms, "band_ms": [prediction.low_ms, prediction.high_ms],
            "verified": prediction.verified, "label": prediction.label, "source": "predicted",
            "precision": precision if isinstance(precision, str) else "mixed",
            "per_layer": [layer.__dict__ for layer in prediction.per_layer[:20]]}
