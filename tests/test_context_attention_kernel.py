"""The ContextAttention kernels' arithmetic, run on the CPU through their host twin.

kernels/context_attention/contextAttentionHost.cpp loops over frames calling the same
__host__ __device__ functions as the CUDA kernels, one loop per algorithm (CUDA cores: row
stats then weights; tensor cores: 16-patch tiles with an online softmax, numerators rounded to
the input type); it is built with g++ and compared here with a straightforward float64 numpy
implementation of the op.

Error norm: per frame, max_c |out - ref| / max_{n,c} |patches|, the worst frame reported. The
context is a convex combination of patch rows, so rounding errors scale with the features being
averaged, not with the (possibly cancelling) average itself.
  fp32: <= 1e-5.
  fp16: inputs rounded to half, reference computed on those rounded inputs; the output is rounded
        to half once, which costs at most 2^-11 * |out| <= 2^-11 * max|patches| (|out| <= max|p|),
        so the bound is 2^-11 + 1e-5 (~5e-4). Moreover the fp16 path must equal the fp32 path on
        the same rounded inputs, rounded to half, bit for bit (same fp32 arithmetic, one rounding).
  bf16: the same with bfloat16's unit roundoff 2^-8: 2^-8 + 1e-5 (~3.9e-3), bit for bit likewise.
  tensor-core algorithm, 16-bit inputs (unit roundoff u): each softmax numerator is rounded to the
        input type too (relative error <= u); the weights, renormalised by the sum of the rounded
        numerators, then move by at most 2u of themselves and the context by at most
        2u * max|patches|; with the output rounding, 3u + 1e-5. fp16 numerators below 2^-14 are
        subnormal (absolute error <= 2^-25 each, N of them): + N * 2^-25.
        Observed on the shapes here: the same as the CUDA-core path (fp16 1.5e-4, bf16 1.4e-3),
        the output rounding dominates.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from kernels import build

FP32_TOL = 1e-5
FP16_TOL = 2.0**-11 + FP32_TOL
BF16_TOL = 2.0**-8 + FP32_TOL
CUDA_CORES, TENSOR_CORES = 1, 2  # the launcher's Algorithm values
DTYPES = {"fp32": 0, "fp16": 1, "bf16": 2}
RELEASED_SHAPES = [(2, 32, 256, 1408), (2, 32, 576, 1408)]  # (F, Q, N, C) at 224 / 336 px


def reference(queries: np.ndarray, patches: np.ndarray, scale: float) -> np.ndarray:
    """The op in float64: queries [F,Q,C], patches [F,N,C] -> context [F,1,C]."""
    q = queries.astype(np.float64)
    p = patches.astype(np.float64)
    s = scale * np.einsum("fqc,fnc->fqn", q, p)
    s -= s.max(axis=-1, keepdims=True)
    a = np.exp(s)
    a /= a.sum(axis=-1, keepdims=True)
    w = a.mean(axis=1)  # [F, N]
    return np.einsum("fn,fnc->fc", w, p)[:, None, :]


def frame_error(out: np.ndarray, ref: np.ndarray, patches: np.ndarray) -> float:
    """Worst frame of max_c |out - ref| / max_{n,c} |patches| (see the module doc)."""
    err = np.abs(out.astype(np.float64) - ref).max(axis=(1, 2))
    size = np.abs(patches.astype(np.float64)).max(axis=(1, 2))
    return float((err / np.maximum(size, np.finfo(np.float64).tiny)).max())


def tolerance(dtype: str, algorithm: int, npatch: int) -> float:
    """The bound of the module doc for an input type ("fp32", "fp16", "bf16") and algorithm."""
    if dtype == "fp32":
        return FP32_TOL
    if algorithm == CUDA_CORES:
        return FP16_TOL if dtype == "fp16" else BF16_TOL
    unit = 2.0**-11 if dtype == "fp16" else 2.0**-8
    return 3 * unit + FP32_TOL + (npatch * 2.0**-25 if dtype == "fp16" else 0.0)


def round_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 (torch's conversion: round to nearest even), as float32."""
    import torch
    return torch.from_numpy(np.ascontiguousarray(values, np.float32)).to(torch.bfloat16).float().numpy()


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """bfloat16-exact float32 values -> their 16-bit patterns (the top half of the float32)."""
    return (np.ascontiguousarray(values, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def random_inputs(rng, frames, nq, npatch, channels, dtype=np.float32):
    """Standard-normal queries and patches; dtype float32, float16 or "bf16" (float32 arrays of
    bfloat16 values)."""
    queries = rng.standard_normal((frames, nq, channels)).astype(np.float32)
    patches = rng.standard_normal((frames, npatch, channels)).astype(np.float32)
    if isinstance(dtype, str):
        return round_to_bf16(queries), round_to_bf16(patches)
    return queries.astype(dtype), patches.astype(dtype)


def dtype_name(array: np.ndarray, bf16: bool = False) -> str:
    return "bf16" if bf16 else ("fp16" if array.dtype == np.float16 else "fp32")


def sampled_shapes(count: int, seed: int, max_work: float = 2.5e7) -> list[tuple[int, int, int, int]]:
    """(F, Q, N, C) with F 1..9, Q 1..32, N 1..600, C 1..1408, log-uniform so small and large
    sizes both appear, F*Q*N*C capped to keep the whole file to a few seconds."""
    rng = np.random.default_rng(seed)
    shapes = []
    while len(shapes) < count:
        f = int(rng.integers(1, 10))
        q = int(np.exp(rng.uniform(0, np.log(32.5))))
        n = int(np.exp(rng.uniform(0, np.log(600.5))))
        c = int(np.exp(rng.uniform(0, np.log(1408.5))))
        if f * q * n * c <= max_work:
            shapes.append((f, q, n, c))
    return shapes


EDGE_SHAPES = [(1, 1, 1, 1), (1, 1, 600, 1), (1, 32, 1, 1408), (9, 1, 1, 7), (3, 32, 65, 33), (2, 31, 63, 31)]
SHAPES = EDGE_SHAPES + sampled_shapes(40, seed=1234) + RELEASED_SHAPES


class HostTwin:
    """ctypes view of libcontext_attention_host.so."""

    def __init__(self, path):
        lib = ctypes.CDLL(str(path))
        ptr, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
        lib.ca_context_attention.argtypes = [i32, i32, ptr, ptr, ptr, i64, i32, i32, i32, f32, i32]
        lib.ca_context_attention.restype = i32
        for name in ("ca_half_to_float", "ca_float_to_half", "ca_float_to_bf16"):
            getattr(lib, name).argtypes = [ptr, ptr, i64]
        for name in ("ca_shared_bytes", "ca_tensor_core_shared_bytes"):
            getattr(lib, name).restype = ctypes.c_uint64
        lib.ca_shared_bytes.argtypes = [i32, i32, i32]
        lib.ca_tensor_core_shared_bytes.argtypes = [i32]
        self.lib = lib

    def run(self, queries, patches, scale, stats_tile=0, check=True, algorithm=CUDA_CORES, bf16=False):
        """context [F,1,C] in the inputs' dtype (float32 or float16; bf16=True: float32 arrays of
        bfloat16 values, run as bfloat16, returned as float32)."""
        queries = np.ascontiguousarray(queries)
        patches = np.ascontiguousarray(patches)
        f, nq, c = queries.shape
        npatch = patches.shape[1]
        if bf16:
            queries, patches = bf16_bits(queries), bf16_bits(patches)
        out = np.empty((f, 1, c), queries.dtype)
        status = self.lib.ca_context_attention(DTYPES[dtype_name(queries, bf16)], algorithm, queries.ctypes.data,
                                               patches.ctypes.data, out.ctypes.data, f, nq, npatch, c, scale,
                                               stats_tile)
        if check:
            assert status == 0, f"host twin rejected shapes {queries.shape} {patches.shape}"
        if status != 0:
            return status
        return (out.astype(np.uint32) << 16).view(np.float32) if bf16 else out

    def half_to_float(self, bits: np.ndarray) -> np.ndarray:
        bits = np.ascontiguousarray(bits, np.uint16)
        out = np.empty(bits.shape, np.float32)
        self.lib.ca_half_to_float(bits.ctypes.data, out.ctypes.data, bits.size)
        return out

    def float_to_half(self, values: np.ndarray) -> np.ndarray:
        values = np.ascontiguousarray(values, np.float32)
        out = np.empty(values.shape, np.uint16)
        self.lib.ca_float_to_half(values.ctypes.data, out.ctypes.data, values.size)
        return out

    def float_to_bf16(self, values: np.ndarray) -> np.ndarray:
        values = np.ascontiguousarray(values, np.float32)
        out = np.empty(values.shape, np.uint16)
        self.lib.ca_float_to_bf16(values.ctypes.data, out.ctypes.data, values.size)
        return out


@pytest.fixture(scope="session")
def host(tmp_path_factory):
    return HostTwin(build.build_host(tmp_path_factory.mktemp("context_attention_host")))


def shape_id(shape):
    return "F{}-Q{}-N{}-C{}".format(*shape)


# ----------------------------------------------------------------------------------------------
# fp16 conversion: bit-exact with IEEE binary16 round-to-nearest-even (numpy's float16)
# ----------------------------------------------------------------------------------------------
def test_half_to_float_every_bit_pattern(host):
    bits = np.arange(1 << 16, dtype=np.uint16)
    ours = host.half_to_float(bits)
    theirs = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(theirs)
    assert np.array_equal(np.isnan(ours), nan)
    assert np.array_equal(ours[~nan].view(np.uint32), theirs[~nan].view(np.uint32))


def test_float_to_half_rounds_to_nearest_even(host):
    rng = np.random.default_rng(7)
    # every float32 exponent, random mantissas, both signs
    random_bits = rng.integers(0, 1 << 32, size=400_000, dtype=np.uint64).astype(np.uint32)
    # exact ties and near-ties around half boundaries: normal, subnormal, overflow edges
    halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    halves = halves[np.isfinite(halves)]
    mid = ((halves[:-1].astype(np.float64) + halves[1:]) / 2).astype(np.float32)
    special = np.array([0.0, -0.0, 65504, 65519.996, 65520, 65536, 2.0**-24, 2.0**-25, 3 * 2.0**-25,
                        2.0**-26, 2.0**-14, np.inf, -np.inf, np.nan, 1e-45], np.float32)
    values = np.concatenate([random_bits.view(np.float32), mid, np.nextafter(mid, np.float32(np.inf)),
                             np.nextafter(mid, np.float32(-np.inf)), special])
    ours = host.float_to_half(values)
    with np.errstate(over="ignore", invalid="ignore"):
        theirs = values.astype(np.float16).view(np.uint16)
    nan = np.isnan(values)
    assert np.array_equal(np.isnan(ours.view(np.float16)), nan)
    mismatch = np.flatnonzero(ours[~nan] != theirs[~nan])
    assert mismatch.size == 0, f"{mismatch.size} mismatches, first {values[~nan][mismatch[:5]]}"


def test_float_to_bf16_rounds_to_nearest_even(host):
    """The host BFloat16 rounds like torch's float32 -> bfloat16 (and __float2bfloat16_rn)."""
    rng = np.random.default_rng(8)
    random_bits = rng.integers(0, 1 << 32, size=400_000, dtype=np.uint64).astype(np.uint32)
    ties = (rng.integers(0, 1 << 16, size=20_000, dtype=np.uint32) << 16) | 0x8000  # exactly halfway
    values = np.concatenate([random_bits, ties, ties + 1, ties - 1]).view(np.float32)
    values = np.concatenate([values, np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3.4e38, 1e-45], np.float32)])
    ours = host.float_to_bf16(values)
    nan = np.isnan(values)
    theirs = bf16_bits(round_to_bf16(values))
    assert np.isnan((ours.astype(np.uint32) << 16).view(np.float32)[nan]).all()
    mismatch = np.flatnonzero(ours[~nan] != theirs[~nan])
    assert mismatch.size == 0, f"{mismatch.size} mismatches, first {values[~nan][mismatch[:5]]}"


# ----------------------------------------------------------------------------------------------
# The op
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_fp32_matches_float64_reference(host, shape):
    f, nq, npatch, c = shape
    queries, patches = random_inputs(np.random.default_rng(hash(shape) % 2**32), f, nq, npatch, c)
    scale = 1.0 / np.sqrt(c)
    error = frame_error(host.run(queries, patches, scale), reference(queries, patches, scale), patches)
    assert error <= FP32_TOL, f"fp32 error {error:.2e} > {FP32_TOL:.0e} for {shape}"


@pytest.mark.parametrize("stats_tile", [1, 5, 64])
@pytest.mark.parametrize("shape", [(2, 32, 576, 64), (3, 5, 130, 48), (1, 1, 600, 3)], ids=shape_id)
def test_streaming_softmax_stats_match_reference(host, shape, stats_tile):
    """The kernel's streaming path merges per-tile softmax stats (online softmax)."""
    f, nq, npatch, c = shape
    queries, patches = random_inputs(np.random.default_rng(3), f, nq, npatch, c)
    # scale 0.5 spreads the scores so the running max changes from tile to tile
    out = host.run(queries, patches, 0.5, stats_tile=stats_tile)
    assert frame_error(out, reference(queries, patches, 0.5), patches) <= FP32_TOL


@pytest.mark.parametrize("shape", EDGE_SHAPES + sampled_shapes(12, seed=99) + RELEASED_SHAPES, ids=shape_id)
def test_fp16_matches_reference_on_rounded_inputs(host, shape):
    f, nq, npatch, c = shape
    queries, patches = random_inputs(np.random.default_rng(5), f, nq, npatch, c, np.float16)
    scale = 1.0 / np.sqrt(c)
    out = host.run(queries, patches, scale)
    assert out.dtype == np.float16
    error = frame_error(out, reference(queries, patches, scale), patches)
    assert error <= FP16_TOL, f"fp16 error {error:.2e} > {FP16_TOL:.2e} for {shape}"
    # one rounding at the end: the fp32 path on the same (exactly widened) inputs, rounded
    via_fp32 = host.run(queries.astype(np.float32), patches.astype(np.float32), scale).astype(np.float16)
    assert np.array_equal(out.view(np.uint16), via_fp32.view(np.uint16))


@pytest.mark.parametrize("shape", EDGE_SHAPES + sampled_shapes(12, seed=99) + RELEASED_SHAPES, ids=shape_id)
def test_bf16_matches_reference_on_rounded_inputs(host, shape):
    f, nq, npatch, c = shape
    queries, patches = random_inputs(np.random.default_rng(6), f, nq, npatch, c, "bf16")
    scale = 1.0 / np.sqrt(c)
    out = host.run(queries, patches, scale, bf16=True)
    error = frame_error(out, reference(queries, patches, scale), patches)
    assert error <= BF16_TOL, f"bf16 error {error:.2e} > {BF16_TOL:.2e} for {shape}"
    # one rounding at the end, as for fp16
    via_fp32 = round_to_bf16(host.run(queries, patches, scale))
    assert np.array_equal(out.view(np.uint32), via_fp32.view(np.uint32))


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", EDGE_SHAPES + sampled_shapes(16, seed=77) + RELEASED_SHAPES, ids=shape_id)
def test_tensor_core_algorithm_matches_reference(host, shape, dtype):
    """The tiled online-softmax algorithm (numerators rounded to the input type) within the
    module doc's bound; fp32 inputs keep it within the fp32 bound."""
    f, nq, npatch, c = shape
    kind = {"fp32": np.float32, "fp16": np.float16, "bf16": "bf16"}[dtype]
    queries, patches = random_inputs(np.random.default_rng(7), f, nq, npatch, c, kind)
    scale = 1.0 / np.sqrt(c)
    out = host.run(queries, patches, scale, algorithm=TENSOR_CORES, bf16=dtype == "bf16")
    error = frame_error(out, reference(queries, patches, scale), patches)
    bound = tolerance(dtype, TENSOR_CORES, npatch)
    assert error <= bound, f"{dtype} error {error:.2e} > {bound:.2e} for {shape}"


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_tensor_core_running_max_moves_between_tiles(host, dtype):
    """Scale 0.5 spreads the scores so the running max of a row rises over many 16-patch tiles,
    and patches sorted by rising score make it rise on every tile: each rescale must be exact."""
    rng = np.random.default_rng(9)
    queries, patches = random_inputs(rng, 2, 32, 576, 64)
    order = np.argsort((patches * queries[:, :1]).sum(-1), axis=1)  # query 0's scores, rising
    patches = np.take_along_axis(patches, order[..., None], axis=1)
    kind = np.float16 if dtype == "fp16" else np.float32
    queries, patches = queries.astype(kind), patches.astype(kind)
    out = host.run(queries, patches, 0.5, algorithm=TENSOR_CORES)
    error = frame_error(out, reference(queries, patches, 0.5), patches)
    assert error <= tolerance(dtype, TENSOR_CORES, 576)


@pytest.mark.parametrize("algorithm", [CUDA_CORES, TENSOR_CORES], ids=["cuda_cores", "tensor_cores"])
@pytest.mark.parametrize("scale", [1e3, 1e6, 1e20])
def test_extreme_scores_stay_finite(host, scale, algorithm):
    """Huge scores: exp underflows to 0 except at each row's max, never inf or NaN."""
    queries, patches = random_inputs(np.random.default_rng(11), 3, 8, 200, 64)
    out = host.run(queries, patches, scale, algorithm=algorithm)
    assert np.isfinite(out).all()
    # a convex combination of patch rows stays inside their per-channel range
    assert (out[:, 0] <= patches.max(axis=1) + 1e-6).all() and (out[:, 0] >= patches.min(axis=1) - 1e-6).all()
    if scale >= 1e6:  # one-hot softmax: the mean of each query's best patch, exactly
        assert frame_error(out, reference(queries, patches, scale), patches) <= FP32_TOL


@pytest.mark.parametrize("algorithm", [CUDA_CORES, TENSOR_CORES], ids=["cuda_cores", "tensor_cores"])
def test_large_features_stay_finite_in_fp16(host, algorithm):
    """Features near the fp16 maximum: scores ~1e9 in fp32, output still finite."""
    rng = np.random.default_rng(13)
    queries = (rng.uniform(-1, 1, (2, 4, 32)) * 60000).astype(np.float16)
    patches = (rng.uniform(-1, 1, (2, 50, 32)) * 60000).astype(np.float16)
    out = host.run(queries, patches, 1.0 / np.sqrt(32), algorithm=algorithm)
    assert np.isfinite(out.astype(np.float32)).all()
    bound = tolerance("fp16", algorithm, 50)
    assert frame_error(out, reference(queries, patches, 1.0 / np.sqrt(32)), patches) <= bound


def test_invalid_sizes_are_rejected(host):
    queries = np.zeros((1, 0, 4), np.float32)
    patches = np.zeros((1, 3, 4), np.float32)
    assert host.run(queries, patches, 1.0, check=False) == 1
    queries = np.zeros((1, 2, 4), np.float32)
    assert host.run(queries, patches, 1.0, check=False, algorithm=3) == 1


def test_released_shapes_fit_shared_memory(host):
    """Q x N scores of the released shapes fit one block's shared memory: N=256 within the
    default 48 KiB, N=576 within the opt-in limit of every target (sm_89: 99 KiB)."""
    assert host.lib.ca_shared_bytes(32, 256, 1) <= 48 * 1024
    assert host.lib.ca_shared_bytes(32, 576, 1) <= 99 * 1024
    # the streaming path needs only w[N] beyond fixed tiles: long rows still fit 48 KiB
    assert host.lib.ca_shared_bytes(32, 4096, 0) <= 48 * 1024


def test_tensor_core_shared_memory_per_target(host):
    """The tensor-core block, for any N and C: two patch tiles in flight within sm_90's 227 KiB,
    one within sm_80/87's 163 KiB; sm_89's 99 KiB takes the CUDA-core kernel instead."""
    two, one = host.lib.ca_tensor_core_shared_bytes(2), host.lib.ca_tensor_core_shared_bytes(1)
    assert 99 * 1024 < one < 163 * 1024 < two <= 227 * 1024
