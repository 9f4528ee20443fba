// ContextAttention arithmetic shared by the CUDA kernel and the host build.
//
//   s[q,n]   = scale * dot(queries[q,:], patches[n,:])        fp32 accumulation
//   a[q,:]   = softmax_n(s[q,:])                              max-subtracted
//   w[n]     = (1/Q) * sum_q a[q,n]
//   ctx[c]   = sum_n w[n] * patches[n,c]
//
// Everything here is __host__ __device__ and compiles with plain g++ when __CUDACC__ is not
// defined: then the qualifiers vanish and `Half` is a 16-bit host type whose conversions round
// exactly like __half (round to nearest, ties to even). The kernel (contextAttentionKernel.cu)
// and the host loop (contextAttentionHost.cpp) call these same functions, so the CPU tests
// check the arithmetic the GPU runs; only the thread layout differs.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
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

#if defined(__CUDACC__)
using Half = __half;
CA_HD float toFloat(Half x) { return __half2float(x); }
#else
struct Half
{
    uint16_t bits;
};
static_assert(sizeof(Half) == 2, "Half must be 16 bits");
CA_HD float toFloat(Half x) { return halfBitsToFloat(x.bits); }
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

} // namespace ca
} // namespace llamavid
