"""The ContextAttention CUDA kernels on a real GPU, against the float64 reference.

Skipped, with the CUDA runtime's own reason, on machines without a device (here:
cudaErrorInsufficientDriver, no libcuda). On a GPU machine it builds
libcontext_attention_cuda_test.so for the device's SM version and runs, with the error norm and
bounds of the host-twin test (tests/test_context_attention_kernel.py):
  - the CUDA-core kernel, both paths (scores kept in shared memory, and streamed), fp32 / fp16 / bf16;
  - the tensor-core kernel, fp16 / bf16, on shapes it takes (Q <= 32, C <= 1408, C % 8 == 0), with
    the launcher's workspace (frames split over two blocks when 2F <= SMs) and without it;
  - which kernel Algorithm::kAuto picks, and what the launcher refuses: tensor cores forced where
    they do not apply, and bf16 from a build whose kernels are older than sm_80.
The output buffer is poisoned (NaN) before every run, so an element the kernel fails to write fails.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from kernels import build
from kernels.cuda_available import compute_capability, cuda_available
from test_context_attention_kernel import (CUDA_CORES, DTYPES, EDGE_SHAPES, FP32_TOL, RELEASED_SHAPES, TENSOR_CORES,
                                           bf16_bits, frame_error, random_inputs, reference, round_to_bf16,
                                           sampled_shapes, shape_id, tolerance)

AVAILABLE, REASON = cuda_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not AVAILABLE, reason=REASON)]

AUTO = 0
CUDA_ERROR_NOT_SUPPORTED = 801
CUDA_ERROR_NO_KERNEL_IMAGE = 209
# the release runs context attention over chunks of 64 frames
SHAPES = EDGE_SHAPES + sampled_shapes(20, seed=4321) + RELEASED_SHAPES + [(64, 32, 576, 1408)]
# shapes the tensor-core kernel takes: C a multiple of 8 up to 1408, Q up to 32; N is free
TENSOR_CORE_SHAPES = ([(1, 1, 1, 8), (1, 32, 1, 1408), (9, 1, 1, 8), (3, 32, 65, 40), (2, 31, 63, 32),
                       (2, 17, 600, 1400), (2, 32, 4000, 64)]
                      + [(f, q, n, min(1408, -(-c // 8) * 8)) for f, q, n, c in sampled_shapes(20, seed=8765)]
                      + RELEASED_SHAPES + [(64, 32, 576, 1408)])


class GpuRunner:
    """ctypes view of libcontext_attention_cuda_test.so."""

    def __init__(self, path):
        lib = ctypes.CDLL(str(path))
        ptr, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
        lib.ca_cuda_context_attention.argtypes = [i32, ptr, ptr, ptr, i64, i32, i32, i32, ctypes.c_float, i32, i32, i32]
        lib.ca_cuda_launch.argtypes = [i32, ptr, ptr, ptr, i64, i32, i32, i32, ctypes.c_float, i32, ptr, ptr]
        lib.ca_cuda_bf16_support.argtypes = [ctypes.POINTER(i32)] * 3
        self.lib = lib

    def status(self, queries, patches, scale, streaming=False, algorithm=AUTO, bf16=False, workspace=True):
        """(cudaError_t value, context [F,1,C]); bf16: float32 arrays of bfloat16 values; workspace:
        give the launcher its optional workspace."""
        queries, patches = np.ascontiguousarray(queries), np.ascontiguousarray(patches)
        frames, nq, channels = queries.shape
        dtype = "bf16" if bf16 else ("fp16" if queries.dtype == np.float16 else "fp32")
        if bf16:
            queries, patches = bf16_bits(queries), bf16_bits(patches)
        out = np.empty((frames, 1, channels), queries.dtype)
        status = self.lib.ca_cuda_context_attention(DTYPES[dtype], queries.ctypes.data, patches.ctypes.data,
                                                    out.ctypes.data, frames, nq, patches.shape[1], channels, scale,
                                                    int(streaming), algorithm, int(workspace))
        return status, ((out.astype(np.uint32) << 16).view(np.float32) if bf16 else out)

    def run(self, queries, patches, scale, **kwargs):
        status, out = self.status(queries, patches, scale, **kwargs)
        assert status == 0, f"CUDA error {status} for queries {queries.shape}, patches {patches.shape}, {kwargs}"
        return out

    def bf16_support(self):
        values = [ctypes.c_int(-1) for _ in range(3)]
        assert self.lib.ca_cuda_bf16_support(*[ctypes.byref(v) for v in values]) == 0
        return tuple(v.value for v in values)  # (supported, kernel arch, device arch)


@pytest.fixture(scope="session")
def gpu(tmp_path_factory):
    return GpuRunner(build.build_cuda_test(tmp_path_factory.mktemp("cuda_test"), archs=[compute_capability()]))


def inputs(shape, dtype, seed):
    f, nq, npatch, c = shape
    kind = {"fp32": np.float32, "fp16": np.float16, "bf16": "bf16"}[dtype]
    return random_inputs(np.random.default_rng(seed), f, nq, npatch, c, kind)


@pytest.mark.parametrize("streaming", [False, True], ids=["keep", "streaming"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_gpu_cuda_cores_match_reference(gpu, shape, dtype, streaming):
    queries, patches = inputs(shape, dtype, 21)
    scale = 1.0 / np.sqrt(shape[3])
    out = gpu.run(queries, patches, scale, streaming=streaming, algorithm=CUDA_CORES, bf16=dtype == "bf16")
    error = frame_error(out, reference(queries, patches, scale), patches)
    assert error <= tolerance(dtype, CUDA_CORES, shape[2]), f"{dtype} error {error:.2e}"


@pytest.mark.parametrize("workspace", [True, False], ids=["workspace", "no_workspace"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("shape", TENSOR_CORE_SHAPES, ids=shape_id)
def test_gpu_tensor_cores_match_reference(gpu, shape, dtype, workspace):
    """With the workspace, frames of more than 16 queries split over two blocks up to F = SMs / 2."""
    queries, patches = inputs(shape, dtype, 23)
    scale = 1.0 / np.sqrt(shape[3])
    out = gpu.run(queries, patches, scale, algorithm=TENSOR_CORES, bf16=dtype == "bf16", workspace=workspace)
    error = frame_error(out, reference(queries, patches, scale), patches)
    assert error <= tolerance(dtype, TENSOR_CORES, shape[2]), f"{dtype} error {error:.2e}"


def test_gpu_split_and_whole_frames_agree_and_large_counts_do_not_split(gpu):
    """The two-block split (64 frames) against one block per frame: the same values up to the
    fp32 order of the query sum: one fp16 rounding step at most; 200 frames (more than half the
    SMs of any GPU here) take one block per frame with or without the workspace: bit for bit."""
    queries, patches = inputs((64, 32, 256, 1408), "fp16", 31)
    split, whole = (gpu.run(queries, patches, 0.03, algorithm=TENSOR_CORES, workspace=w) for w in (True, False))
    assert frame_error(split, whole.astype(np.float64), patches) <= 2.0**-10  # one fp16 ulp at most
    queries, patches = inputs((200, 32, 64, 64), "fp16", 32)
    split, whole = (gpu.run(queries, patches, 0.1, algorithm=TENSOR_CORES, workspace=w) for w in (True, False))
    assert np.array_equal(split.view(np.uint16), whole.view(np.uint16))


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_gpu_tensor_cores_running_max_moves_between_tiles(gpu, dtype):
    """Patches sorted by query 0's rising score: its running max rises on every 16-patch tile."""
    queries, patches = inputs((2, 32, 576, 64), "fp32", 9)
    order = np.argsort((patches * queries[:, :1]).sum(-1), axis=1)
    patches = np.take_along_axis(patches, order[..., None], axis=1)
    cast = (lambda x: x.astype(np.float16)) if dtype == "fp16" else round_to_bf16
    queries, patches = cast(queries), cast(patches)
    out = gpu.run(queries, patches, 0.5, algorithm=TENSOR_CORES, bf16=dtype == "bf16")
    assert frame_error(out, reference(queries, patches, 0.5), patches) <= tolerance(dtype, TENSOR_CORES, 576)


def test_gpu_long_rows_fall_back_to_streaming(gpu):
    """Q x N scores beyond any device's shared memory (32 x 4000 floats = 500 KiB)."""
    queries, patches = random_inputs(np.random.default_rng(22), 2, 32, 4000, 64)
    out = gpu.run(queries, patches, 0.125)
    assert frame_error(out, reference(queries, patches, 0.125), patches) <= FP32_TOL


@pytest.mark.parametrize("dtype,algorithm", [("fp32", CUDA_CORES), ("fp16", CUDA_CORES), ("fp16", TENSOR_CORES),
                                             ("bf16", TENSOR_CORES)])
@pytest.mark.parametrize("scale", [1e6, 1e20])
def test_gpu_extreme_scores_stay_finite(gpu, scale, dtype, algorithm):
    queries, patches = inputs((3, 8, 200, 64), dtype, 11)
    out = gpu.run(queries, patches, scale, algorithm=algorithm, bf16=dtype == "bf16")
    assert np.isfinite(out.astype(np.float32)).all()
    assert frame_error(out, reference(queries, patches, scale), patches) <= tolerance(dtype, algorithm, 200)


def test_gpu_auto_picks_tensor_cores_where_they_apply(gpu):
    """fp16 / bf16 released shapes take the tensor cores (auto = forced, bit for bit); fp32 and a
    C that is not a multiple of 8 take the CUDA cores (auto = forced CUDA cores, bit for bit)."""
    for dtype, shape, algorithm in [("fp16", (3, 32, 576, 1408), TENSOR_CORES),
                                    ("bf16", (3, 32, 256, 1408), TENSOR_CORES),
                                    ("fp32", (3, 32, 256, 1408), CUDA_CORES),
                                    ("fp16", (3, 32, 256, 1404), CUDA_CORES),
                                    ("fp16", (3, 33, 256, 1408), CUDA_CORES)]:
        queries, patches = inputs(shape, dtype, 5)
        auto = gpu.run(queries, patches, 0.03, bf16=dtype == "bf16")
        forced = gpu.run(queries, patches, 0.03, algorithm=algorithm, bf16=dtype == "bf16")
        assert np.array_equal(auto.view(np.uint8), forced.view(np.uint8)), (dtype, shape)


@pytest.mark.parametrize("dtype,shape", [("fp32", (2, 32, 256, 64)), ("fp16", (2, 32, 256, 33)),
                                         ("fp16", (2, 40, 256, 64)), ("bf16", (2, 32, 256, 1416))])
def test_gpu_tensor_cores_refuse_shapes_they_do_not_take(gpu, dtype, shape):
    queries, patches = inputs(shape, dtype, 3)
    status, _ = gpu.status(queries, patches, 0.1, algorithm=TENSOR_CORES, bf16=dtype == "bf16")
    assert status == CUDA_ERROR_NOT_SUPPORTED


def test_gpu_zero_frames_is_a_no_op(gpu):
    for dtype in DTYPES.values():
        for algorithm in (AUTO, CUDA_CORES, TENSOR_CORES):
            assert gpu.lib.ca_cuda_launch(dtype, None, None, None, 0, 32, 576, 1408, 0.1, algorithm, None, None) == 0


def test_gpu_bf16_supported_by_this_build(gpu):
    supported, kernel_arch, device_arch = gpu.bf16_support()
    assert device_arch == compute_capability()
    assert (supported, kernel_arch) == ((1, device_arch) if device_arch >= 80 else (0, kernel_arch))


def test_gpu_bf16_refused_by_a_build_without_it(tmp_path):
    """A library built for sm_75 (PTX JIT-compiled on this device) has no bf16 kernels: bf16 gets
    cudaErrorNoKernelImageForDevice and nothing written; fp16 still runs, on the CUDA cores."""
    old = GpuRunner(build.build_cuda_test(tmp_path, archs=[75]))
    supported, kernel_arch, device_arch = old.bf16_support()
    assert (supported, kernel_arch, device_arch) == (0, 75, compute_capability())
    queries, patches = inputs((2, 32, 256, 1408), "bf16", 1)
    status, out = old.status(queries, patches, 0.03, bf16=True)
    assert status == CUDA_ERROR_NO_KERNEL_IMAGE
    queries, patches = queries.astype(np.float16), patches.astype(np.float16)
    status, _ = old.status(queries, patches, 0.03, algorithm=TENSOR_CORES)
    assert status == CUDA_ERROR_NOT_SUPPORTED
    out = old.run(queries, patches, 0.03)
    assert frame_error(out, reference(queries, patches, 0.03), patches) <= tolerance("fp16", CUDA_CORES, 256)
