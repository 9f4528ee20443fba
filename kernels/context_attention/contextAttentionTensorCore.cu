// ContextAttention on tensor cores (fp16 / bf16 inputs, fp32 accumulation): one block of kTcWarps
// warps per frame, a persistent grid looping over the frames, ONE pass over the patches.
//
//   warp g owns channels [g*slice, (g+1)*slice) (slice = 176 at C = 1408) of queries, patches, output
//   per frame:   queries[:, slice] -> shared memory (cp.async)
//   per tile of kTcTileN = 16 patches:
//     cp.async  patches[n0:n0+16, slice] -> the warp's slab, kStages tiles deep; the tile
//               kPrefetchTiles ahead (the next frame's first ones too) is pulled into L2
//     scores    S_g [32 x 16] = Q[:, slice] . P[n0:n0+16, slice]^T     mma.m16n8k16, fp32
//     sum       S = sum_g S_g through shared memory: warp g adds registers 2g, 2g+1 of every
//               warp's fragment, then every warp reads the whole sum (two block barriers)
//     softmax   t = log2(e) scale S, masked past N; per query row the running max m and sum l,
//               alpha = 2^(m_old - m), e = 2^(t - m) rounded to T (every warp computes the same
//               values redundantly: no exchange); e is already the A fragment of the next mma
//     acc       acc[32 x slice] = alpha acc + e . P[n0:n0+16, slice]    mma.m16n8k16, fp32
//               (the rescale is skipped when no row's max moved)
//   end of frame: context[slice] = (1/Q) sum_q acc[q, :] / l[q]   (shuffles over the rows)
//
// Per-element arithmetic (online softmax, rounding, conversions) is contextAttentionMath.h,
// shared with the host twin (contextAttentionHost.cpp, algorithm "tensor cores").
#include "contextAttentionMath.h"
#include "contextAttentionTensorCore.h"

#include <algorithm>

namespace llamavid
{
namespace ca
{
namespace
{

// mma.sync m16n8k16, cp.async and bf16 need sm_80: older targets get an empty kernel, which
// tensorCoreKernelArch reports (the launcher then never picks it).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define LLAMAVID_CA_MMA 1
#endif

#if defined(LLAMAVID_CA_MMA)
// ---- PTX wrappers ----------------------------------------------------------------------------
__device__ __forceinline__ uint32_t sharedAddress(void const* p)
{
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared without waiting; valid = false writes 16 zero bytes instead.
__device__ __forceinline__ void copy16(uint32_t dst, void const* src, bool valid)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void commitCopies()
{
    asm volatile("cp.async.commit_group;\n" ::);
}

template <int kPending>
__device__ __forceinline__ void waitCopies()
{
    asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

__device__ __forceinline__ void prefetchL2(void const* p)
{
    asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
}

__device__ __forceinline__ void ldmatrix4(uint32_t (&r)[4], uint32_t address)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
}

__device__ __forceinline__ void ldmatrix4Trans(uint32_t (&r)[4], uint32_t address)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
}

// d += a . b for one m16n8k16 tile: a row-major [16 x 16], b column-major [16 x 8], d fp32.
template <typename T>
struct Mma;

template <>
struct Mma<__half>
{
    static __device__ __forceinline__ void run(float (&d)[4], uint32_t const (&a)[4], uint32_t b0, uint32_t b1)
    {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi)
    {
        __half2 const h = __floats2half2_rn(lo, hi);
        return reinterpret_cast<uint32_t const&>(h);
    }
};

template <>
struct Mma<__nv_bfloat16>
{
    static __device__ __forceinline__ void run(float (&d)[4], uint32_t const (&a)[4], uint32_t b0, uint32_t b1)
    {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi)
    {
        __nv_bfloat162 const h = __floats2bfloat162_rn(lo, hi);
        return reinterpret_cast<uint32_t const&>(h);
    }
};

__device__ __forceinline__ float quadMax(float v)
{
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

__device__ __forceinline__ float quadSum(float v)
{
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Pulls [p, p + bytes) into L2, 128-byte lines spread over the block.
__device__ __forceinline__ void prefetchRange(void const* p, size_t bytes)
{
    for (size_t i = size_t(threadIdx.x) * 128; i < bytes; i += size_t(kTcThreads) * 128)
        prefetchL2(static_cast<char const*>(p) + i);
}
#endif

// ---- the kernel ------------------------------------------------------------------------------
// Fragment layout of m16n8k16 (g = lane / 4, t = lane % 4): accumulator / score register k of
// tile (i, j) holds row 16i + g + 8 (k / 2), column 8j + 2t + k % 2. Score registers are numbered
// r = 8i + 4j + k in the shared-memory sum.
template <typename T, int kStages>
__global__ void __launch_bounds__(kTcThreads, 1) tensorCoreKernel(T const* __restrict__ queries,
    T const* __restrict__ patches, T* __restrict__ context, int frames, int Q, int N, int C, float scale2, int slice)
{
#if defined(LLAMAVID_CA_MMA)
    constexpr int kAccTiles = kTcMaxSlice / 8; // 22 accumulator tiles of 8 channels per 16 query rows
    constexpr int kSteps = kTcMaxSlice / 16;   // 11 k-steps of 16 channels
    constexpr int kPrefetchTiles = 4;          // tiles ahead of the one computed, pulled into L2
    static_assert(2 * kTcWarps == 16, "each warp sums 2 of the 16 score registers");
    extern __shared__ __align__(16) unsigned char smem[];
    int const warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int const qPitch = kTcWarps * slice * 2 + 16; // bytes per query row
    int const pPitch = slice * 2 + 16;            // bytes per patch row of a warp's slab
    int const slabBytes = kTcTileN * pPitch;
    int const stageBytes = kTcWarps * slabBytes;
    unsigned char* const slabs = smem + kTcMaxQueries * qPitch;                      // [kStages][warp][16][pPitch]
    float* const partial = reinterpret_cast<float*>(slabs + kStages * stageBytes); // [warp][16 registers][32 lanes]
    float* const summed = partial + kTcWarps * 16 * 32;                            // [16 registers][32 lanes]
    uint32_t const qBase = sharedAddress(smem) + warp * slice * 2;                 // this warp's query columns
    uint32_t const pBase = sharedAddress(slabs) + warp * slabBytes;               // stage s: + s * stageBytes

    int const c0 = warp * slice;                  // first channel of this warp
    int const width = max(0, min(slice, C - c0)); // its channels, a multiple of 8 (0: an idle warp)
    int const chunks = width / 8;                 // 16-byte chunks per row
    int const steps = (width + 15) / 16;          // k-steps
    int const mTiles = (Q + 15) / 16;
    int const numTiles = (N + kTcTileN - 1) / kTcTileN;
    float const invQ = 1.f / float(Q);

    // A slab row's chunk `chunks` (when steps * 16 > width) is read but never copied: zero it once.
    if (chunks % 2 == 1)
        for (int r = lane; r < kStages * kTcTileN; r += 32)
            *reinterpret_cast<uint4*>(slabs + (r / kTcTileN) * stageBytes + warp * slabBytes + (r % kTcTileN) * pPitch
                + chunks * 16)
                = make_uint4(0, 0, 0, 0);

    for (int f = blockIdx.x; f < frames; f += gridDim.x)
    {
        T const* qf = queries + size_t(f) * Q * C; // [Q, C]
        T const* pf = patches + size_t(f) * N * C; // [N, C]
        auto loadTile = [&](int tile, int stage) {  // patches[16 tile : +16, this warp's channels]
            if (lane < chunks)
                for (int r = 0; r < kTcTileN; ++r)
                {
                    int const n = tile * kTcTileN + r;
                    copy16(pBase + stage * stageBytes + r * pPitch + lane * 16,
                        pf + size_t(n < N ? n : 0) * C + c0 + lane * 8, n < N);
                }
        };
        // queries[:, this warp's channels], zero past Q and C; they join the first copy group
        int const rowChunks = slice / 8;
        for (int e = lane; e < kTcMaxQueries * rowChunks; e += 32)
        {
            int const r = e / rowChunks, ch = e % rowChunks;
            bool const valid = r < Q && ch < chunks;
            copy16(qBase + r * qPitch + ch * 16, valid ? qf + size_t(r) * C + c0 + ch * 8 : qf, valid);
        }
        for (int s = 0; s < kStages - 1; ++s)
        {
            if (s < numTiles)
                loadTile(s, s);
            commitCopies();
        }
        if (f + int(gridDim.x) < frames)
            prefetchRange(queries + size_t(f + gridDim.x) * Q * C, size_t(Q) * C * sizeof(T));

        float acc[2][kAccTiles][4];
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < kAccTiles; ++j)
#pragma unroll
                for (int k = 0; k < 4; ++k)
                    acc[i][j][k] = 0.f;
        float rowMax[2][2] = {{-INFINITY, -INFINITY}, {-INFINITY, -INFINITY}};
        float rowSum[2][2] = {{0.f, 0.f}, {0.f, 0.f}};

        for (int it = 0; it < numTiles; ++it)
        {
            __syncwarp(); // every lane is done reading the slab refilled now (tile it - 1)
            if (it + kStages - 1 < numTiles)
                loadTile(it + kStages - 1, (it + kStages - 1) % kStages);
            commitCopies();
            waitCopies<kStages - 1>();
            __syncwarp(); // tile it (and the queries) landed for every lane

            {   // the tile kPrefetchTiles ahead in this block's sequence of (frame, tile), into L2
                int tile = it + kPrefetchTiles, g = f;
                if (tile >= numTiles)
                {
                    tile -= numTiles;
                    g += gridDim.x;
                }
                if (g < frames && tile < numTiles)
                    prefetchRange(patches + (size_t(g) * N + size_t(tile) * kTcTileN) * C,
                        size_t(min(kTcTileN, N - tile * kTcTileN)) * C * sizeof(T));
            }
            uint32_t const slab = pBase + (it % kStages) * stageBytes;

            // partial scores over this warp's channels
            float s[2][2][4] = {};
#pragma unroll
            for (int k = 0; k < kSteps; ++k)
            {
                if (k >= steps)
                    break;
                uint32_t b[4]; // patches 0-7 / 8-15 x channels 0-7, 8-15 of the step
                ldmatrix4(b, slab + (lane % 8 + lane / 16 * 8) * pPitch + (k * 16 + lane / 8 % 2 * 8) * 2);
#pragma unroll
                for (int i = 0; i < 2; ++i)
                {
                    if (i >= mTiles)
                        break;
                    uint32_t a[4];
                    ldmatrix4(a, qBase + (16 * i + lane % 8 + lane / 8 % 2 * 8) * qPitch + (k * 16 + lane / 16 * 8) * 2);
                    Mma<T>::run(s[i][0], a, b[0], b[1]);
                    Mma<T>::run(s[i][1], a, b[2], b[3]);
                }
            }

            // the sum over the warps, in warp order (the same bits in every warp)
#pragma unroll
            for (int r = 0; r < 16; ++r)
                partial[(warp * 16 + r) * 32 + lane] = s[r / 8][r / 4 % 2][r % 4];
            __syncthreads();
#pragma unroll
            for (int r = 2 * warp; r < 2 * warp + 2; ++r)
            {
                float sum = 0.f;
#pragma unroll
                for (int g = 0; g < kTcWarps; ++g)
                    sum += partial[(g * 16 + r) * 32 + lane];
                summed[r * 32 + lane] = sum;
            }
            __syncthreads();

            // online softmax of rows 16i + lane/4 (+8); e: the A fragments of the weighted sum
            uint32_t e[2][4];
            float alpha[2][2] = {{1.f, 1.f}, {1.f, 1.f}};
            int const n0 = it * kTcTileN + 2 * (lane % 4);
#pragma unroll
            for (int i = 0; i < 2; ++i)
            {
                if (i >= mTiles)
                    break;
                float t[2][4];
#pragma unroll
                for (int j = 0; j < 2; ++j)
#pragma unroll
                    for (int k = 0; k < 4; ++k)
                        t[j][k] = n0 + 8 * j + k % 2 < N ? scale2 * summed[(8 * i + 4 * j + k) * 32 + lane] : -INFINITY;
#pragma unroll
                for (int h = 0; h < 2; ++h)
                {
                    float const tileMax
                        = quadMax(fmaxf(fmaxf(t[0][2 * h], t[0][2 * h + 1]), fmaxf(t[1][2 * h], t[1][2 * h + 1])));
                    alpha[i][h] = raiseRunningMax(rowMax[i][h], tileMax);
                    float sum = 0.f;
#pragma unroll
                    for (int j = 0; j < 2; ++j)
#pragma unroll
                        for (int k = 2 * h; k < 2 * h + 2; ++k)
                        {
                            t[j][k] = softmaxNumerator<T>(t[j][k], rowMax[i][h]);
                            sum += t[j][k];
                        }
                    rowSum[i][h] = rowSum[i][h] * alpha[i][h] + quadSum(sum);
                }
                e[i][0] = Mma<T>::pack(t[0][0], t[0][1]);
                e[i][1] = Mma<T>::pack(t[0][2], t[0][3]);
                e[i][2] = Mma<T>::pack(t[1][0], t[1][1]);
                e[i][3] = Mma<T>::pack(t[1][2], t[1][3]);
            }
            bool const moved = alpha[0][0] != 1.f || alpha[0][1] != 1.f || alpha[1][0] != 1.f || alpha[1][1] != 1.f;
            if (__any_sync(0xffffffffu, moved))
#pragma unroll
                for (int i = 0; i < 2; ++i)
#pragma unroll
                    for (int j = 0; j < kAccTiles; ++j)
#pragma unroll
                        for (int k = 0; k < 4; ++k)
                            acc[i][j][k] *= alpha[i][k / 2];

            // weighted sum: acc[32 x slice] += e . patches[16 x slice]
#pragma unroll
            for (int k = 0; k < kSteps; ++k)
            {
                if (k >= steps)
                    break;
                uint32_t b[4]; // channels 16k..16k+7 (b0, b1) and 16k+8.. (b2, b3) x patches 0-15
                ldmatrix4Trans(b, slab + (lane % 8 + lane / 8 % 2 * 8) * pPitch + (k * 16 + lane / 16 * 8) * 2);
#pragma unroll
                for (int i = 0; i < 2; ++i)
                {
                    if (i >= mTiles)
                        break;
                    Mma<T>::run(acc[i][2 * k], e[i], b[0], b[1]);
                    Mma<T>::run(acc[i][2 * k + 1], e[i], b[2], b[3]);
                }
            }
        }

        // context[c] = (1/Q) sum_q acc[q][c] / l[q]: this thread's 4 rows, then the 8 row groups
        float invSum[2][2];
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int h = 0; h < 2; ++h)
                invSum[i][h] = 16 * i + 8 * h + lane / 4 < Q ? 1.f / rowSum[i][h] : 0.f;
        T* out = context + size_t(f) * C; // [1, C]
#pragma unroll
        for (int j = 0; j < kAccTiles; ++j)
        {
            if (j >= 2 * steps)
                break;
            float v[2] = {0.f, 0.f};
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int k = 0; k < 4; ++k)
                    v[k % 2] += acc[i][j][k] * invSum[i][k / 2];
#pragma unroll
            for (int offset = 4; offset < 32; offset *= 2)
            {
                v[0] += __shfl_xor_sync(0xffffffffu, v[0], offset);
                v[1] += __shfl_xor_sync(0xffffffffu, v[1], offset);
            }
            int const c = c0 + 8 * j + 2 * lane;
            if (lane < 4 && c < C)
            {
                out[c] = fromFloat<T>(v[0] * invQ);
                out[c + 1] = fromFloat<T>(v[1] * invQ);
            }
        }
    }
    waitCopies<0>(); // nothing left in flight when the block exits
#endif
}

template <typename T, int kStages>
cudaError_t launchWithStages(T const* queries, T const* patches, T* context, int64_t frames, int32_t numQueries,
    int32_t numPatches, int32_t channels, float scale, int maxShared, cudaStream_t stream)
{
    auto kernel = tensorCoreKernel<T, kStages>;
    size_t const bytes = tcSharedBytes(channels, kStages);
    if (bytes > size_t(maxShared))
        return cudaErrorInvalidValue;
    int device = 0, processors = 0, perProcessor = 0;
    cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
    if (status == cudaSuccess)
        status = cudaGetDevice(&device);
    if (status == cudaSuccess)
        status = cudaDeviceGetAttribute(&processors, cudaDevAttrMultiProcessorCount, device);
    if (status == cudaSuccess)
        status = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&perProcessor, kernel, kTcThreads, bytes);
    if (status != cudaSuccess)
        return status;
    int64_t const resident = int64_t(processors) * std::max(perProcessor, 1);
    kernel<<<unsigned(std::min(frames, resident)), kTcThreads, bytes, stream>>>(queries, patches, context, int(frames),
        numQueries, numPatches, channels, scale * kLog2e, tcSlice(channels));
    return cudaGetLastError();
}

} // namespace

int tensorCoreStages(int32_t channels, int maxShared)
{
    for (int stages = 2; stages >= 1; --stages)
        if (tcSharedBytes(channels, stages) <= size_t(maxShared))
            return stages;
    return 0;
}

template <typename T>
int tensorCoreKernelArch()
{
    cudaFuncAttributes attributes{};
    if (cudaFuncGetAttributes(&attributes, tensorCoreKernel<T, 1>) != cudaSuccess)
    {
        cudaGetLastError(); // not sticky: clear it
        return 0;
    }
    return attributes.ptxVersion;
}

template <typename T>
cudaError_t launchTensorCores(T const* queries, T const* patches, T* context, int64_t frames, int32_t numQueries,
    int32_t numPatches, int32_t channels, float scale, int stages, int maxShared, cudaStream_t stream)
{
    if (stages >= 2)
        return launchWithStages<T, 2>(
            queries, patches, context, frames, numQueries, numPatches, channels, scale, maxShared, stream);
    return launchWithStages<T, 1>(
        queries, patches, context, frames, numQueries, numPatches, channels, scale, maxShared, stream);
}

template int tensorCoreKernelArch<__half>();
template int tensorCoreKernelArch<__nv_bfloat16>();
template cudaError_t launchTensorCores<__half>(
    __half const*, __half const*, __half*, int64_t, int32_t, int32_t, int32_t, float, int, int, cudaStream_t);
template cudaError_t launchTensorCores<__nv_bfloat16>(__nv_bfloat16 const*, __nv_bfloat16 const*, __nv_bfloat16*,
    int64_t, int32_t, int32_t, int32_t, float, int, int, cudaStream_t);

} // namespace ca
} // namespace llamavid
