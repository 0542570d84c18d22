"""One Q/DQ policy per runtime: where Q/DQ pairs go so that each runtime fuses them into low-precision kernels.

- ort-cpu: uint8 asymmetric activations, int8 symmetric per-channel weights (U8S8); a Q on each int8 conv's
  (post-ReLU) output so DQ->Conv->Q fuses into QLinearConv; int8 Linear without an output Q, which ONNX Runtime
  runs as MatMulIntegerToFloat (float output, float bias add); int4 weight-only Linear as MatMulNBits.
- openvino: the same Q/DQ without output Qs (OpenVINO's low-precision transformations turn them into quantized
  convolutions / FullyConnected); symmetric weights, asymmetric activations; float layers in bf16 where the CPU
  has it (the runner's precision hint); both inputs of a residual Add quantized, as NNCF does, so the Add fuses
  into the int8 convolution: the other input (a ResNet-18-width CNN: 10 Adds in bf16 subgraphs and 1.085x NNCF
  int8's p50 without, 1.022x with, top-1 agreement unchanged), and the conv's own output, signed int8 (the
  trained distorted-digits ResNet on AMX: 5 bf16 requantize subgraphs without, 44-53 us of OpenVINO's node time;
  10 comparisons each in fresh blocks, 1.052x NNCF's p50 without, 1.041x with). Also as NNCF: the global pool's
  input quantized where the layer it feeds is int8 (its pool then runs in int8, not in bf16 behind a reorder from
  the last block; the classifier's input Q/DQ sits on the pool's output, before the Flatten, so the pool hands
  uint8 to it), and a conv input with negative values (the image) int8 with zero point 0 (OpenVINO's
  convolution pays for a uint8 zero point: the stem took 67 us against NNCF's 41). Both together, 6 comparisons
  each in fresh blocks: 1.066x NNCF's p50 before, 1.014x after (faster in all 6); top-1 agreement 0.9889 / 0.9880,
  KL 0.00165 / 0.00170. Moving the classifier's Q before the Flatten then removed a bf16 reorder and a requantize
  subgraph (about 10 us): OpenVINO's summed node time 0.4% over NNCF's, against 5% before. The simulation does not
  model the pool input's rounding (averaged over the pool's window).
- tensorrt: symmetric int8 activations and weights (zero points 0), per-channel weights on the output-channel
  axis, Q/DQ on op inputs only, and the residual Add's other input quantized so Conv+Add fuses; LayerNorm,
  Softmax, GELU and residual Adds of transformers stay float (we only ever quantize the planned layers' inputs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deploy.core.errors import ConfigError


@dataclass(frozen=True)
class QdqPolicy:
    name: str
    act_signed: bool  # int8 symmetric activations (TensorRT) or uint8 asymmetric
    output_q_ops: tuple[str, ...] = ()  # op types whose int8 form needs a Q on the output
    residual_inputs: bool = False  # quantize the other input of an Add fed by an int8 conv
    residual_outputs: bool = False  # and that conv's output too (signed int8, `residual_layers`)
    pool_inputs: bool = False  # a global pool before an int8 layer gets its input quantized too (`pooled_layers`)
    signed_conv_inputs: bool = False  # a conv input with negative values: int8 symmetric (zero point 0), not uint8
    int_bias: bool = False  # int32 bias on Conv/Gemm (QLinearConv/QGemm fuse only with it)
    quantize_adds: bool = False  # a Q on an Add between dequantized inputs, so it fuses into QLinearAdd
    int4_qdq: bool = False  # int4 weight-only as a blocked int4 DequantizeLinear (TensorRT), not MatMulNBits
    openvino_ir: bool = False  # also write OpenVINO IR next to the ONNX file
    attention_matmuls: bool = False  # quantize the inputs of activation x activation MatMuls (attention)
    runtime: str = "onnxruntime"  # the runtime that reads the file here (for verification)
    # the layers reading one tensor run in low precision together or not at all (OpenVINO ran a conv planned
    # int8 in float when its sibling on the same input was float)
    tie_shared_inputs: bool = False


POLICIES = {
    "ort-cpu": QdqPolicy("ort-cpu", act_signed=False, output_q_ops=("Conv",), int_bias=True, quantize_adds=True),
    "openvino": QdqPolicy("openvino", act_signed=False, openvino_ir=True, runtime="openvino", attention_matmuls=True,
                          tie_shared_inputs=True, residual_inputs=True, residual_outputs=True,
                          pool_inputs=True, signed_conv_inputs=True),
    "tensorrt": QdqPolicy("tensorrt", act_signed=True, residual_inputs=True, runtime="tensorrt", int4_qdq=True),
}


def policy_for(name: str) -> QdqPolicy:
    if name not in POLICIES:
        raise ConfigError(f"unknown Q/DQ policy '{name}'", f"known: {', '.join(POLICIES)}")
    return POLICIES[name]


def attention_layers(graph: Any, policy: QdqPolicy) -> dict[str, str]:
    """Layers whose int8 form also quantizes its output because it feeds an attention MatMul (the policy's
    `attention_matmuls`): layer -> MatMul node. Empty without a graph or for other policies."""
    if graph is None or not policy.attention_matmuls:
        return {}
    return graph.attention_feeders()


def residual_layers(graph: Any, policy: QdqPolicy) -> dict[str, str]:
    """Conv layers whose int8 form also quantizes its output (signed int8) because it feeds a residual Add (the
    policy's `residual_outputs`): layer -> the Add's name. Empty without a graph or for other policies."""
    if graph is None or not policy.residual_outputs:
        return {}
    return graph.residual_convs()


def pooled_layers(graph: Any, policy: QdqPolicy) -> dict[str, tuple[str, str]]:
    """Global pools whose input is quantized too when the layer they feed runs in int8 (the policy's
    `pool_inputs`): pool node -> (its input tensor, that layer). Empty without a graph or for other policies."""
    if graph is None or not policy.pool_inputs:
        return {}
    return graph.pooled_layers()
