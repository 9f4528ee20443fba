"""Static int8 Q/DQ graphs that ONNX Runtime's CPU provider and TensorRT's explicit quantization both run.

Every MatMul whose second input is a 2-D weight (the linears) becomes

    x ──Q(s_x, 0)──DQ(s_x, 0)──┐           s_x = amax(x) / 127: per tensor, calibrated (ranges.py)
                               MatMul ──> y (float, as before)
    W_int8 [K,N] ──DQ(s_w, 0, axis 1)──┘   s_w[n] = max_k |W[k,n]| / 127: per output channel

int8 with zero point 0 on both sides (TensorRT quantizes symmetrically); nothing else is touched, so
LayerNorm, softmax, the attention products between activations, the context attention and its
reductions, biases and residual adds stay in fp32 in both runtimes. Each consumer of a tensor gets its
own Q/DQ pair with its own scale initializers: ONNX Runtime fuses DQ -> MatMul into an integer
MatMulIntegerToFloat only when the pair feeds one node, and its common-subexpression pass would merge
identical pairs back into a shared one.

expand_plugin(): head_trt.onnx's ContextAttention node as standard ops (the folded form it stands for),
so that ONNX Runtime can run that graph to calibrate it; the node's output keeps its name.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from export.common import save_model
from export.head import PLUGIN

from .data import CalibrationError


def _is_weight_matmul(node, inits: dict, exclude) -> bool:
    """A MatMul with a 2-D initializer as B, not named in `exclude`."""
    return (node.op_type == "MatMul" and node.input[1] in inits and len(inits[node.input[1]].dims) == 2
            and node.name not in exclude)


def weight_matmuls(model: onnx.ModelProto, exclude=()) -> list:
    inits = {t.name: t for t in model.graph.initializer}
    return [n for n in model.graph.node if _is_weight_matmul(n, inits, exclude)]


def quantized_inputs(model: onnx.ModelProto, exclude=()) -> list[str]:
    """The activations that get a Q/DQ pair (the A inputs of weight_matmuls)."""
    return sorted({n.input[0] for n in weight_matmuls(model, exclude)})


def quantize_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[K,N] float -> int8 [K,N] and per-column scales [N] (symmetric, -127..127)."""
    scale = np.maximum(np.abs(w).max(axis=0), 1e-12).astype(np.float32) / np.float32(127)
    return np.clip(np.rint(w / scale), -127, 127).astype(np.int8), scale


def insert_qdq(src: Path, dst: Path, ranges, exclude=()) -> Path:
    """Write the Q/DQ form of `src` (module docstring) with activation scales from `ranges` (ranges.Ranges
    collected on src: every quantized input needs one)."""
    model = onnx.load(str(src))
    missing = sorted(set(quantized_inputs(model, exclude)) - set(ranges.amax))
    if missing:
        raise CalibrationError(f"{Path(src).name}: expected a calibrated range for every quantized input, found none "
                               f"for {missing[:3]}{' ...' if len(missing) > 3 else ''} ({len(missing)} tensors)")
    inits = {t.name: t for t in model.graph.initializer}
    quantized, new_inits, count, nodes = set(), [], {}, []
    for node in model.graph.node:
        if _is_weight_matmul(node, inits, exclude):
            x, wname = node.input[0], node.input[1]
            if wname not in quantized:                       # a weight shared by several MatMuls: quantized once
                wq, ws = quantize_weight(numpy_helper.to_array(inits[wname]))
                new_inits += [numpy_helper.from_array(wq, f"{wname}/int8"), numpy_helper.from_array(ws, f"{wname}/scale"),
                              numpy_helper.from_array(np.zeros(ws.shape, np.int8), f"{wname}/zero_point")]
                quantized.add(wname)
            k = count[x] = count.get(x, 0) + 1
            p = f"{x}/qdq{k}"
            new_inits += [numpy_helper.from_array(np.array(ranges.scale(x), np.float32), f"{p}/scale"),
                          numpy_helper.from_array(np.array(0, np.int8), f"{p}/zero_point")]
            nodes += [helper.make_node("QuantizeLinear", [x, f"{p}/scale", f"{p}/zero_point"], [f"{p}/q"], name=f"{p}/Q"),
                      helper.make_node("DequantizeLinear", [f"{p}/q", f"{p}/scale", f"{p}/zero_point"], [f"{p}/dq"],
                                       name=f"{p}/DQ"),
                      helper.make_node("DequantizeLinear", [f"{wname}/int8", f"{wname}/scale", f"{wname}/zero_point"],
                                       [f"{p}/w"], name=f"{p}/weight_DQ", axis=1)]
            node.input[0], node.input[1] = f"{p}/dq", f"{p}/w"
        nodes.append(node)
    kept = [t for t in model.graph.initializer if t.name not in quantized]
    del model.graph.node[:], model.graph.initializer[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(kept + new_inits)
    return save_model(model, dst)


# ---- the TensorRT head graph, runnable by ONNX Runtime ------------------------------------------------
#  queries [F,Q,C], patches [F,N,C] -> MatMul(queries, patches^T) * scale -> Softmax(N) -> MatMul(., patches)
#  -> ReduceMean over Q (keepdims) -> context [F,1,C]     (export/head.py: folded_context_attention)
def expand_plugin(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with each ContextAttention node written as standard ops; tensor names are kept."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = []
    for n in out.graph.node:
        if n.domain != PLUGIN["domain"] or n.op_type != PLUGIN["op_type"]:
            nodes.append(n)
            continue
        (q, p), y, s = n.input, n.output[0], f"{n.name}/expanded"
        scale = next(a.f for a in n.attribute if a.name == "scale")
        out.graph.initializer.append(numpy_helper.from_array(np.array(scale, np.float32), f"{s}/scale"))
        nodes += [helper.make_node("Transpose", [p], [f"{s}/pT"], perm=[0, 2, 1]),
                  helper.make_node("MatMul", [q, f"{s}/pT"], [f"{s}/scores"]),
                  helper.make_node("Mul", [f"{s}/scores", f"{s}/scale"], [f"{s}/scaled"]),
                  helper.make_node("Softmax", [f"{s}/scaled"], [f"{s}/attn"], axis=-1),
                  helper.make_node("MatMul", [f"{s}/attn", p], [f"{s}/mixed"]),
                  helper.make_node("ReduceMean", [f"{s}/mixed"], [y], axes=[1], keepdims=1)]        # opset 17
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    kept = [o for o in out.opset_import if o.domain != PLUGIN["domain"]]
    del out.opset_import[:]
    out.opset_import.extend(kept)
    return out
