// ContextAttention launcher, and the CUDA-core kernel: one block of kThreads threads per frame.
// (The tensor-core kernel is contextAttentionTensorCore.cu; launchContextAttention picks one.)
//
//   keep path (Q x N scores fit in shared memory; the released shapes do):
//     pass 1  patches -> score tiles -> S[Q][N] in shared memory
//             row max / exp-sum of S (a warp per query row)
//             w[n] = (1/Q) sum_q softmax(S)[q,n]            (a thread per patch)
//     pass 2  patches -> ctx[c] = sum_n w[n] patches[n,c]  (a thread per channel)
//   streaming path (larger N): pass 1 keeps only online softmax stats per row, an extra pass
//     recomputes the score tiles to form w[n]; then the same weighted sum. No global workspace.
//
// The per-element arithmetic is in contextAttentionMath.h, shared with the host twin.
#include "contextAttentionKernel.h"
#include "contextAttentionMath.h"
#include "contextAttentionTensorCore.h"

#include <climits>
#include <cstdint>
#include <type_traits>

namespace llamavid
{
namespace ca
{
namespace
{

constexpr int kWarps = kThreads / 32;
constexpr size_t kDefaultSharedLimit = 48 * 1024; // above this a kernel must opt in

__device__ __forceinline__ float warpMax(float v)
{
    for (int offset = 16; offset > 0; offset >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

__device__ __forceinline__ float warpSum(float v)
{
    for (int offset = 16; offset > 0; offset >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// dst[i * ld + j] = scale * qf[q0 + i] . pf[n0 + j] for the kTileQ x kTileN tile at (q0, n0),
// written only where q0 + i < Q and n0 + j < N. Channels are staged kTileC at a time as fp32
// (zero-padded past C, which adds exact zeros). Thread t owns column j = t % kTileN and rows
// t / kTileN + k * kRowGroups. All threads must call it; callers sync before reading dst.
template <typename T>
__device__ void scoreTile(T const* qf, T const* pf, int Q, int N, int C, int q0, int n0, float scale, float* qs,
    float* ps, float* dst, int ld)
{
    constexpr int kRowGroups = kThreads / kTileN;
    constexpr int kRowsPerThread = kTileQ / kRowGroups;
    static_assert(kThreads % kTileN == 0 && kTileQ % kRowGroups == 0, "tile shape must match the block");
    int const j = threadIdx.x % kTileN;
    int const i0 = threadIdx.x / kTileN;
    float acc[kRowsPerThread] = {};
    for (int c0 = 0; c0 < C; c0 += kTileC)
    {
        for (int e = threadIdx.x; e < kTileQ * kTileC; e += kThreads)
        {
            int const r = e / kTileC, q = q0 + r, c = c0 + e % kTileC;
            qs[r * kPitch + e % kTileC] = (q < Q && c < C) ? toFloat(qf[size_t(q) * C + c]) : 0.f;
        }
        for (int e = threadIdx.x; e < kTileN * kTileC; e += kThreads)
        {
            int const r = e / kTileC, n = n0 + r, c = c0 + e % kTileC;
            ps[r * kPitch + e % kTileC] = (n < N && c < C) ? toFloat(pf[size_t(n) * C + c]) : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < kRowsPerThread; ++k)
            acc[k] = dotAccumulate(acc[k], qs + (i0 + k * kRowGroups) * kPitch, ps + j * kPitch, kTileC);
        __syncthreads();
    }
#pragma unroll
    for (int k = 0; k < kRowsPerThread; ++k)
    {
        int const i = i0 + k * kRowGroups;
        if (q0 + i < Q && n0 + j < N)
            dst[i * ld + j] = scale * acc[k];
    }
}

// bf16 kernels exist for sm_80 and newer only (bf16Support); below, the body is empty.
template <typename T>
constexpr bool kHasBody =
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    !std::is_same<T, __nv_bfloat16>::value;
#else
    true;
#endif

template <typename T, bool kKeepScores>
__global__ void __launch_bounds__(kThreads)
    contextAttentionKernel(T const* queries, T const* patches, T* context, int Q, int N, int C, float scale)
{
    if constexpr (!kHasBody<T>)
        return;
    extern __shared__ float smem[];
    float* qs = smem;                     // [kTileQ][kPitch]
    float* ps = qs + kTileQ * kPitch;     // [kTileN][kPitch]
    float* rowMax = ps + kTileN * kPitch; // [Q]
    float* rowInvSum = rowMax + Q;        // [Q]
    float* w = rowInvSum + Q;             // [N]
    float* scores = w + N;                // keep: [Q][N]; streaming: [kTileQ][kTileN]

    int64_t const f = blockIdx.x;
    T const* qf = queries + f * Q * C; // [Q, C]
    T const* pf = patches + f * N * C; // [N, C]
    int const lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    float const invQ = 1.f / float(Q);

    if (kKeepScores)
    {
        for (int n0 = 0; n0 < N; n0 += kTileN)
            for (int q0 = 0; q0 < Q; q0 += kTileQ)
                scoreTile(qf, pf, Q, N, C, q0, n0, scale, qs, ps, scores + size_t(q0) * N + n0, N);
        __syncthreads();
        for (int q = warp; q < Q; q += kWarps)
        {
            float const* row = scores + size_t(q) * N;
            float const m = warpMax(maxRange(row, lane, N, 32));
            float const l = warpSum(expSumRange(row, lane, N, 32, m));
            if (lane == 0)
            {
                rowMax[q] = m;
                rowInvSum[q] = 1.f / l;
            }
        }
        __syncthreads();
        for (int n = threadIdx.x; n < N; n += kThreads)
            w[n] = invQ * softmaxWeightSum(scores + n, N, Q, rowMax, rowInvSum);
    }
    else
    {
        for (int q = threadIdx.x; q < Q; q += kThreads)
        {
            rowMax[q] = -INFINITY;
            rowInvSum[q] = 0.f; // the running exp-sum until the end of this pass
        }
        __syncthreads();
        for (int n0 = 0; n0 < N; n0 += kTileN)
        {
            int const tileN = min(kTileN, N - n0);
            for (int q0 = 0; q0 < Q; q0 += kTileQ)
            {
                scoreTile(qf, pf, Q, N, C, q0, n0, scale, qs, ps, scores, kTileN);
                __syncthreads();
                for (int i = warp; i < min(kTileQ, Q - q0); i += kWarps)
                {
                    float const* row = scores + i * kTileN;
                    float const m = warpMax(maxRange(row, lane, tileN, 32));
                    float const l = warpSum(expSumRange(row, lane, tileN, 32, m));
                    if (lane == 0)
                        mergeSoftmaxStats(rowMax[q0 + i], rowInvSum[q0 + i], m, l);
                }
                __syncthreads(); // the next tile overwrites scores
            }
        }
        for (int q = threadIdx.x; q < Q; q += kThreads)
            rowInvSum[q] = 1.f / rowInvSum[q];
        __syncthreads();
        for (int n0 = 0; n0 < N; n0 += kTileN)
        {
            int const j = threadIdx.x;
            for (int q0 = 0; q0 < Q; q0 += kTileQ)
            {
                scoreTile(qf, pf, Q, N, C, q0, n0, scale, qs, ps, scores, kTileN);
                __syncthreads();
                if (j < min(kTileN, N - n0))
                {
                    float const part
                        = softmaxWeightSum(scores + j, kTileN, min(kTileQ, Q - q0), rowMax + q0, rowInvSum + q0);
                    w[n0 + j] = (q0 == 0 ? 0.f : w[n0 + j]) + part;
                }
                __syncthreads();
            }
            if (j < min(kTileN, N - n0))
                w[n0 + j] *= invQ;
        }
    }
    __syncthreads();

    T* out = context + f * C; // [1, C]
    for (int c = threadIdx.x; c < C; c += kThreads)
        out[c] = fromFloat<T>(weightedSumRange(0.f, w, pf + c, 0, N, C));
}

bool aligned16(void const* p)
{
    return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

template <typename T>
constexpr bool kSixteenBit = std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value;

// What Algorithm::kAuto takes, given the device's opt-in shared memory per block.
template <typename T>
Algorithm autoAlgorithm(
    T const* queries, T const* patches, int32_t numQueries, int32_t channels, int maxShared, int* stages)
{
    if constexpr (!kSixteenBit<T>)
        return Algorithm::kCudaCores;
    else
    {
        *stages = tensorCoreStages(maxShared);
        bool const fits = numQueries <= kTcMaxQueries && channels <= kTcMaxChannels && channels % 8 == 0
            && aligned16(queries) && aligned16(patches) && *stages >= 1;
        return fits && tensorCoreKernelArch<T>() >= 80 ? Algorithm::kTensorCores : Algorithm::kCudaCores;
    }
}

cudaError_t sharedMemoryLimit(int* maxShared)
{
    int device = 0;
    cudaError_t status = cudaGetDevice(&device);
    if (status == cudaSuccess)
        status = cudaDeviceGetAttribute(maxShared, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    return status;
}

template <typename T>
cudaError_t launchCudaCores(T const* queries, T const* patches, T* context, int64_t frames, int32_t numQueries,
    int32_t numPatches, int32_t channels, float scale, int maxShared, cudaStream_t stream, ScoreStorage storage)
{
    size_t const keepBytes = sharedBytes(numQueries, numPatches, true);
    bool const keep = storage == ScoreStorage::kAuto && keepBytes <= size_t(maxShared);
    size_t const bytes = keep ? keepBytes : sharedBytes(numQueries, numPatches, false);
    if (bytes > size_t(maxShared))
        return cudaErrorInvalidValue; // N too large even for the streaming path (w[N] alone)

    auto kernel = keep ? contextAttentionKernel<T, true> : contextAttentionKernel<T, false>;
    if (bytes > kDefaultSharedLimit)
    {
        cudaError_t const status
            = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
        if (status != cudaSuccess)
            return status;
    }
    kernel<<<unsigned(frames), kThreads, bytes, stream>>>(
        queries, patches, context, numQueries, numPatches, channels, scale);
    return cudaGetLastError();
}

} // namespace

cudaError_t bf16Support(bool* supported, int* kernelArch, int* deviceArch)
{
    *supported = false;
    *kernelArch = *deviceArch = 0;
    int device = 0, major = 0, minor = 0;
    cudaError_t status = cudaGetDevice(&device);
    if (status == cudaSuccess)
        status = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    if (status == cudaSuccess)
        status = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    if (status != cudaSuccess)
    {
        cudaGetLastError(); // no device / driver: leave no error behind for the caller's next call
        return status;
    }
    *deviceArch = 10 * major + minor;
    cudaFuncAttributes attributes{};
    if (cudaFuncGetAttributes(&attributes, contextAttentionKernel<__nv_bfloat16, true>) == cudaSuccess)
        *kernelArch = attributes.ptxVersion;
    else
        cudaGetLastError(); // no image for this device: not sticky, clear it
    *supported = *kernelArch >= 80;
    return cudaSuccess;
}

template <typename T>
Algorithm chooseAlgorithm(T const* queries, T const* patches, int32_t numQueries, int32_t channels)
{
    int maxShared = 0, stages = 0;
    if (sharedMemoryLimit(&maxShared) != cudaSuccess)
        return Algorithm::kCudaCores;
    return autoAlgorithm(queries, patches, numQueries, channels, maxShared, &stages);
}

size_t contextAttentionWorkspaceBytes(int64_t frames, int32_t channels)
{
    return tensorCoreWorkspaceBytes(frames, channels);
}

template <typename T>
cudaError_t launchContextAttention(T const* queries, T const* patches, T* context, int64_t frames,
    int32_t numQueries, int32_t numPatches, int32_t channels, float scale, cudaStream_t stream, ScoreStorage storage,
    Algorithm algorithm, void* workspace, size_t workspaceBytes)
{
    if (frames == 0)
        return cudaSuccess;
    if (frames < 0 || frames > INT_MAX || numQueries < 1 || numPatches < 1 || channels < 1 || !queries || !patches
        || !context)
        return cudaErrorInvalidValue;

    int maxShared = 0;
    cudaError_t status = sharedMemoryLimit(&maxShared);
    if (status != cudaSuccess)
        return status;
    if constexpr (std::is_same<T, __nv_bfloat16>::value)
    {
        bool supported = false;
        int kernelArch = 0, deviceArch = 0;
        status = bf16Support(&supported, &kernelArch, &deviceArch);
        if (status != cudaSuccess)
            return status;
        if (!supported)
            return cudaErrorNoKernelImageForDevice;
    }

    int stages = 0;
    Algorithm const best = autoAlgorithm(queries, patches, numQueries, channels, maxShared, &stages);
    if (algorithm == Algorithm::kTensorCores && best != Algorithm::kTensorCores)
        return cudaErrorNotSupported;
    if (algorithm == Algorithm::kCudaCores || best == Algorithm::kCudaCores)
        return launchCudaCores(
            queries, patches, context, frames, numQueries, numPatches, channels, scale, maxShared, stream, storage);
    if constexpr (kSixteenBit<T>)
        return launchTensorCores(queries, patches, context, frames, numQueries, numPatches, channels, scale, stages,
            workspace, workspaceBytes, stream);
    return cudaErrorNotSupported; // not reached: fp32 always takes the CUDA cores
}

#define LLAMAVID_CA_INSTANTIATE(T)                                                                                   \
    template cudaError_t launchContextAttention<T>(T const*, T const*, T*, int64_t, int32_t, int32_t, int32_t, float, \
        cudaStream_t, ScoreStorage, Algorithm, void*, size_t);                                                        \
    template Algorithm chooseAlgorithm<T>(T const*, T const*, int32_t, int32_t);
LLAMAVID_CA_INSTANTIATE(float)
LLAMAVID_CA_INSTANTIATE(__half)
LLAMAVID_CA_INSTANTIATE(__nv_bfloat16)
#undef LLAMAVID_CA_INSTANTIATE

} // namespace ca
} // namespace llamavid
