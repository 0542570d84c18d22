"""int4 weight-only Linear layers as ONNX Runtime's MatMulNBits, via onnxruntime.quantization's MatMulNBitsQuantizer
(round-to-nearest, the same arithmetic as the torch simulation), restricted to the layers the plan chose.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from deploy.export.qdq.graph import LayerGraph
from deploy.export.qdq.plan import QuantPlan


def int4_groups(plan: QuantPlan, graph: LayerGraph) -> dict[tuple[int, bool], list[str]]:
    """(block size, symmetric) -> MatMul node names: one quantizer run per distinct setting."""
    groups: dict[tuple[int, bool], list[str]] = {}
    for name, lp in plan.layers.items():
        if lp.option.precision == "int4" and name in graph.nodes and graph.nodes[name].op_type == "MatMul":
            groups.setdefault((lp.option.group_size, lp.option.weight_symmetric), []).append(graph.nodes[name].node)
    return groups


def _name_weights(model: Any, graph: LayerGraph, plan: QuantPlan) -> None:
    """Give each int4 layer's B its own initializer named after the layer, so MatMulNBits' weight says which
    layer it is (`<layer>.weight_Q4`) when the optimised graph is read back."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    for name, lp in plan.layers.items():
        if lp.option.precision != "int4" or name not in graph.nodes:
            continue
        node = nodes[graph.nodes[name].node]
        wanted = f"{name}.weight"
        if node.input[1] != wanted:
            array = numpy_helper.to_array(inits[node.input[1]])
            tensor = numpy_helper.from_array(np.ascontiguousarray(array), wanted)
            if wanted in inits:
                model.graph.initializer.remove(inits[wanted])
            model.graph.initializer.append(tensor)
            inits[wanted] = tensor
            node.input[1] = wanted


def apply_int4(model: Any, graph: LayerGraph, plan: QuantPlan, qdq: bool = False,
               accuracy_level: int | None = None) -> Any:
    """Returns the model with the plan's int4 layers as MatMulNBits, or (`qdq`, for TensorRT) as a blocked int4
    DequantizeLinear feeding the MatMul (opset 21); other MatMuls untouched."""
    groups = int4_groups(plan, graph)
    if not groups:
        return model
    import logging

    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # (its warnings that it raised the opset to 21 for int4 are expected; export checks the model afterwards)
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.ERROR)
    _name_weights(model, graph, plan)
    for (block, symmetric), names in groups.items():
        # nodes_to_include only ADDS to the op types it quantizes (every MatMul): exclude all others explicitly
        others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in names]
        quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block, is_symmetric=symmetric,
                                         accuracy_level=accuracy_level, nodes_to_include=names,
                                         nodes_to_exclude=others,
                                         quant_format=QuantFormat.QDQ if qdq else QuantFormat.QOperator)
        quantizer.process()
        model = quantizer.model.model
    return model
