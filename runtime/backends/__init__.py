"""Backends run one stage on named numpy buffers:

    stage = backend.open_stage(path)                       # one ONNX file (or engine)
    out = stage.run({name: array}, outputs={name: array})  # preallocated outputs are written in place

The manifest lists each stage's variants in order of preference; the pipeline takes the first whose
backend this machine has.
"""
from __future__ import annotations


def available_backends() -> list[str]:
    """Backend names usable here, fastest first."""
    import onnxruntime as ort
    names = []
    if "CUDAExecutionProvider" in ort.get_available_providers():
        names.append("ort-cuda")
    names.append("ort-cpu")
    return names


def choose_variant(variants: list[dict], available: list[str]) -> dict | None:
    """The first variant (manifest order) whose backend is available, trying backends fastest first."""
    for backend in available:
        for v in variants:
            if v["backend"] == backend:
                return v
    return None


def open_backend(name: str, threads: int | None = None, spin: bool = True):
    if name in ("ort-cpu", "ort-cuda"):
        from .ort import OrtBackend
        return OrtBackend(name, threads, spin)
    raise ValueError(f"backend: expected one of ort-cpu, ort-cuda, found {name!r} (tensorrt comes with export/trt.py)")
