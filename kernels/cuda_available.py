"""Is there a CUDA device to run on? Asks the CUDA runtime (libcudart) through ctypes.

    from kernels.cuda_available import cuda_available
    ok, reason = cuda_available()      # (False, "cudaErrorInsufficientDriver (35): ...") here

No torch or cuda-python needed. Without a driver (no libcuda, as on the development and CI
machines) the runtime answers cudaErrorInsufficientDriver (35), not cudaErrorNoDevice (100).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from pathlib import Path

CUDA_ERROR_INSUFFICIENT_DRIVER = 35
CUDA_ERROR_NO_DEVICE = 100
CUDA_DEV_ATTR_COMPUTE_CAPABILITY_MAJOR = 75
CUDA_DEV_ATTR_COMPUTE_CAPABILITY_MINOR = 76


def libcudart_candidates() -> list[str]:
    """Where libcudart is looked for, in order: the loader's search path, then CUDA toolkits."""
    names = []
    found = ctypes.util.find_library("cudart")
    if found:
        names.append(found)
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root:
            names += sorted(str(p) for p in Path(root, "lib64").glob("libcudart.so*"))
    return names


def load_libcudart() -> ctypes.CDLL | None:
    for name in libcudart_candidates():
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


@functools.lru_cache(maxsize=1)
def cuda_available() -> tuple[bool, str]:
    """(True, "N CUDA device(s)") or (False, why not)."""
    cudart = load_libcudart()
    if cudart is None:
        return False, "libcudart not found (looked in the loader path, $CUDA_HOME, $CUDA_PATH, /usr/local/cuda)"
    count = ctypes.c_int(0)
    status = cudart.cudaGetDeviceCount(ctypes.byref(count))
    if status == CUDA_ERROR_INSUFFICIENT_DRIVER:
        return False, "cudaErrorInsufficientDriver (35): no NVIDIA driver (libcuda) on this machine"
    if status == CUDA_ERROR_NO_DEVICE:
        return False, "cudaErrorNoDevice (100): the driver sees no CUDA device"
    if status != 0:
        cudart.cudaGetErrorName.restype = ctypes.c_char_p
        name = cudart.cudaGetErrorName(status).decode()
        return False, f"cudaGetDeviceCount failed: {name} ({status})"
    if count.value < 1:
        return False, "cudaGetDeviceCount reports 0 devices"
    return True, f"{count.value} CUDA device(s)"


def compute_capability(device: int = 0) -> int:
    """SM version of a device, e.g. 87 for Jetson Orin; call only when cuda_available()."""
    cudart = load_libcudart()
    values = []
    for attribute in (CUDA_DEV_ATTR_COMPUTE_CAPABILITY_MAJOR, CUDA_DEV_ATTR_COMPUTE_CAPABILITY_MINOR):
        value = ctypes.c_int(0)
        status = cudart.cudaDeviceGetAttribute(ctypes.byref(value), attribute, device)
        if status != 0:
            raise RuntimeError(f"cudaDeviceGetAttribute({attribute}) failed with {status}")
        values.append(value.value)
    return 10 * values[0] + values[1]


if __name__ == "__main__":
    print(cuda_available())
