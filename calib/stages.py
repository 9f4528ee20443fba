"""The int8 build of each stage (python -m export.build --precision int8 calls these):

    vision   vision.onnx --ranges on the calibration clips--> vision.int8.onnx (Q/DQ: ort-cpu, and TensorRT's
             explicit int8), calib/vision.trt.cache (TensorRT's implicit int8 from vision.onnx),
             calib/vision.ranges.json
    head     head.onnx + head_trt.onnx (its ContextAttention node expanded to standard ops for the run)
             --ranges, one pass over the clips' fp32 vision features and questions-->
             head.int8.onnx (ort-cpu; TensorRT's head with standard ops), head_trt.int8.onnx (Q/DQ around the
             plugin node: TensorRT's head with the plugin), calib/head.trt.cache and calib/head_trt.trt.cache
             (implicit int8 from head.onnx / head_trt.onnx), calib/head.ranges.json
    llm      llm/decoder.onnx --weight-only MatMulNBits--> llm/decoder.int4.onnx (or int8)

Each returns its stage's manifest variants; ort-cuda keeps the fp32 graphs (ORT's CUDA provider gains nothing
from these Q/DQ graphs). Every int8 variant records the calibration (method, data hash, ranges file).
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from export import trt
from runtime.manifest import FRAME_CHUNK, sha256

from . import data, llm, qdq, ranges

DEFAULT_METHOD = "minmax"
VISION_NOTE = ("static int8 Q/DQ: per-channel int8 weights, per-tensor int8 activations from calibration; "
               "LayerNorm, softmax and attention products fp32")


@dataclass
class Calibration:
    """What the int8 build calibrates with: clips, method, the data's hash, the LLM's weight bits."""
    clips: list
    method: str
    sha256: str
    source: str
    llm_bits: int = 4

    @classmethod
    def of(cls, data_path=None, method: str = DEFAULT_METHOD, llm_bits: int = 4) -> "Calibration":
        if method not in ranges.METHODS:
            raise data.CalibrationError(f"--calib-method: expected one of {list(ranges.METHODS)}, found {method!r}")
        clips = data.clips(data_path)
        source = str(Path(data_path).resolve()) if data_path is not None else "default (llamavid_ref/default_model/calib)"
        return cls(clips, method, data.data_sha256(clips), source, llm_bits)

    @property
    def method_name(self) -> str:
        return f"percentile {ranges.PERCENTILE}" if self.method == "percentile" else self.method

    def record(self) -> dict:
        """The manifest's build.calibration section."""
        return {"method": self.method_name, "data": {"source": self.source, "clips": len(self.clips),
                                                     "sha256": self.sha256}, "llm_weights": f"int{self.llm_bits}"}


def _write(d: Path, stem: str, graphs: dict, results: dict, cal: Calibration) -> dict:
    """Per graph {key: (fp32 source file, int8 file)}: the Q/DQ graph and the TensorRT cache calib/<key>.trt.cache;
    the stage's ranges file -> the calibration record of its variants."""
    (d / "calib").mkdir(exist_ok=True)
    for key, (src, dst) in graphs.items():
        r = results[key]
        qdq.insert_qdq(d / src, d / dst, r)
        trt.write_calibration_cache(d / f"calib/{key}.trt.cache", {n: r.scale(n) for n in sorted(r.amax)})
    ranges.save(d / f"calib/{stem}.ranges.json", results)
    return {"method": cal.method_name, "data_sha256": cal.sha256, "ranges": f"calib/{stem}.ranges.json"}


def _trt_cache(d: Path, source: str) -> dict:
    """A variant's record of the implicit-int8 alternative: the cache for the fp32 `source` graph."""
    return {"file": f"calib/{source.removesuffix('.onnx')}.trt.cache", "source": source,
            "source_sha256": sha256(d / source)}


def quantize_vision(model, d: Path, cal: Calibration) -> list[dict]:
    src = d / "vision.onnx"
    g = onnx.load(str(src), load_external_data=False)
    names = sorted(set(qdq.quantized_inputs(g)) | set(ranges.float_activations(g)))
    batches = data.vision_batches(cal.clips, data.Preprocess.of(model.config), FRAME_CHUNK)
    results = ranges.collect({"vision": (src, names)}, batches, cal.method)
    rec = _write(d, "vision", {"vision": ("vision.onnx", "vision.int8.onnx")}, results, cal)
    int8 = {"file": "vision.int8.onnx", "precision": "int8", "quantization": "explicit", "calibration": rec,
            "trt_cache": _trt_cache(d, "vision.onnx"), "extra_files": []}
    return [{**int8, "backend": "ort-cpu", "note": VISION_NOTE},
            {"file": "vision.onnx", "precision": "fp32", "backend": "ort-cuda", "extra_files": []},
            {**int8, "backend": "tensorrt",
             "note": "engine source: explicit int8 (Q/DQ); export.trt --int8 implicit builds from trt_cache"}]


def quantize_head(model, d: Path, cal: Calibration) -> tuple[list[dict], dict]:
    """-> (the head.onnx variants, the fields of the TensorRT source variant: head_trt.int8.onnx)."""
    head, head_trt = onnx.load(str(d / "head.onnx")), onnx.load(str(d / "head_trt.onnx"))
    present = {t for n in head_trt.graph.node for t in [*n.input, *n.output]}
    expanded = qdq.expand_plugin(head_trt)
    trt_names = sorted((set(qdq.quantized_inputs(expanded)) | set(ranges.float_activations(expanded))) & present)

    @torch.no_grad()
    def vision(px: np.ndarray) -> np.ndarray:
        return model.vision(torch.from_numpy(px)).numpy()

    batches = data.head_batches(cal.clips, data.Preprocess.of(model.config), FRAME_CHUNK, vision,
                                model.qformer_tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "head_trt.expanded.onnx"
        onnx.save(expanded, str(path))
        names = sorted(set(qdq.quantized_inputs(head)) | set(ranges.float_activations(head)))
        results = ranges.collect({"head": (d / "head.onnx", names), "head_trt": (path, trt_names)}, batches,
                                 cal.method)
    results["head_trt"].graph, results["head_trt"].graph_sha256 = "head_trt.onnx", sha256(d / "head_trt.onnx")
    rec = _write(d, "head", {"head": ("head.onnx", "head.int8.onnx"), "head_trt": ("head_trt.onnx", "head_trt.int8.onnx")},
                 results, cal)
    ort = [{"file": "head.int8.onnx", "precision": "int8", "backend": "ort-cpu", "quantization": "explicit",
            "calibration": rec, "trt_cache": _trt_cache(d, "head.onnx"), "extra_files": [],
            "note": VISION_NOTE + ", context attention fp32"},
           {"file": "head.onnx", "precision": "fp32", "backend": "ort-cuda", "extra_files": []}]
    return ort, {"file": "head_trt.int8.onnx", "quantization": "explicit", "calibration": rec,
                 "trt_cache": _trt_cache(d, "head_trt.onnx")}


def quantize_llm(d: Path, src: str, cal: Calibration, extra=()) -> list[dict]:
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    dst = src.replace(".onnx", f".int{cal.llm_bits}.onnx")
    llm.weight_only(d / src, d / dst, cal.llm_bits)
    return [{"file": dst, "precision": f"int{cal.llm_bits}", "backend": "ort-cpu", "extra_files": list(extra),
             "quantization": "weight-only", "note": llm.describe(cal.llm_bits)},
            {"file": src, "precision": "fp32", "backend": "ort-cuda", "extra_files": list(extra)}]
