// Host twin of the ContextAttention kernel: a plain loop over frames that calls the same
// __host__ __device__ arithmetic (contextAttentionMath.h). Built with g++ into a small shared
// library (kernels.build.build_host) and driven from Python through ctypes by the tests.
// Not a production path: it exists so the kernel's arithmetic is checked without a GPU.
#include "contextAttentionMath.h"

#include <algorithm>
#include <cstdint>
#include <vector>

using namespace llamavid::ca;

namespace
{

// statsTile <= 0: softmax stats over the whole row (what the kernel does when the Q x N score
// matrix fits in shared memory). statsTile > 0: stats merged tile by tile with
// mergeSoftmaxStats (what the kernel's streaming path does with kTileN-wide tiles).
template <typename T>
int runFrames(T const* queries, T const* patches, T* context, int64_t frames, int numQueries, int numPatches,
    int channels, float scale, int statsTile)
{
    if (frames < 0 || numQueries < 1 || numPatches < 1 || channels < 1)
        return 1;
    int const Q = numQueries, N = numPatches, C = channels;
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
    return 0;
}

} // namespace

extern "C"
{

// Returns 0, or 1 for invalid sizes. Layouts: queries [F,Q,C], patches [F,N,C], context [F,1,C].
int ca_context_attention_f32(float const* queries, float const* patches, float* context, int64_t frames,
    int numQueries, int numPatches, int channels, float scale, int statsTile)
{
    return runFrames(queries, patches, context, frames, numQueries, numPatches, channels, scale, statsTile);
}

// fp16 buffers are passed as their 16-bit patterns (numpy float16 viewed as uint16).
int ca_context_attention_f16(uint16_t const* queries, uint16_t const* patches, uint16_t* context, int64_t frames,
    int numQueries, int numPatches, int channels, float scale, int statsTile)
{
    return runFrames(reinterpret_cast<Half const*>(queries), reinterpret_cast<Half const*>(patches),
        reinterpret_cast<Half*>(context), frames, numQueries, numPatches, channels, scale, statsTile);
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

uint64_t ca_shared_bytes(int numQueries, int numPatches, int keepScores)
{
    return sharedBytes(numQueries, numPatches, keepScores != 0);
}

} // extern "C"
