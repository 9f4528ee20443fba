"""Backends run one stage on named numpy buffers. ONNX Runtime's are Python objects (ort.py):

    stage = backend.open_stage(path, io=manifest["stages"][name])   # an ONNX file, its tensor names and
                                                                    # dtypes checked against io
    out = stage.infer({name: array}, outputs={name: array})          # numpy; preallocated outputs written in place
    stage.run(inputs, outputs, stage.new_context())                  # the C core's protocol: named memoryviews

TensorRT's is C++ inside the core (tensorrt.py says where it is and whether it runs here). The manifest lists
each stage's variants in order of preference; the pipeline takes the first that a backend of this machine
runs (fastest backend first). The tensorrt backend runs engines only: a tensorrt variant that is an ONNX
graph (head_trt.onnx) is an engine's source, not something to run.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.manifest import BACKENDS


def tensorrt_usable() -> bool:
    """The core's TensorRT backend is built, loads (libnvinfer) and has a CUDA device."""
    from .tensorrt import backend_missing
    return backend_missing() is None


def available_backends() -> list[str]:
    """Backend names usable here, fastest first."""
    import onnxruntime as ort
    from .ort import openvino_bf16_cpu
    names = ["tensorrt"] if tensorrt_usable() else []
    if "CUDAExecutionProvider" in ort.get_available_providers():
        names.append("ort-cuda")
    if openvino_bf16_cpu() is not None:
        names.append("ort-openvino")
    names.append("ort-cpu")
    return names


def runs(backend: str, variant: dict) -> bool:
    """Whether `backend` runs this variant: its backend, and for tensorrt a serialized engine."""
    return variant["backend"] == backend and (backend != "tensorrt" or variant["file"].endswith(".engine"))


def choose_variant(variants: list[dict], available: list[str], precision: str | None = None,
                   role: str | None = None) -> dict | None:
    """The first variant (manifest order) that an available backend runs, trying backends fastest first.
    role: None for the variants that run the stage, "prefill" for the LLM's optional first-call graphs.
    With `precision`, only variants of that precision, and ort-cpu also runs ort-cuda's ONNX variants
    (their numerics on the CPU provider: fp16 accuracy measured without a GPU)."""
    variants = [v for v in variants if v.get("role") == role]
    if precision is None:
        return next((v for backend in available for v in variants if runs(backend, v)), None)
    pick = [v for v in variants if v["precision"] == precision]
    return next((v for backend in available for v in pick
                 if runs(backend, v) or (backend == "ort-cpu" and v["backend"] == "ort-cuda")), None)


def open_backend(name: str, threads: int | None = None, spin: bool = True):
    """A Python backend (ONNX Runtime's); TensorRT's runs in the core (tensorrt.native_backend)."""
    if name in ("ort-cpu", "ort-cuda", "ort-openvino"):
        from .ort import OrtBackend
        return OrtBackend(name, threads, spin)
    raise ValueError(f"backend: expected one of {list(BACKENDS)}, found {name!r}")


def check_io(path: Path, io: dict, found: dict, what: str, fix: str):
    """Raise ValueError unless a graph's or engine's tensors (found: {"inputs"|"outputs": {name: numpy dtype}})
    are the manifest's (io: the stage entry, {"inputs"|"outputs": {name: {"shape", "dtype"}}}): same names,
    same dtypes. The message names each differing tensor, what the manifest expects and what was found."""
    problems = []
    for kind in ("inputs", "outputs"):
        want, have = io[kind], found[kind]
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        if missing:
            problems.append(f"{kind} {missing} in the manifest, not in the {what}")
        if extra:
            problems.append(f"{kind} {extra} in the {what}, not in the manifest")
        problems += [f"{n}: manifest dtype {t['dtype']}, {what} {have[n]}" for n, t in want.items()
                     if n in have and np.dtype(t["dtype"]) != have[n]]
    if problems:
        raise ValueError(f"{Path(path).name}: the {what} does not match the manifest: {'; '.join(problems)}; {fix}")
