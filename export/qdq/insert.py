"""Insert Q/DQ into a float ONNX graph per a quantization plan, with the plan's calibrated activation parameters and
integer weights from the same quantizer the torch simulation uses (so the two agree).

Edits, per non-float layer: a DequantizeLinear on integer weights (per-channel on the output-channel axis); a
Q/DQ pair on the input activation, shared by layers that read one tensor with the same parameters; an int32 bias
for convs (what QLinearConv adds); a Q/DQ on the (post-ReLU) output where the policy asks for one (ONNX Runtime
fuses DQ->Conv->Q into QLinearConv only with it). Where the plan has SmoothQuant factors, the input is divided by
them (a Mul) and the weight rows multiplied. int4 layers are left as MatMul here (export/qdq_int4.py turns them
into MatMulNBits); fp16/bf16 layers stay float in the file (the runtime's builder flag decides).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from deploy.export.qdq.editor import Editor, qdq_pair, tensor_tag, topological_sort, zero_point_type
from deploy.export.qdq.graph import LayerGraph, LayerNode
from deploy.export.qdq.plan import ActParams, LayerPlan, QuantPlan
from deploy.export.qdq.intmath import int32_bias, quantize_weight
from deploy.export.qdq.neighbours import (quantize_add_outputs, quantize_attention_probs, quantize_pool_inputs,
                                          quantize_residual_inputs)

FP8_MAX = 448.0


def fp8_params(params: ActParams) -> ActParams:
    """fp8 e4m3 parameters from a symmetric int8 range (same bound)."""
    return ActParams(params.scale * 127.0 / FP8_MAX, 0, True, "fp8")


def _quantize_output(ed: Editor, tensor: str, params: ActParams, tag: str) -> None:
    """Producer-side Q/DQ: every reader of `tensor` (graph outputs too) sees the dequantized value."""
    producer = next(n for n in ed.model.graph.node if tensor in n.output)
    raw = f"{tensor}.float"
    producer.output[list(producer.output).index(tensor)] = raw
    scale = ed.add_init(f"{tag}.scale", np.array(params.scale, dtype=np.float32))
    zp = ed.add_init(f"{tag}.zero_point", np.array(params.zero_point), zero_point_type(params))
    ed.node("QuantizeLinear", [raw, scale, zp], [f"{tag}.q"], f"{tag}/QuantizeLinear")
    ed.node("DequantizeLinear", [f"{tag}.q", scale, zp], [tensor], f"{tag}/DequantizeLinear")
    ed.dq_params[tensor] = params


def _transposed(node: Any) -> bool:
    """True when the node stores B = W^T ([in, out]): MatMul, and Gemm without transB."""
    if node.op_type == "MatMul":
        return True
    if node.op_type == "Gemm":
        from onnx import helper

        return not any(a.name == "transB" and helper.get_attribute_value(a) for a in node.attribute)
    return False


def _weight_torch(ed: Editor, node: Any) -> torch.Tensor:
    """The weight in torch layout ([out, in, ...])."""
    w = torch.from_numpy(ed.array(node.input[1]).copy()).float()
    return w.T.contiguous() if _transposed(node) else w


def _smooth_input(ed: Editor, node: Any, ln: LayerNode, lp: LayerPlan) -> None:
    """Divide the input by s (one Mul shared per tensor and factors) and scale the weight rows by s."""
    s = np.asarray(lp.smooth, dtype=np.float32)
    key = (node.input[0], lp.smooth)
    if key not in ed.smoothed:
        inv = ed.add_init(f"{lp.name}.smooth_inv", (1.0 / s).astype(np.float32))
        ed.node("Mul", [node.input[0], inv], [f"{lp.name}.smoothed"], f"{lp.name}/SmoothQuant/Mul")
        ed.smoothed[key] = f"{lp.name}.smoothed"
    node.input[0] = ed.smoothed[key]
    b = ed.array(node.input[1])
    # MatMul (and Gemm without transB) hold B as [K, N], row k for input channel k; Gemm with transB (as a
    # TorchScript Linear exports) holds it as [N, K], column k
    scaled = b * (s[:, None] if _transposed(node) else s[None, :])
    node.input[1] = ed.add_init(f"{lp.name}.weight_smoothed", scaled.astype(np.float32))


def _weight_dq(ed: Editor, node: Any, ln: LayerNode, lp: LayerPlan, int_bias: bool) -> None:
    from onnx import TensorProto

    opt = lp.option
    w = _weight_torch(ed, node)
    iw = quantize_weight(w, opt)
    q = iw.q.numpy().astype(np.int8)
    per_tensor = opt.granularity == "per-tensor"
    scale = iw.scale.reshape(-1).numpy().astype(np.float32)
    zp = iw.zero_point.reshape(-1).numpy().astype(np.int8)
    axis = 0
    if _transposed(node):
        q, axis = q.T.copy(), 1
    if per_tensor:
        scale, zp = scale.reshape(()), zp.reshape(())
    name = lp.name
    ed.add_init(f"{name}.weight_q", q)
    ed.add_init(f"{name}.weight_scale", scale)
    ed.add_init(f"{name}.weight_zp", zp, TensorProto.INT8)
    attrs = {} if per_tensor else {"axis": axis}
    ed.node("DequantizeLinear", [f"{name}.weight_q", f"{name}.weight_scale", f"{name}.weight_zp"],
            [f"{name}.weight_dq"], f"{name}/weight/DequantizeLinear", **attrs)
    node.input[1] = f"{name}.weight_dq"
    if int_bias and ln.bias and lp.act_in is not None and opt.precision == "int8":
        bias = torch.from_numpy(ed.array(ln.bias).copy()).float()
        bq, bscale = int32_bias(bias, lp.act_in.scale, iw)
        ed.add_init(f"{name}.bias_q", bq.numpy().astype(np.int32))
        ed.add_init(f"{name}.bias_scale", bscale.numpy().astype(np.float32))
        ed.add_init(f"{name}.bias_zp", np.zeros(bq.numel(), dtype=np.int32))
        ed.node("DequantizeLinear", [f"{name}.bias_q", f"{name}.bias_scale", f"{name}.bias_zp"],
                [f"{name}.bias_dq"], f"{name}/bias/DequantizeLinear", axis=0)
        target = ed.nodes_by_name()[ln.bias_add] if ln.bias_add else node  # MatMul: the bias is the Add's
        target.input[list(target.input).index(ln.bias)] = f"{name}.bias_dq"  # (an int32 bias also keeps ORT
        # from folding MatMul + Add into a float Gemm before it sees the Q/DQ; with it, it runs QGemm)


def _fp8_weight(ed: Editor, node: Any, ln: LayerNode, lp: LayerPlan) -> None:
    """fp8 e4m3 weights with one per-tensor scale (as the simulation's fp8 option)."""
    from onnx import TensorProto

    w = ed.array(node.input[1])
    scale = max(float(np.abs(w).max()), 1e-12) / FP8_MAX
    name = lp.name
    ed.add_init(f"{name}.weight_scale", np.array(scale, dtype=np.float32))
    ed.add_init(f"{name}.weight_zp", np.array(0.0), TensorProto.FLOAT8E4M3FN)
    ed.node("QuantizeLinear", [node.input[1], f"{name}.weight_scale", f"{name}.weight_zp"], [f"{name}.weight_q"],
            f"{name}/weight/QuantizeLinear")
    ed.node("DequantizeLinear", [f"{name}.weight_q", f"{name}.weight_scale", f"{name}.weight_zp"],
            [f"{name}.weight_dq"], f"{name}/weight/DequantizeLinear")
    node.input[1] = f"{name}.weight_dq"


def gemm_to_matmul(model: Any, graph: LayerGraph, layers: list[str]) -> None:
    """Rewrite a Linear's Gemm as MatMul + Add, the form MatMulNBits takes (int8 Linears keep Gemm: with an int32
    bias and no output Q ONNX Runtime runs it as QGemm with a float output; MatMul + Add would be re-fused into
    a float Gemm before the Q/DQ fusion sees it)."""
    from onnx import helper, numpy_helper

    ed = Editor(model)
    nodes = ed.nodes_by_name()
    for name in layers:
        ln = graph.nodes[name]
        if ln.op_type != "Gemm":
            continue
        node = nodes[ln.node]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            ed.notes.append(f"{name}: Gemm with transA/alpha/beta left as is")
            continue
        b = numpy_helper.to_array(ed.inits[ln.weight])
        if attrs.get("transB", 0):
            b = b.T
        weight = ed.add_init(f"{name}.weight", np.ascontiguousarray(b.astype(np.float32)))
        mm_out = f"{ln.node}/MatMul_output_0" if ln.bias else ln.output
        matmul = helper.make_node("MatMul", [ln.input, weight], [mm_out], name=f"{ln.node}/MatMul")
        index = list(model.graph.node).index(node)
        model.graph.node.remove(node)
        model.graph.node.insert(index, matmul)
        if ln.bias:
            model.graph.node.insert(index + 1, helper.make_node("Add", [mm_out, ln.bias], [ln.output],
                                                                name=f"{ln.node}/Add"))
        graph.nodes[name] = LayerNode(name, matmul.name, "MatMul", ln.input, weight, "", mm_out, ln.post,
                                      ln.relu_after)


def insert_qdq(model: Any, graph: LayerGraph, plan: QuantPlan, policy: Any) -> list[str]:
    """Edit `model` in place per `plan`; returns notes. Layers absent from the graph are reported, not guessed."""
    ed = Editor(model)
    nodes = ed.nodes_by_name()
    active = {n: lp for n, lp in plan.layers.items() if not lp.option.is_float}
    for name in [n for n in active if n not in graph.nodes]:
        ed.notes.append(f"{name}: not found in the exported graph, left float")
    active = {n: lp for n, lp in active.items() if n in graph.nodes}
    from deploy.export.qdq.policy import attention_layers, residual_layers

    attention, residual = attention_layers(graph, policy), residual_layers(graph, policy)
    for name, lp in active.items():  # producer-side output Qs first, so consumers can reuse them
        ln = graph.nodes[name]
        wants = ln.op_type in policy.output_q_ops or name in attention or name in residual
        if lp.option.precision == "int8" and wants and lp.act_in and lp.act_out:
            if ln.post not in ed.dq_params:
                _quantize_output(ed, ln.post, lp.act_out, f"{name}.out")
    for name, lp in active.items():
        ln, node = graph.nodes[name], nodes[graph.nodes[name].node]
        if lp.smooth and lp.option.precision != "fp8":
            _smooth_input(ed, node, ln, lp)
        if lp.option.precision == "int4":
            continue
        if lp.act_in is not None:
            params = fp8_params(lp.act_in) if lp.option.precision == "fp8" else lp.act_in
            source = node.input[0]
            if ed.dq_params.get(source) != params:
                node.input[0] = qdq_pair(ed, source, params, f"{tensor_tag(graph, source)}.in")
        if lp.option.precision == "fp8":
            _fp8_weight(ed, node, ln, lp)
        else:
            _weight_dq(ed, node, ln, lp, policy.int_bias)
    if attention:
        quantize_attention_probs(ed, set(attention.values()))
    if policy.residual_inputs:
        quantize_residual_inputs(ed, graph, plan, active)
    if policy.pool_inputs:
        quantize_pool_inputs(ed, graph, plan, active)
    if policy.quantize_adds:
        quantize_add_outputs(ed)
    _drop_unused_initializers(model)
    topological_sort(model)
    return ed.notes


def _drop_unused_initializers(model: Any) -> None:
    used = {name for n in model.graph.node for name in n.input} | {o.name for o in model.graph.output}
    for init in [i for i in model.graph.initializer if i.name not in used]:
        model.graph.initializer.remove(init)
