"""Q/DQ pairs around an int8 layer rather than on its own input: a runtime fuses an int8 layer with the ops next to
it (attention's P.V MatMul, a residual Add, a global pool, ONNX Runtime's QLinearAdd) only when their other inputs
are quantized too. Each function edits the model in place through insert's editor, after the layers' own Q/DQ.
"""
from __future__ import annotations

from typing import Any

from deploy.export.qdq.graph import PASS_THROUGH, LayerGraph
from deploy.export.qdq.editor import Editor, qdq_pair, tensor_tag, topological_sort
from deploy.export.qdq.plan import ActParams, LayerPlan, QuantPlan


SOFTMAX_PARAMS = ActParams(1.0 / 255.0, 0, False, "fixed")  # probabilities in [0, 1] as uint8
RESHAPES = ("Flatten", "Reshape", "Squeeze", "Unsqueeze")  # keep the values in memory order


def quantize_attention_probs(ed: Editor, matmuls: set[str]) -> None:
    """Attention's P.V MatMul runs in int8 only with both inputs quantized: where V arrives dequantized (its
    producing layer is int8), give the Softmax output a fixed [0, 1] uint8 Q/DQ (what NNCF's transformer preset
    does). The simulation does not model this one rounding (a step of 1/255 on the probabilities)."""
    producer = {o: n for n in ed.model.graph.node for o in n.output}

    def dequantized(tensor: str) -> bool:
        while tensor not in ed.dq_params:
            node = producer.get(tensor)
            if node is None or node.op_type not in PASS_THROUGH:
                return False
            tensor = node.input[0]
        return True

    for node in list(ed.model.graph.node):
        if node.name not in matmuls or node.op_type != "MatMul":
            continue
        for i, j in ((0, 1), (1, 0)):
            src = producer.get(node.input[i])
            if src is not None and src.op_type == "Softmax" and dequantized(node.input[j]):
                tag = f"{node.name.replace('/', '.').strip('.')}.p"
                node.input[i] = qdq_pair(ed, node.input[i], SOFTMAX_PARAMS, tag)


def quantize_residual_inputs(ed: Editor, graph: LayerGraph, plan: QuantPlan, active: dict[str, LayerPlan]) -> None:
    """TensorRT and OpenVINO fuse Conv + residual Add when the Add's OTHER input is quantized too: give it a Q/DQ."""
    conv_out = {graph.nodes[n].output: n for n, lp in active.items()
                if lp.option.precision == "int8" and graph.nodes[n].op_type == "Conv"}
    known = tensor_params(graph, plan)
    for node in list(ed.model.graph.node):
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        for i, j in ((0, 1), (1, 0)):
            if node.input[i] in conv_out and node.input[j] not in ed.dq_params:
                params = known.get(node.input[j])
                if params is None:
                    ed.notes.append(f"{node.name}: residual input {node.input[j]} has no calibrated range, left float")
                    break
                node.input[j] = qdq_pair(ed, node.input[j], params, f"{tensor_tag(graph, node.input[j])}.res")
                break


def quantize_pool_inputs(ed: Editor, graph: LayerGraph, plan: QuantPlan, active: dict[str, LayerPlan]) -> None:
    """OpenVINO runs a global pool in int8 only with its input quantized (NNCF puts a Q there): without it, the
    trained distorted-digits ResNet's pool ran in bf16 behind a reorder from the last int8 block. Only where the
    layer the pool feeds runs in int8, with the range calibrated on the pool's input (`QuantPlan.tensors`)."""
    nodes = ed.nodes_by_name()
    for name, (tensor, layer) in graph.pooled_layers().items():
        lp = active.get(layer)
        params = plan.tensors.get(tensor)
        if lp is None or lp.option.precision != "int8" or name not in nodes:
            continue
        if params is None:
            ed.notes.append(f"{name}: its input {tensor} has no calibrated range, left float")
            continue
        node = nodes[name]
        if node.input[0] not in ed.dq_params:
            node.input[0] = qdq_pair(ed, node.input[0], params, f"{tensor_tag(graph, tensor)}.pool")
        _onto_pool_output(ed, node)


def _onto_pool_output(ed: Editor, pool: Any) -> None:
    """The layer's input Q/DQ (and its SmoothQuant Mul) moved from after the Flatten onto the pool's output, as NNCF
    places it: the pool then hands uint8 straight to the int8 FullyConnected (with the Q after the Flatten, OpenVINO
    put a bf16 reorder and a requantize subgraph between them). Per-tensor Q/DQ commutes with a reshape; the Mul's
    per-channel factors are reshaped to the pool output's channel axis. Left in place where the chain branches or
    moves an axis (a Transpose)."""
    readers = ed.readers()
    chain, tensor = [], pool.output[0]
    while len(readers.get(tensor, [])) == 1 and readers[tensor][0].op_type in RESHAPES:
        chain.append(readers[tensor][0])
        tensor = chain[-1].output[0]
    after = readers.get(tensor, [])
    if not chain or len(after) != 1:
        return
    first = head = after[0]
    if head.op_type == "Mul" and head.input[1] in ed.inits and len(readers.get(head.output[0], [])) == 1:
        head = readers[head.output[0]][0]
    dqs = readers.get(head.output[0], [])
    if head.op_type != "QuantizeLinear" or len(dqs) != 1 or dqs[0].op_type != "DequantizeLinear":
        return
    if first is not head:  # the SmoothQuant Mul: its factors along the pool output's channel axis
        rank = _rank(ed.model, pool.output[0])
        factors = ed.array(first.input[1])
        if rank is None or factors.ndim != 1:
            return
        ed.add_init(first.input[1], factors.reshape(-1, *[1] * (rank - 2)))
    dq = dqs[0].output[0]
    for node in readers.get(dq, []):
        node.input[list(node.input).index(dq)] = tensor
    first.input[0], chain[0].input[0] = pool.output[0], dq


def _rank(model: Any, tensor: str) -> int | None:
    """`tensor`'s rank from ONNX shape inference (None where it cannot tell), on a sorted copy: inference reads the
    nodes in order, the edits so far appended theirs at the end, and sorting `model` itself would detach the nodes
    the caller holds."""
    import onnx

    ordered = onnx.ModelProto()
    ordered.CopyFrom(model)
    topological_sort(ordered)
    inferred = onnx.shape_inference.infer_shapes(ordered).graph
    for info in [*inferred.value_info, *inferred.input, *inferred.output]:
        if info.name == tensor and info.type.tensor_type.HasField("shape"):
            return len(info.type.tensor_type.shape.dim)
    return None


def quantize_add_outputs(ed: Editor) -> None:
    """ONNX Runtime fuses DQ,DQ -> Add -> Q into QLinearAdd, but only with the Q right on the Add's output (its
    ReLU removal runs too late). When both inputs are dequantized and the (ReLU'd) sum is only ever read by our
    one Q, put that Q's parameters on the Add's output as well: with a range starting at 0 it clamps like the
    ReLU, so the values are those the next layer's input Q would produce anyway (the simulation is unchanged)."""
    readers = ed.readers()
    outputs = {o.name for o in ed.model.graph.output}
    for add in [n for n in ed.model.graph.node if n.op_type == "Add"]:
        if len(add.input) != 2 or not all(i in ed.dq_params for i in add.input) or add.output[0] in outputs:
            continue
        after = readers.get(add.output[0], [])
        relu = after[0] if len(after) == 1 and after[0].op_type == "Relu" else None
        tensor = relu.output[0] if relu is not None else add.output[0]
        qs = readers.get(tensor, [])
        if tensor in outputs or len(qs) != 1 or qs[0].op_type != "QuantizeLinear":
            continue
        params = next((p for (t, p), dq in ed.shared.items() if t == tensor and dq in ed.dq_params), None)
        if params is None or (relu is not None and params.zero_point != params.qmin):
            continue
        source = add.output[0]
        dq = qdq_pair(ed, source, params, f"{add.name.replace('/', '.').strip('.')}.out")
        for node in after:
            node.input[list(node.input).index(source)] = dq


def tensor_params(graph: LayerGraph, plan: QuantPlan) -> dict[str, ActParams]:
    out: dict[str, ActParams] = {}
    for name, lp in plan.layers.items():
        ln = graph.nodes.get(name)
        if ln is None:
            continue
        if lp.act_in is not None:
            out.setdefault(ln.input, lp.act_in)
        if lp.act_out is not None:
            out.setdefault(ln.post, lp.act_out)
            out.setdefault(ln.output, lp.act_out)
    return out
