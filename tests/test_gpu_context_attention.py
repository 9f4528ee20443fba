"""The ContextAttention CUDA kernel on a real GPU, against the float64 reference.

Skipped, with the CUDA runtime's own reason, on machines without a device (here:
cudaErrorInsufficientDriver, no libcuda). On a GPU machine it builds
libcontext_attention_cuda_test.so for the device's SM version and runs both kernel paths
(scores kept in shared memory, and streamed) in fp32 and fp16 with the same error norm and
bounds as the host-twin test (tests/test_context_attention_kernel.py).
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from kernels import build
from kernels.cuda_available import compute_capability, cuda_available
from test_context_attention_kernel import (EDGE_SHAPES, FP16_TOL, FP32_TOL, RELEASED_SHAPES, frame_error,
                                           random_inputs, reference, sampled_shapes, shape_id)

AVAILABLE, REASON = cuda_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not AVAILABLE, reason=REASON)]

# the release runs context attention over chunks of 64 frames
SHAPES = EDGE_SHAPES + sampled_shapes(20, seed=4321) + RELEASED_SHAPES + [(64, 32, 576, 1408)]


@pytest.fixture(scope="session")
def run_on_gpu(tmp_path_factory):
    path = build.build_cuda_test(tmp_path_factory.mktemp("cuda_test"), archs=[compute_capability()])
    fn = ctypes.CDLL(str(path)).ca_cuda_context_attention
    ptr, i32 = ctypes.c_void_p, ctypes.c_int
    fn.argtypes = [i32, ptr, ptr, ptr, ctypes.c_int64, i32, i32, i32, ctypes.c_float, i32]
    fn.restype = i32

    def run(queries, patches, scale, streaming=False):
        queries, patches = np.ascontiguousarray(queries), np.ascontiguousarray(patches)
        frames, nq, channels = queries.shape
        out = np.empty((frames, 1, channels), queries.dtype)
        status = fn(int(queries.dtype == np.float16), queries.ctypes.data, patches.ctypes.data, out.ctypes.data,
                    frames, nq, patches.shape[1], channels, scale, int(streaming))
        assert status == 0, f"CUDA error {status} for queries {queries.shape}, patches {patches.shape}"
        return out

    return run


@pytest.mark.parametrize("streaming", [False, True], ids=["keep", "streaming"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_gpu_matches_reference(run_on_gpu, shape, dtype, streaming):
    f, nq, npatch, c = shape
    queries, patches = random_inputs(np.random.default_rng(21), f, nq, npatch, c, dtype)
    scale = 1.0 / np.sqrt(c)
    out = run_on_gpu(queries, patches, scale, streaming)
    tolerance = FP16_TOL if dtype == np.float16 else FP32_TOL
    assert frame_error(out, reference(queries, patches, scale), patches) <= tolerance


def test_gpu_long_rows_fall_back_to_streaming(run_on_gpu):
    """Q x N scores beyond any device's shared memory (32 x 4000 floats = 500 KiB)."""
    queries, patches = random_inputs(np.random.default_rng(22), 2, 32, 4000, 64)
    out = run_on_gpu(queries, patches, 0.125)
    assert frame_error(out, reference(queries, patches, 0.125), patches) <= FP32_TOL


@pytest.mark.parametrize("scale", [1e6, 1e20])
def test_gpu_extreme_scores_stay_finite(run_on_gpu, scale):
    queries, patches = random_inputs(np.random.default_rng(11), 3, 8, 200, 64)
    out = run_on_gpu(queries, patches, scale)
    assert np.isfinite(out).all()
    assert frame_error(out, reference(queries, patches, scale), patches) <= FP32_TOL
