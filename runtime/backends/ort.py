"""ONNX Runtime backends: one InferenceSession per stage, run through IO binding on the C core's buffers
(inputs and outputs, e.g. a KV cache bound as both past and present), in place: no copies.

    ort-cpu       ORT's CPU provider (MLAS kernels), fp32 and int8 graphs
    ort-cuda      ORT's CUDA provider
    ort-openvino  ORT with the OpenVINO execution provider plugin (pip onnxruntime-ep-openvino) on a CPU
                  with native bf16 (AMX or AVX512-BF16): runs the fp32 graphs at bf16 inference precision
                  (OpenVINO converts them when the session is created)
"""
from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import onnxruntime as ort

from runtime.manifest import OPENVINO_PRECISION

from . import check_io

_PROVIDERS = {"ort-cpu": ["CPUExecutionProvider"], "ort-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


@cache
def _openvino_cpu() -> tuple:
    """(the OpenVINO plugin's CPU device, an ort.OrtEpDevice, or None; what was found instead). Registers
    the plugin library with ORT once per process."""
    try:
        import onnxruntime_ep_openvino as ov
    except ImportError:
        return None, "no onnxruntime_ep_openvino package (pip install onnxruntime-ep-openvino)"
    try:
        ort.register_execution_provider_library("openvino", ov.get_library_path())
    except Exception as e:                                  # an ORT without plugin EPs, or a broken library
        return None, f"the plugin library did not register with onnxruntime {ort.__version__}: {e}"
    for d in ort.get_ep_devices():
        meta = d.ep_metadata
        if d.ep_name == ov.get_ep_name() and meta.get("ov_device") == "CPU":
            caps = meta.get("OPTIMIZATION_CAPABILITIES", "")
            return (d, "") if "BF16" in caps.split() else (None, f"a CPU whose capabilities are {caps!r}")
    return None, "no OpenVINO CPU device"


def openvino_bf16_cpu():
    """The OpenVINO CPU device when the plugin is installed and the CPU computes bf16 natively, else None."""
    return _openvino_cpu()[0]


def openvino_missing() -> str:
    """Why ort-openvino is not usable here ("" when it is)."""
    return _openvino_cpu()[1]


class OrtStage:
    """An ONNX Runtime session for one stage. run() is the core's protocol (runtime/csrc/pymodule.c): named
    memoryviews over the core's buffers, bound in place, one IO binding per core session (its context) that
    keeps what was bound: the core hands over only the tensors whose buffer or shape changed (incremental),
    e.g. the attention mask of a decode step. infer() takes and returns numpy arrays."""
    incremental = True

    def __init__(self, session: ort.InferenceSession, path: Path):
        self.session, self.path = session, path
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]

    def new_context(self):
        return self.session.io_binding()

    def run(self, inputs: dict[str, memoryview], outputs: dict[str, memoryview], binding):
        for name, view in inputs.items():
            a = np.asarray(view)
            binding.bind_input(name, "cpu", 0, a.dtype, a.shape, a.ctypes.data)
        for name, view in outputs.items():
            a = np.asarray(view)
            binding.bind_output(name, "cpu", 0, a.dtype, a.shape, a.ctypes.data)
        self.session.run_with_iobinding(binding)

    def infer(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """inputs: every graph input by name; outputs: optional preallocated buffers, written in place.
        Returns every output (the preallocated ones are the same arrays)."""
        outputs = outputs or {}
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise ValueError(f"{self.path.name}: expected inputs {self.input_names}, missing {missing}")
        io = self.session.io_binding()
        keep = [np.ascontiguousarray(inputs[n]) for n in self.input_names]    # alive until the run ends
        for name, a in zip(self.input_names, keep):
            io.bind_input(name, "cpu", 0, a.dtype, list(a.shape), a.ctypes.data)
        for name in self.output_names:
            if name in outputs:
                a = outputs[name]
                if not a.flags.c_contiguous:
                    raise ValueError(f"{self.path.name}: output buffer {name} must be C-contiguous")
                io.bind_output(name, "cpu", 0, a.dtype, list(a.shape), a.ctypes.data)
            else:
                io.bind_output(name, "cpu")
        self.session.run_with_iobinding(io)
        result = dict(outputs)
        for name, value in zip(self.output_names, io.get_outputs()):
            if name not in outputs:
                result[name] = value.numpy()
        return result


class OrtBackend:
    def __init__(self, name: str = "ort-cpu", threads: int | None = None, spin: bool = True):
        if name == "ort-openvino" and openvino_bf16_cpu() is None:
            raise RuntimeError("ort-openvino: expected the onnxruntime-ep-openvino plugin and a CPU with native bf16 "
                               f"(AMX or AVX512-BF16), found {openvino_missing()}")
        self.name, self.threads, self.spin = name, threads, spin

    def open_stage(self, path: Path, io: dict | None = None) -> OrtStage:
        """path: an ONNX graph; io: the manifest's stage entry ({"inputs", "outputs"}) to check it against."""
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            so.intra_op_num_threads = self.threads
        if not self.spin:      # idle worker threads sleep instead of spinning (fair to a neighbour in-process)
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        path = Path(path)
        if self.name == "ort-openvino":
            config = {"INFERENCE_PRECISION_HINT": OPENVINO_PRECISION}
            if self.threads:
                config["INFERENCE_NUM_THREADS"] = str(self.threads)
            so.add_provider_for_devices([openvino_bf16_cpu()], {"load_config": json.dumps({"CPU": config})})
            session = ort.InferenceSession(str(path), sess_options=so)
        else:
            session = ort.InferenceSession(str(path), so, providers=_PROVIDERS[self.name])
        stage = OrtStage(session, path)
        if io is not None:
            found = {kind: {t.name: _numpy_dtype(t.type) for t in tensors}
                     for kind, tensors in (("inputs", stage.session.get_inputs()), ("outputs", stage.session.get_outputs()))}
            check_io(path, io, found, "graph", "rebuild the directory with python -m export.build")
        return stage


def _numpy_dtype(ort_type: str) -> np.dtype:
    """ORT's type string ('tensor(float)', 'tensor(int64)', ...) -> numpy dtype."""
    name = ort_type.removeprefix("tensor(").removesuffix(")")
    return np.dtype({"float": "float32", "double": "float64"}.get(name, name))
