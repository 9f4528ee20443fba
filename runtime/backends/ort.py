"""ONNX Runtime backend: one InferenceSession per stage, run through IO binding so that the caller's
numpy buffers (inputs and preallocated outputs, e.g. a KV cache bound as both past and present) are
used in place."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from . import check_io

_PROVIDERS = {"ort-cpu": ["CPUExecutionProvider"], "ort-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


class OrtStage:
    def __init__(self, session: ort.InferenceSession, path: Path):
        self.session, self.path = session, path
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]

    def run(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
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
        stage = OrtStage(ort.InferenceSession(str(path), so, providers=_PROVIDERS[self.name]), path)
        if io is not None:
            found = {kind: {t.name: _numpy_dtype(t.type) for t in tensors}
                     for kind, tensors in (("inputs", stage.session.get_inputs()), ("outputs", stage.session.get_outputs()))}
            check_io(path, io, found, "graph", "rebuild the directory with python -m export.build")
        return stage


def _numpy_dtype(ort_type: str) -> np.dtype:
    """ORT's type string ('tensor(float)', 'tensor(int64)', ...) -> numpy dtype."""
    name = ort_type.removeprefix("tensor(").removesuffix(")")
    return np.dtype({"float": "float32", "double": "float64"}.get(name, name))
