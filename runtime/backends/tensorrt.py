"""TensorRT: engines run in the C core's TensorRT backend (runtime/csrc/backends/tensorrt.cpp, C++), a shared library
that `pip install -e .` builds where TensorRT's headers and libnvinfer are installed, and that the core loads by path:

    backend_missing()                                   # None, or why engines cannot run here
    _llamavid.Model(dir, stages, native=[native_backend(precision)])      # what Pipeline.open does

The backend checks each engine against the manifest (tensor names and dtypes, the TensorRT version and GPU SM it
was built with) when it opens it. The Python TensorRT bindings are needed only to build engines (export/trt.py):
require_tensorrt_and_gpu and built_with_here are for that; they import tensorrt on first use, and a missing one
raises TensorrtUnavailable saying what is missing and how to get it.
"""
from __future__ import annotations

import ctypes
import importlib.machinery
from pathlib import Path

LIBRARY = "libllamavid_tensorrt"       # runtime/libllamavid_tensorrt<extension suffix>, made by setup.py
INSTALL_TENSORRT = ("get TensorRT 10.x with its Python bindings: JetPack on Jetson (apt-get install "
                    "python3-libnvinfer), `pip install tensorrt` where NVIDIA's package index is reachable "
                    "(PyPI's tensorrt packages only download from there), or an NGC TensorRT container")


class TensorrtUnavailable(RuntimeError):
    """TensorRT or a CUDA device is missing; the message says which and how to get it."""


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


def backend_library() -> Path | None:
    """The built TensorRT backend (runtime/libllamavid_tensorrt*.so), None when it is not built."""
    folder = Path(__file__).resolve().parent.parent
    return next((p for s in importlib.machinery.EXTENSION_SUFFIXES if (p := folder / (LIBRARY + s)).is_file()), None)


def backend_missing() -> str | None:
    """Why the TensorRT backend cannot run here (not built, libnvinfer not loadable, no CUDA device), None if it can."""
    from kernels.cuda_available import cuda_available
    library = backend_library()
    if library is None:
        return (f"the TensorRT backend is not built (runtime/{LIBRARY}*.so): `pip install -e .` builds it where "
                f"TensorRT's headers and libnvinfer are installed (TENSORRT_ROOT, or JetPack's system folders)")
    try:
        ctypes.CDLL(str(library))
    except OSError as e:
        return f"{library.name} does not load: {e}"
    ok, reason = cuda_available()
    return None if ok else f"the TensorRT backend needs a CUDA device: {reason}"


def native_backend(precision: str | None = None, device: int = 0) -> tuple[str, dict]:
    """(library path, options) for _llamavid.Model(native=[...]) (runtime/csrc/backends/llamavid_tensorrt.h lists the
    options): the ContextAttention plugin library loaded where python -m kernels.build built it, only `precision`'s
    engines when given."""
    from kernels.build import DEFAULT_OUT, PLUGIN_LIBRARY
    plugin = DEFAULT_OUT / PLUGIN_LIBRARY
    options = {"device": str(device), "precision": precision or ""}
    if plugin.is_file():
        options["plugin_library"] = str(plugin)
    return str(backend_library()), options
