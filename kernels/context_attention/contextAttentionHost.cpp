// Host twin of the ContextAttention kernels: plain loops over frames that call the same
// __host__ __device__ arithmetic (contextAttentionMath.h), one per algorithm of the launcher.
// Built with g++ into a small shared library (kernels.build.build_host) and driven from Python
// through ctypes by the tests. Not a production path: it exists so the kernels' arithmetic is
// checked without a GPU.
#include "contextAttentionMath.h"

#include <algorithm>
#include <cstdint>
#include <vector>

using namespace llamavid::ca;

namespace
{

// The CUDA-core kernel. statsTile <= 0: softmax stats over the whole row (what it does when the
// Q x N score matrix fits in shared memory). statsTile > 0: stats merged tile by tile with
// mergeSoftmaxStats (what its streaming path does with kTileN-wide tiles).
template <typename T>
void cudaCoreFrames(T const* queries, T const* patches, T* context, int64_t frames, int Q, int N, int C, float scale,
    int statsTile)
{
    float const invQ = 1.f / float(Q);
    std::vector<float> scores(size_t(Q) * N), rowMax(Q), rowInvSum(Q), w(N);
    for (int64_t f = 0; f < frames; ++f)
    {
        T const* qf = queries + f * Q * C; // [Q, C]
        T const* pf = patches + f * N * C; // [N, C]
        for (int q = 0; q < Q; ++q)
            for (int n = 0; n < N; ++n)
                scores[size_t(q) * N + n] = scale * dotAccumulate(0.f, qf + size_t(q) * C, pf + size_t(n) * C, C);
        for (int q = 0; q < Q; ++q)
        {
            float const* row = scores.data() + size_t(q) * N;
            float m = -INFINITY, l = 0.f;
            if (statsTile <= 0)
            {
                m = maxRange(row, 0, N, 1);
                l = expSumRange(row, 0, N, 1, m);
            }
            else
            {
                for (int n0 = 0; n0 < N; n0 += statsTile)
                {
                    int const n1 = std::min(N, n0 + statsTile);
                    float const tileMax = maxRange(row, n0, n1, 1);
                    mergeSoftmaxStats(m, l, tileMax, expSumRange(row, n0, n1, 1, tileMax));
                }
            }
            rowMax[q] = m;
            rowInvSum[q] = 1.f / l;
        }
        for (int n = 0; n < N; ++n)
            w[n] = invQ * softmaxWeightSum(scores.data() + n, N, Q, rowMax.data(), rowInvSum.data());
        for (int c = 0; c < C; ++c)
            context[f * C + c] = fromFloat<T>(weightedSumRange(0.f, w.data(), pf + c, 0, N, C));
    }
}

// The tensor-core kernel's algorithm: kTcTileN-patch tiles, an online softmax in base 2 per
// query, numerators rounded to T, per-query accumulators, the mean over the queries at the end.
template <typename T>
void tensorCoreFrames(T const* queries, T const* patches, T* context, int64_t frames, int Q, int N, int C, float scale)
{
    float const scale2 = scale * kLog2e, invQ = 1.f / float(Q);
    std::vector<float> acc(size_t(Q) * C), rowMax(Q), rowSum(Q), t(kTcTileN);
    for (int64_t f = 0; f < frames; ++f)
    {
        T const* qf = queries + f * Q * C; // [Q, C]
        T const* pf = patches + f * N * C; // [N, C]
        std::fill(acc.begin(), acc.end(), 0.f);
        std::fill(rowMax.begin(), rowMax.end(), -INFINITY);
        std::fill(rowSum.begin(), rowSum.end(), 0.f);
        for (int n0 = 0; n0 < N; n0 += kTcTileN)
        {
            int const count = std::min(kTcTileN, N - n0);
            for (int q = 0; q < Q; ++q)
            {
                float* a = acc.data() + size_t(q) * C; // [C]
                for (int j = 0; j < count; ++j)
                    t[j] = scale2 * dotAccumulate(0.f, qf + size_t(q) * C, pf + size_t(n0 + j) * C, C);
                float const alpha = raiseRunningMax(rowMax[q], maxRange(t.data(), 0, count, 1));
                rowSum[q] *= alpha;
                for (int c = 0; c < C; ++c)
                    a[c] *= alpha;
                for (int j = 0; j < count; ++j)
                {
                    float const e = softmaxNumerator<T>(t[j], rowMax[q]);
                    rowSum[q] += e;
                    for (int c = 0; c < C; ++c)
                        a[c] = fmaf(e, toFloat(pf[size_t(n0 + j) * C + c]), a[c]);
                }
            }
        }
        for (int c = 0; c < C; ++c)
        {
            float sum = 0.f;
            for (int q = 0; q < Q; ++q)
                sum += acc[size_t(q) * C + c] * (1.f / rowSum[q]);
            context[f * C + c] = fromFloat<T>(sum * invQ);
        }
    }
}

template <typename T>
int run(void const* queries, void const* patches, void* context, int64_t frames, int Q, int N, int C, float scale,
    int algorithm, int statsTile)
{
    auto const* q = static_cast<T const*>(queries);
    auto const* p = static_cast<T const*>(patches);
    auto* out = static_cast<T*>(context);
    if (algorithm == 2)
        tensorCoreFrames(q, p, out, frames, Q, N, C, scale);
    else
        cudaCoreFrames(q, p, out, frames, Q, N, C, scale, statsTile);
    return 0;
}

} // namespace

extern "C"
{

// Returns 0, or 1 for invalid arguments. Layouts: queries [F,Q,C], patches [F,N,C], context
// [F,1,C]. dtype 0: float32, 1: float16, 2: bfloat16 (16-bit buffers passed as their bit
// patterns). algorithm 1: CUDA cores (statsTile as above), 2: tensor cores (the launcher's
// Algorithm values).
int ca_context_attention(int dtype, int algorithm, void const* queries, void const* patches, void* context,
    int64_t frames, int numQueries, int numPatches, int channels, float scale, int statsTile)
{
    if (frames < 0 || numQueries < 1 || numPatches < 1 || channels < 1 || (algorithm != 1 && algorithm != 2))
        return 1;
    int const Q = numQueries, N = numPatches, C = channels;
    switch (dtype)
    {
    case 0: return run<float>(queries, patches, context, frames, Q, N, C, scale, algorithm, statsTile);
    case 1: return run<Half>(queries, patches, context, frames, Q, N, C, scale, algorithm, statsTile);
    case 2: return run<BFloat16>(queries, patches, context, frames, Q, N, C, scale, algorithm, statsTile);
    default: return 1;
    }
}

void ca_half_to_float(uint16_t const* in, float* out, int64_t count)
{
    for (int64_t i = 0; i < count; ++i)
        out[i] = halfBitsToFloat(in[i]);
}

void ca_float_to_half(float const* in, uint16_t* out, int64_t count)
{
    for (int64_t i = 0; i < count; ++i)
        out[i] = floatToHalfBits(in[i]);
}

void ca_float_to_bf16(float const* in, uint16_t* out, int64_t count)
{
    for (int64_t i = 0; i < count; ++i)
        out[i] = floatToBf16Bits(in[i]);
}

uint64_t ca_shared_bytes(int numQueries, int numPatches, int keepScores)
{
    return sharedBytes(numQueries, numPatches, keepScores != 0);
}

uint64_t ca_tensor_core_shared_bytes(int stages)
{
    return tcSharedBytes(stages);
}

} // extern "C"
