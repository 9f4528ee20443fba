// ContextAttention arithmetic shared by the CUDA kernels and the host build.
//
//   s[q,n]   = scale * dot(queries[q,:], patches[n,:])        fp32 accumulation
//   a[q,:]   = softmax_n(s[q,:])                              max-subtracted
//   ctx[c]   = (1/Q) sum_q sum_n a[q,n] * patches[n,c]
//
// Two algorithms compute it (README.md):
//   CUDA cores    w[n] = (1/Q) sum_q a[q,n] from the row max / exp-sum, then ctx = sum_n w[n] p[n,:]
//   tensor cores  one pass over kTcTileN-patch tiles with an online softmax per query (base 2):
//                 t = log2(e) * s, running max m (raised lazily) and sum l, e = 2^(t - m) rounded
//                 to the input type (the tensor cores multiply 16-bit operands),
//                 acc[q,:] = acc * 2^(m_old - m) + e p, ctx = (1/Q) sum_q acc[q,:] / l[q]
//
// Everything here is __host__ __device__ and compiles with plain g++ when __CUDACC__ is not
// defined: then the qualifiers vanish and `Half` / `BFloat16` are 16-bit host types whose
// conversions round exactly like __half / __nv_bfloat16 (round to nearest, ties to even). The
// kernels and the host loops (contextAttentionHost.cpp) call these same functions, so the CPU tests
// check the arithmetic the GPU runs; only the thread layout (and the order of the fp32 sums that
// the tensor cores form) differs.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define CA_HD __host__ __device__ __forceinline__
#else
#define CA_HD inline
#endif

namespace llamavid
{
namespace ca
{

// ---------------------------------------------------------------------------------------------
// Tiling of the kernel (also used by the host to report shared-memory needs)
// ---------------------------------------------------------------------------------------------
constexpr int kThreads = 256; // one block per frame
constexpr int kTileQ = 32;    // queries per score tile
constexpr int kTileN = 64;    // patches per score tile
constexpr int kTileC = 32;    // channels staged in shared memory per step
constexpr int kPitch = kTileC + 1; // padded row: conflict-free column reads

// Dynamic shared memory (bytes) of one block: the two staging tiles, per-query softmax stats,
// the per-patch weights w[N], and either the whole Q x N score matrix (keepScores) or one
// kTileQ x kTileN score tile (streaming path: scores are recomputed instead of stored).
CA_HD size_t sharedBytes(int numQueries, int numPatches, bool keepScores)
{
    size_t const scores = keepScores ? size_t(numQueries) * size_t(numPatches) : size_t(kTileQ) * kTileN;
    size_t const floats = size_t(kTileQ + kTileN) * kPitch + 2 * size_t(numQueries) + size_t(numPatches) + scores;
    return floats * sizeof(float);
}

// Tiling of the tensor-core kernel (contextAttentionTensorCore.cu): one block of kTcWarps warps
// per frame; warp g owns channels [g * slice, (g + 1) * slice) of the queries and patches, for
// both the scores (partial dot products, summed across warps) and its part of the output, and
// query rows [4g, 4g + 4) of the online softmax.
constexpr int kTcWarps = 8;
constexpr int kTcThreads = 32 * kTcWarps;
constexpr int kTcMaxQueries = 32;                       // two 16-row mma tiles
constexpr int kTcTileN = 16;                            // patches per step of the online softmax
constexpr int kTcMaxSlice = 176;                        // channels per warp: 22 accumulator tiles of 8
constexpr int kTcMaxChannels = kTcWarps * kTcMaxSlice;  // 1408, the released width
constexpr float kLog2e = 1.4426950408889634f;

// Channels per warp for C channels: ceil(C / kTcWarps) rounded up to the mma's k of 16.
CA_HD int tcSlice(int channels)
{
    int const perWarp = (channels + kTcWarps - 1) / kTcWarps;
    return (perWarp + 15) / 16 * 16;
}

// Shared-memory layout of a tensor-core block, the same for every C (the loops always cover
// kTcMaxSlice channels per warp; what a smaller C leaves is zeros): the queries
// [32][kTcWarps * kTcMaxSlice], `stages` patch tiles [kTcWarps][kTcTileN][kTcMaxSlice] (rows
// padded by 16 bytes: conflict-free ldmatrix), the warps' partial score tiles (fp32), the tile of
// softmax numerators [32][kTcTileN] (T, rows padded), and per row alpha, then 1 / l (fp32).
constexpr int kTcQueryPitch = kTcWarps * kTcMaxSlice * 2 + 16; // bytes per query row
constexpr int kTcSlabPitch = kTcMaxSlice * 2 + 16;             // bytes per patch row of a warp's slab
constexpr int kTcSlabBytes = kTcTileN * kTcSlabPitch;
constexpr int kTcStageBytes = kTcWarps * kTcSlabBytes;

constexpr int kTcNumeratorPitch = (kTcTileN + 8) * 2;          // bytes per row of the numerator tile

CA_HD size_t tcSharedBytes(int stages)
{
    size_t const partial = size_t(kTcWarps) * kTcMaxQueries * kTcTileN * sizeof(float);
    size_t const numerators = size_t(kTcMaxQueries) * kTcNumeratorPitch;
    size_t const rows = 2 * kTcMaxQueries * sizeof(float); // alpha per row, then 1 / l per row
    return size_t(kTcMaxQueries) * kTcQueryPitch + size_t(stages) * kTcStageBytes + partial + numerators + rows;
}

// ---------------------------------------------------------------------------------------------
// fp16 <-> fp32, bit-exact with __half (IEEE binary16, round to nearest even)
// ---------------------------------------------------------------------------------------------
CA_HD uint32_t floatBits(float x)
{
    union { float f; uint32_t u; } v{x};
    return v.u;
}

CA_HD float bitsToFloat(uint32_t u)
{
    union { uint32_t u; float f; } v{u};
    return v.f;
}

CA_HD uint16_t floatToHalfBits(float x)
{
    uint32_t const bits = floatBits(x);
    uint16_t const sign = uint16_t((bits >> 16) & 0x8000u);
    uint32_t const mag = bits & 0x7fffffffu;
    if (mag > 0x7f800000u) // NaN: a quiet NaN of the same sign
        return uint16_t(sign | 0x7e00u);
    if (mag >= 0x477ff000u) // >= 65520 (halfway between 65504 and 2^16) rounds to inf
        return uint16_t(sign | 0x7c00u);
    if (mag >= 0x38800000u) // normal half (>= 2^-14): re-bias exponent, round 13 dropped bits
    {
        uint32_t h = (mag - 0x38000000u) >> 13;
        uint32_t const rest = mag & 0x1fffu;
        if (rest > 0x1000u || (rest == 0x1000u && (h & 1u)))
            ++h; // a carry into the exponent is the correct rounding
        return uint16_t(sign | h);
    }
    // subnormal half: value / 2^-24 rounded; 24+ dropped bits means below half the smallest
    int const shift = 126 - int(mag >> 23);
    if (shift > 24)
        return sign;
    uint32_t const mant = (mag & 0x7fffffu) | 0x800000u;
    uint32_t h = mant >> shift;
    uint32_t const rest = mant & ((1u << shift) - 1u);
    uint32_t const halfway = 1u << (shift - 1);
    if (rest > halfway || (rest == halfway && (h & 1u)))
        ++h;
    return uint16_t(sign | h);
}

CA_HD float halfBitsToFloat(uint16_t h)
{
    uint32_t const sign = uint32_t(h & 0x8000u) << 16;
    uint32_t const exponent = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    if (exponent == 0x1fu) // inf / NaN
        return bitsToFloat(sign | 0x7f800000u | (mant << 13));
    if (exponent != 0)
        return bitsToFloat(sign | ((exponent + 112u) << 23) | (mant << 13));
    if (mant == 0)
        return bitsToFloat(sign);
    uint32_t e = 113u; // subnormal: normalise m * 2^-24
    while (!(mant & 0x400u))
    {
        mant <<= 1;
        --e;
    }
    return bitsToFloat(sign | (e << 23) | ((mant & 0x3ffu) << 13));
}

// bfloat16 is the top half of a float32: round to nearest even on the 16 dropped bits.
CA_HD uint16_t floatToBf16Bits(float x)
{
    uint32_t const bits = floatBits(x);
    if ((bits & 0x7fffffffu) > 0x7f800000u) // NaN: a quiet NaN of the same sign
        return uint16_t((bits >> 16) | 0x40u);
    return uint16_t((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

CA_HD float bf16BitsToFloat(uint16_t h)
{
    return bitsToFloat(uint32_t(h) << 16);
}

#if defined(__CUDACC__)
using Half = __half;
using BFloat16 = __nv_bfloat16;
CA_HD float toFloat(Half x) { return __half2float(x); }
CA_HD float toFloat(BFloat16 x) { return __bfloat162float(x); }
#else
struct Half
{
    uint16_t bits;
};
struct BFloat16
{
    uint16_t bits;
};
static_assert(sizeof(Half) == 2 && sizeof(BFloat16) == 2, "Half and BFloat16 must be 16 bits");
CA_HD float toFloat(Half x) { return halfBitsToFloat(x.bits); }
CA_HD float toFloat(BFloat16 x) { return bf16BitsToFloat(x.bits); }
#endif

CA_HD float toFloat(float x) { return x; }

template <typename T>
CA_HD T fromFloat(float x);

template <>
CA_HD float fromFloat<float>(float x)
{
    return x;
}

template <>
CA_HD Half fromFloat<Half>(float x)
{
#if defined(__CUDACC__)
    return __float2half_rn(x);
#else
    return Half{floatToHalfBits(x)};
#endif
}

template <>
CA_HD BFloat16 fromFloat<BFloat16>(float x)
{
#if defined(__CUDACC__)
    return __float2bfloat16_rn(x);
#else
    return BFloat16{floatToBf16Bits(x)};
#endif
}

// x rounded to T and back: the value a T operand of the tensor cores holds.
template <typename T>
CA_HD float roundTo(float x)
{
    return toFloat(fromFloat<T>(x));
}

// ---------------------------------------------------------------------------------------------
// Scores: acc + sum_{i < len} a[i] * b[i], in index order, one fused multiply-add per term
// ---------------------------------------------------------------------------------------------
template <typename A, typename B>
CA_HD float dotAccumulate(float acc, A const* a, B const* b, int len)
{
#if defined(__CUDA_ARCH__)
#pragma unroll 8
#endif
    for (int i = 0; i < len; ++i)
        acc = fmaf(toFloat(a[i]), toFloat(b[i]), acc);
    return acc;
}

// ---------------------------------------------------------------------------------------------
// Softmax statistics of one score row, over the strided index set begin, begin+step, ... < end
// (a warp lane uses step 32, the host step 1). An empty set gives max -inf and sum 0.
// ---------------------------------------------------------------------------------------------
CA_HD float maxRange(float const* s, int begin, int end, int step)
{
    float m = -INFINITY;
    for (int i = begin; i < end; i += step)
        m = fmaxf(m, s[i]);
    return m;
}

CA_HD float expSumRange(float const* s, int begin, int end, int step, float rowMax)
{
    float l = 0.f;
    for (int i = begin; i < end; i += step)
        l += expf(s[i] - rowMax);
    return l;
}

// Folds the stats (m2, l2) of another part of the same row into (m, l): the online softmax
// used when scores are streamed tile by tile instead of kept.
CA_HD void mergeSoftmaxStats(float& m, float& l, float m2, float l2)
{
    if (m2 == -INFINITY)
        return; // the other part is empty
    float const mNew = fmaxf(m, m2);
    l = l * expf(m - mNew) + l2 * expf(m2 - mNew);
    m = mNew;
}

// ---------------------------------------------------------------------------------------------
// Weights and weighted sum
// ---------------------------------------------------------------------------------------------
// sum over count queries of softmax(s)[q, n] = exp(s[q,n] - max_q) / sum_q, where sCol points at
// s[0, n] and consecutive queries are ld floats apart. The caller multiplies by 1/Q.
CA_HD float softmaxWeightSum(float const* sCol, int ld, int count, float const* rowMax, float const* rowInvSum)
{
    float w = 0.f;
    for (int q = 0; q < count; ++q)
        w = fmaf(expf(sCol[size_t(q) * ld] - rowMax[q]), rowInvSum[q], w);
    return w;
}

// acc + sum_{begin <= n < end} w[n] * p[n * stride]  (p points at channel c of patch 0)
template <typename T>
CA_HD float weightedSumRange(float acc, float const* w, T const* p, int begin, int end, int stride)
{
#if defined(__CUDA_ARCH__)
#pragma unroll 4
#endif
    for (int n = begin; n < end; ++n)
        acc = fmaf(w[n], toFloat(p[size_t(n) * stride]), acc);
    return acc;
}

// ---------------------------------------------------------------------------------------------
// Online softmax of the tensor-core algorithm (scores t in base 2: t = log2(e) * scale * dot)
// ---------------------------------------------------------------------------------------------
// The running max m of a row moves only when a tile's largest score exceeds it by more than
// kTcMaxGap (base 2), so most tiles need no rescale of the accumulators; until then the
// numerators 2^(t - m) stay within [0, 2^kTcMaxGap] (fp16 and bf16 hold them, the relative
// rounding is the same). The result is the same softmax: m is any reference the numerators
// and the sum share.
constexpr float kTcMaxGap = 8.f;

// Raises the running max m to cover a tile whose largest score is tileMax (lazily, above);
// returns alpha = 2^(m_old - m_new), the factor that rescales the row's running sum and
// accumulators: 1 when m stays, 0 on the first tile (m_old = -inf). A tile always holds at least
// one real patch.
CA_HD float raiseRunningMax(float& m, float tileMax)
{
    if (!(tileMax > m + kTcMaxGap))
        return 1.f;
    float const alpha = exp2f(m - tileMax);
    m = tileMax;
    return alpha;
}

// The softmax numerator 2^(t - m) of one score, as the T operand the weighted sum multiplies.
// Masked scores (-inf: patches past N) give 0. The running sum adds these rounded values, so
// the weights a row applies sum to 1 up to fp32 rounding.
template <typename T>
CA_HD float softmaxNumerator(float t, float m)
{
    return roundTo<T>(exp2f(t - m));
}

} // namespace ca
} // namespace llamavid
