"""TensorRT backend: one deserialized engine per stage, behind the same interface as the ONNX Runtime
backend, all stages on one CUDA stream.

    backend = TensorrtBackend()                       # loads build/kernels/libllamavid_trt_plugins.so
    stage = backend.open_stage("head.fp16.engine", io=manifest["stages"]["head"])
    out = stage.run({name: array}, outputs={name: array})      # numpy in, numpy out

    run: host arrays --H2D--> device buffers (grown on demand, kept) --execute_async_v3--> --D2H--> arrays

Importable anywhere: tensorrt and cuda-python are imported on first use, and a missing one raises
TensorrtUnavailable saying what is missing and how to get it. Engines come from export/trt.py.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from . import check_io

INSTALL_TENSORRT = ("get TensorRT 10.x with its Python bindings: JetPack on Jetson (apt-get install "
                    "python3-libnvinfer), `pip install tensorrt` where NVIDIA's package index is reachable "
                    "(PyPI's tensorrt packages only download from there), or an NGC TensorRT container")


class TensorrtUnavailable(RuntimeError):
    """TensorRT, cuda-python or a CUDA device is missing; the message says which and how to get it."""


def import_tensorrt():
    try:
        import tensorrt
    except ModuleNotFoundError:
        raise TensorrtUnavailable(f"TensorRT: expected the Python package `tensorrt`, found none; "
                                  f"{INSTALL_TENSORRT}") from None
    except (ImportError, OSError) as e:           # bindings without libnvinfer, or a broken install
        raise TensorrtUnavailable(f"TensorRT: `import tensorrt` failed ({e}); {INSTALL_TENSORRT}") from None
    return tensorrt


def require_tensorrt_and_gpu(purpose: str):
    """The tensorrt module, or TensorrtUnavailable saying what is missing (TensorRT or a CUDA device) and
    how to get it; purpose: what needs them, for the message."""
    from kernels.cuda_available import cuda_available
    trt = import_tensorrt()
    ok, reason = cuda_available()
    if not ok:
        raise TensorrtUnavailable(f"{purpose} needs a CUDA device: {reason}")
    return trt


def built_with_here() -> dict:
    """What an engine built on this machine records as built_with: the TensorRT version and the GPU's SM."""
    from kernels.cuda_available import compute_capability
    return {"tensorrt": require_tensorrt_and_gpu("a TensorRT engine").__version__, "sm": compute_capability()}


def check_built_with(path: Path, built_with: dict):
    """Refuse an engine built by another TensorRT version or for another GPU architecture (TensorRT engines
    run only where they were built unless built version- or hardware-compatible, which export/trt.py does not)."""
    here = built_with_here()
    if {k: built_with.get(k) for k in here} != here:
        raise ValueError(f"{path.name} was built with TensorRT {built_with.get('tensorrt')} for sm_{built_with.get('sm')}, "
                         f"this machine has TensorRT {here['tensorrt']} and sm_{here['sm']}: rebuild the engines here "
                         f"(python -m export.trt --artifacts {path.parent}) or open the pipeline with backend='ort-cuda' "
                         f"or 'ort-cpu'")


def import_cudart():
    """cuda-python's runtime module (13.x: cuda.bindings.runtime, 12.x: cuda.cudart)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError:
            raise TensorrtUnavailable("CUDA buffers: expected cuda-python, found none; pip install cuda-python") from None
    return runtime


class _Cuda:
    """The few CUDA runtime calls the backend makes, each checked."""

    def __init__(self):
        self.rt = import_cudart()
        self.stream = self.call("cudaStreamCreate")

    def call(self, name, *args):
        err, *out = getattr(self.rt, name)(*args)
        if err != self.rt.cudaError_t.cudaSuccess:
            desc = self.rt.cudaGetErrorString(err)[1].decode()
            raise TensorrtUnavailable(f"{name} failed: {err.name} ({int(err)}): {desc}")
        return out[0] if len(out) == 1 else None

    def copy(self, dst: int, src: int, nbytes: int, kind: str):
        self.call("cudaMemcpyAsync", dst, src, nbytes, getattr(self.rt.cudaMemcpyKind, kind), self.stream)


class TensorrtStage:
    def __init__(self, backend: "TensorrtBackend", engine, path: Path, io: dict | None):
        trt = backend.trt
        self.backend, self.engine, self.path = backend, engine, path
        self.context = engine.create_execution_context()
        self.lock = threading.Lock()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        self.dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        self._buffers: dict[str, tuple[int, int]] = {}          # name -> (device pointer, bytes)
        if io is not None:
            found = {kind: {n: self.dtypes[n] for n in names}
                     for kind, names in (("inputs", self.input_names), ("outputs", self.output_names))}
            check_io(path, io, found, "engine", "rebuild it with python -m export.trt")

    def _device(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            cuda = self.backend.cuda
            if ptr:
                cuda.call("cudaFree", ptr)
            ptr, size = int(cuda.call("cudaMalloc", max(nbytes, 1))), max(nbytes, 1)
            self._buffers[name] = (ptr, size)
        return ptr

    def run(self, inputs: dict, outputs: dict, ctx=None):
        """The core's protocol (runtime/csrc/pymodule.c): named memoryviews, outputs written in place. One
        execution context serves every session, one call at a time."""
        with self.lock:
            self.infer({n: np.asarray(v) for n, v in inputs.items()}, {n: np.asarray(v) for n, v in outputs.items()})

    def infer(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """inputs: every engine input by name; outputs: optional preallocated buffers, written in place."""
        cuda, outputs = self.backend.cuda, dict(outputs or {})
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise ValueError(f"{self.path.name}: expected inputs {self.input_names}, missing {missing}")
        keep = {n: np.ascontiguousarray(inputs[n], dtype=self.dtypes[n]) for n in self.input_names}
        for name, a in keep.items():
            if not self.context.set_input_shape(name, a.shape):
                raise ValueError(f"{self.path.name}: input {name} {list(a.shape)} is outside the engine's optimisation "
                                 f"profile {[list(s) for s in self.engine.get_tensor_profile_shape(name, 0)]} (min, opt, max)")
            ptr = self._device(name, a.nbytes)
            cuda.copy(ptr, a.ctypes.data, a.nbytes, "cudaMemcpyHostToDevice")
            self.context.set_tensor_address(name, ptr)
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            if name not in outputs:
                outputs[name] = np.empty(shape, self.dtypes[name])
            elif outputs[name].shape != shape or not outputs[name].flags.c_contiguous:
                raise ValueError(f"{self.path.name}: output buffer {name} must be C-contiguous {list(shape)}, "
                                 f"found {list(outputs[name].shape)}")
            self.context.set_tensor_address(name, self._device(name, outputs[name].nbytes))
        if not self.context.execute_async_v3(int(cuda.stream)):
            raise RuntimeError(f"{self.path.name}: TensorRT execution failed (its log above says why)")
        for name in self.output_names:
            a = outputs[name]
            cuda.copy(a.ctypes.data, self._buffers[name][0], a.nbytes, "cudaMemcpyDeviceToHost")
        cuda.call("cudaStreamSynchronize", cuda.stream)       # the host arrays in `keep` live until here
        return outputs

    def close(self):
        for ptr, _ in self._buffers.values():
            self.backend.cuda.call("cudaFree", ptr)
        self._buffers.clear()


class TensorrtBackend:
    name = "tensorrt"

    def __init__(self, plugin_library: str | Path | None = None):
        """plugin_library: the ContextAttention plugin (default build/kernels/libllamavid_trt_plugins.so);
        loaded when present, needed by engines holding the plugin."""
        from kernels.build import DEFAULT_OUT, PLUGIN_LIBRARY
        self.trt = require_tensorrt_and_gpu("the tensorrt backend")
        self.cuda = _Cuda()                                   # one stream for every stage
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.runtime = self.trt.Runtime(self.logger)
        self.plugin_library = Path(plugin_library or DEFAULT_OUT / PLUGIN_LIBRARY)
        if self.plugin_library.is_file():
            self.runtime.get_plugin_registry().load_library(str(self.plugin_library))

    def open_stage(self, path: Path, io: dict | None = None) -> TensorrtStage:
        """path: a serialized engine; io: the manifest's stage entry ({"inputs", "outputs"}) to check it against."""
        path = Path(path)
        if path.suffix == ".onnx":
            raise ValueError(f"{path.name}: the tensorrt backend runs serialized engines, this is an ONNX graph "
                             f"(an engine's source): build the engines with python -m export.trt --artifacts {path.parent}")
        engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            plugin = ("loaded" if self.plugin_library.is_file()
                      else "not found (python -m kernels.build builds it)")
            raise RuntimeError(f"{path.name}: TensorRT could not deserialize the engine (built by another TensorRT "
                               f"version or for another GPU?); plugin library {self.plugin_library} {plugin}")
        return TensorrtStage(self, engine, path, io)
