"""What every stage exporter shares: the opset, saving (external data for large graphs), fp16 and
int8 conversion, and torch.onnx.export with the project's settings."""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import onnx
import torch

OPSET = 17
IR_VERSION = 10                   # onnxruntime 1.31 reads IR <= 13; onnx 1.23 writes 14 by default
EXTERNAL_DATA_BYTES = 1 << 30     # graphs with more weight bytes than this keep them in <name>.onnx.data


def save_model(model: onnx.ModelProto, path: Path) -> Path:
    """Write `model` to `path`; weights go to `path`.data when the graph is large (protobuf's 2 GB limit)."""
    path = Path(path)
    model.ir_version = min(model.ir_version, IR_VERSION)
    data = path.with_name(path.name + ".data")
    for p in (path, data):
        if p.exists():
            p.unlink()
    big = sum(len(t.raw_data) for t in model.graph.initializer) > EXTERNAL_DATA_BYTES
    onnx.save_model(model, str(path), save_as_external_data=big, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    return path


def torch_export(module: torch.nn.Module, args: tuple, path: Path, input_names, output_names,
                 dynamic_axes: dict) -> Path:
    """TorchScript-based torch.onnx.export (dynamo=False: a plain, stable graph), re-saved by save_model."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:     # large exports scatter weight files
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)   # shape checks traced as constants
            torch.onnx.export(module, args, f"{tmp}/graph.onnx", input_names=list(input_names),
                              output_names=list(output_names), dynamic_axes=dynamic_axes, opset_version=OPSET,
                              dynamo=False, do_constant_folding=True)
        model = onnx.load(f"{tmp}/graph.onnx")
    return save_model(model, path)


def to_fp16(src: Path, dst: Path) -> Path:
    """fp16 weights and activations, fp32 inputs/outputs (Casts at the edges), for the CUDA EP /
    TensorRT. (Simplified)LayerNormalization keeps its statistics in fp32 (stash_type 1) and ORT's
    GPU softmax accumulates in fp32, so no op is kept out of fp16."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    half = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True, disable_shape_infer=True)
    return save_model(half, dst)


def to_int8(src: Path, dst: Path) -> Path:
    """ORT dynamic quantisation: int8 per-channel weights, activations quantised at run time (u8)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    dst = Path(dst)
    tmp = dst.with_name(dst.stem + ".q.tmp.onnx")
    quantize_dynamic(str(src), str(tmp), per_channel=True, weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul", "Gemm"], use_external_data_format=False,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})   # contrib-op outputs
    model = onnx.load(str(tmp))
    os.unlink(tmp)
    return save_model(model, dst)
