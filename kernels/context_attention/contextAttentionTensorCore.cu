// ContextAttention on tensor cores (fp16 / bf16 inputs, fp32 accumulation): one block of kTcWarps
// warps per frame, a persistent grid looping over the frames, ONE pass over the patches.
//
//   warp g owns channels [g*slice, (g+1)*slice) (slice = 176 at C = 1408) of queries, patches, output
//   per frame:   queries[:, slice] -> shared memory (cp.async)
//   per tile of kTcTileN = 16 patches:
//     cp.async  patches[n0:n0+16, slice] -> the warp's slab, kStages tiles deep (the next
//               frame's queries are pulled into L2 ahead; an L2 prefetch of the tiles ahead
//               measured 7-9% slower on an H200: the L2 is the busier side, docs/BENCHMARKS.md)
//     scores    S_g [32 x 16] = Q[:, slice] . P[n0:n0+16, slice]^T     mma.m16n8k16, fp32
//     softmax   through shared memory (two block barriers): warp g sums the 8 warps' S_g for
//               query rows 4g..4g+3 in warp order, t = log2(e) scale S masked past N; per row
//               the running max m (raised lazily, kTcMaxGap) and sum l, alpha = 2^(m_old - m),
//               numerators e = 2^(t - m) rounded to T -> a [32 x 16] tile, alpha -> per row
//     acc       acc[32 x slice] = alpha acc + e . P[n0:n0+16, slice]    mma.m16n8k16, fp32
//               (e read back as A fragments; the rescale is skipped when no row's max moved)
//   end of frame: context[slice] = (1/Q) sum_q acc[q, :] / l[q]   (shuffles over the rows)
//   few frames (2F <= SMs): two blocks per frame, 16 queries each, their fp32 sums added by
//   combineGroups (needs the launcher's workspace, F x 2 x C floats)
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

// Pulls [p, p + bytes) into L2, 128-byte lines spread over the block (bytes < 2^31).
__device__ __forceinline__ void prefetchRange(void const* p, int bytes)
{
    for (int i = threadIdx.x * 128; i < bytes; i += kTcThreads * 128)
        prefetchL2(static_cast<char const*>(p) + i);
}
#endif

// ---- the kernel ------------------------------------------------------------------------------
// Fragment layout of m16n8k16 (g = lane / 4, t = lane % 4): accumulator / score register k of
// tile (i, j) holds row 16i + g + 8 (k / 2), column 8j + 2t + k % 2. Score registers are numbered
// r = 8i + 4j + k in the shared-memory sum.
//
// Work items: (frame, query group). groups == 1: one block per frame, all Q <= 32 queries
// (kMTiles = 2), the context written as T. groups == 2 (few frames: two blocks per frame fill the
// GPU): queries [16g, 16g + 16) (kMTiles = 1), (1/Q) sum over the group's rows written as fp32 to
// split[frame][g][C]; combineGroups adds the two.
template <typename T, int kStages, int kMTiles>
__global__ void __launch_bounds__(kTcThreads, 1) tensorCoreKernel(T const* __restrict__ queries,
    T const* __restrict__ patches, T* __restrict__ context, float* __restrict__ split, int frames, int groups, int Q,
    int N, int C, float scale2, int slice)
{
#if defined(LLAMAVID_CA_MMA)
    constexpr int kAccTiles = kTcMaxSlice / 8; // 22 accumulator tiles of 8 channels per 16 query rows
    constexpr int kSteps = kTcMaxSlice / 16;   // 11 k-steps of 16 channels
    constexpr int kRowChunks = kTcMaxSlice / 8; // 16-byte chunks per slab row
    static_assert(2 * kTcWarps == 16, "each warp sums 2 of the 16 score registers");
    extern __shared__ __align__(16) unsigned char smem[];
    int const warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    unsigned char* const slabs = smem + kTcMaxQueries * kTcQueryPitch;              // [kStages][warp][16][pitch]
    float* const partial = reinterpret_cast<float*>(slabs + kStages * kTcStageBytes); // [warp][16 registers][32 lanes]
    unsigned char* const numerators = reinterpret_cast<unsigned char*>(partial + kTcWarps * 16 * 32); // [32][pitch] T
    float* const rowAlpha = reinterpret_cast<float*>(numerators + kTcMaxQueries * kTcNumeratorPitch); // [32]
    float* const rowInvSum = rowAlpha + kTcMaxQueries;                                                 // [32]
    uint32_t const qBase = sharedAddress(smem) + warp * kTcMaxSlice * 2;             // this warp's query columns
    uint32_t const pBase = sharedAddress(slabs) + warp * kTcSlabBytes;               // stage s: + s * kTcStageBytes
    uint32_t const eBase = sharedAddress(numerators);

    // The softmax row this lane works on (warp w owns rows 4w..4w+3, 8 lanes per row, 2 columns
    // each), and where the score fragments hold it: register r0, r0 + 1 of lane `source`.
    int const row = 4 * warp + lane / 8, pair = lane % 8;
    int const r0 = 8 * (row / 16) + 4 * (pair / 4) + 2 * (row % 16 / 8), source = 4 * (row % 8) + pair % 4;

    int const c0 = warp * slice;                  // first channel of this warp
    int const width = max(0, min(slice, C - c0)); // its channels, a multiple of 8 (0: an idle warp)
    int const chunks = width / 8;                 // 16-byte chunks per row it copies
    int const numTiles = (N + kTcTileN - 1) / kTcTileN;
    float const invQ = 1.f / float(Q);

    // Every warp runs all kSteps k-steps over both 16-row tiles, so the mma loops have no run-time
    // bounds (the compiler loads fragments ahead). What lies past this warp's channels or past Q
    // holds zeros and adds exact zeros: slab chunks never copied into are zeroed here once; query
    // rows and chunks past Q and C are zero-filled copies below.
    for (int e = lane; e < kStages * kTcTileN * kRowChunks; e += 32)
    {
        int const slabRow = e / kRowChunks, ch = e % kRowChunks; // over every stage
        if (ch >= chunks)
            *reinterpret_cast<uint4*>(slabs + (slabRow / kTcTileN) * kTcStageBytes + warp * kTcSlabBytes
                + (slabRow % kTcTileN) * kTcSlabPitch + ch * 16)
                = make_uint4(0, 0, 0, 0);
    }

    for (int item = blockIdx.x; item < frames * groups; item += gridDim.x)
    {
        int const f = item / groups, group = item % groups, next = (item + gridDim.x) / groups; // next frame
        int const rows = groups == 1 ? Q : min(16, Q - 16 * group);   // this item's queries
        T const* qf = queries + (size_t(f) * Q + 16 * group) * C;      // [rows, C]
        T const* pf = patches + size_t(f) * N * C;                     // [N, C]
        auto loadTile = [&](int tile, int stage) {  // patches[16 tile : +16, this warp's channels]
            if (lane < chunks)
            {
                T const* src = pf + size_t(tile) * kTcTileN * C + c0 + lane * 8;
                uint32_t const dst = pBase + stage * kTcStageBytes + lane * 16;
                int const real = min(kTcTileN, N - tile * kTcTileN);
                if (real == kTcTileN) // every tile but maybe the last: no per-row checks
#pragma unroll
                    for (int r = 0; r < kTcTileN; ++r, src += C)
                        copy16(dst + r * kTcSlabPitch, src, true);
                else
                    for (int r = 0; r < kTcTileN; ++r, src += C)
                        copy16(dst + r * kTcSlabPitch, r < real ? src : pf, r < real);
            }
        };
        // queries[:, this warp's channels], zero past Q and C; they join the first copy group
        for (int e = lane; e < kTcMaxQueries * kRowChunks; e += 32)
        {
            int const r = e / kRowChunks, ch = e % kRowChunks;
            bool const valid = r < rows && ch < chunks;
            copy16(qBase + r * kTcQueryPitch + ch * 16, valid ? qf + size_t(r) * C + c0 + ch * 8 : qf, valid);
        }
        for (int s = 0; s < kStages - 1; ++s)
        {
            if (s < numTiles)
                loadTile(s, s);
            commitCopies();
        }
        if (next < frames && next != f)
            prefetchRange(queries + size_t(next) * Q * C, Q * C * int(sizeof(T)));

        float acc[2][kAccTiles][4];
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < kAccTiles; ++j)
#pragma unroll
                for (int k = 0; k < 4; ++k)
                    acc[i][j][k] = 0.f;
        float rowMax = -INFINITY, rowSum = 0.f; // of `row`, the same in its 8 lanes

        for (int it = 0; it < numTiles; ++it)
        {
            __syncwarp(); // every lane is done reading the slab refilled now (tile it - 1)
            if (it + kStages - 1 < numTiles)
                loadTile(it + kStages - 1, (it + kStages - 1) % kStages);
            commitCopies();
            waitCopies<kStages - 1>();
            __syncwarp(); // tile it (and the queries) landed for every lane

            uint32_t const slab = pBase + (it % kStages) * kTcStageBytes;

            // partial scores over this warp's channels
            float s[2][2][4] = {};
#pragma unroll
            for (int k = 0; k < kSteps; ++k)
            {
                uint32_t b[4]; // patches 0-7 / 8-15 x channels 0-7, 8-15 of the step
                ldmatrix4(b, slab + (lane % 8 + lane / 16 * 8) * kTcSlabPitch + (k * 16 + lane / 8 % 2 * 8) * 2);
#pragma unroll
                for (int i = 0; i < kMTiles; ++i)
                {
                    uint32_t a[4];
                    ldmatrix4(a, qBase + (16 * i + lane % 8 + lane / 8 % 2 * 8) * kTcQueryPitch
                            + (k * 16 + lane / 16 * 8) * 2);
                    Mma<T>::run(s[i][0], a, b[0], b[1]);
                    Mma<T>::run(s[i][1], a, b[2], b[3]);
                }
            }
#pragma unroll
            for (int r = 0; r < 16; ++r)
                partial[(warp * 16 + r) * 32 + lane] = s[r / 8][r / 4 % 2][r % 4];
            __syncthreads();

            // online softmax of this warp's 4 rows: the scores summed over the warps in warp order,
            // the row's max and sum over its 8 lanes; numerators and alpha out to shared memory
            {
                float t[2] = {0.f, 0.f};
#pragma unroll
                for (int g = 0; g < kTcWarps; ++g)
#pragma unroll
                    for (int c = 0; c < 2; ++c)
                        t[c] += partial[(g * 16 + r0 + c) * 32 + source];
                int const n = it * kTcTileN + 2 * pair;
#pragma unroll
                for (int c = 0; c < 2; ++c)
                    t[c] = n + c < N ? scale2 * t[c] : -INFINITY;
                float tileMax = fmaxf(t[0], t[1]);
#pragma unroll
                for (int offset = 1; offset < 8; offset *= 2)
                    tileMax = fmaxf(tileMax, __shfl_xor_sync(0xffffffffu, tileMax, offset));
                float const alpha = raiseRunningMax(rowMax, tileMax);
                float const e0 = softmaxNumerator<T>(t[0], rowMax), e1 = softmaxNumerator<T>(t[1], rowMax);
                float sum = e0 + e1;
#pragma unroll
                for (int offset = 1; offset < 8; offset *= 2)
                    sum += __shfl_xor_sync(0xffffffffu, sum, offset);
                rowSum = rowSum * alpha + sum;
                *reinterpret_cast<uint32_t*>(numerators + row * kTcNumeratorPitch + 4 * pair) = Mma<T>::pack(e0, e1);
                if (pair == 0)
                    rowAlpha[row] = alpha;
            }
            __syncthreads();

            // e: the numerators as A fragments; the accumulators rescaled where a row's max moved
            uint32_t e[2][4];
            float alpha[2][2] = {{1.f, 1.f}, {1.f, 1.f}};
#pragma unroll
            for (int i = 0; i < kMTiles; ++i)
            {
                ldmatrix4(e[i], eBase + (16 * i + lane % 8 + lane / 8 % 2 * 8) * kTcNumeratorPitch + lane / 16 * 16);
#pragma unroll
                for (int h = 0; h < 2; ++h)
                    alpha[i][h] = rowAlpha[16 * i + 8 * h + lane / 4];
            }
            bool const moved = alpha[0][0] != 1.f || alpha[0][1] != 1.f || alpha[1][0] != 1.f || alpha[1][1] != 1.f;
            if (__any_sync(0xffffffffu, moved))
#pragma unroll
                for (int i = 0; i < kMTiles; ++i)
#pragma unroll
                    for (int j = 0; j < kAccTiles; ++j)
#pragma unroll
                        for (int k = 0; k < 4; ++k)
                            acc[i][j][k] *= alpha[i][k / 2];

            // weighted sum: acc[32 x slice] += e . patches[16 x slice]
#pragma unroll
            for (int k = 0; k < kSteps; ++k)
            {
                uint32_t b[4]; // channels 16k..16k+7 (b0, b1) and 16k+8.. (b2, b3) x patches 0-15
                ldmatrix4Trans(b, slab + (lane % 8 + lane / 8 % 2 * 8) * kTcSlabPitch + (k * 16 + lane / 16 * 8) * 2);
#pragma unroll
                for (int i = 0; i < kMTiles; ++i)
                {
                    Mma<T>::run(acc[i][2 * k], e[i], b[0], b[1]);
                    Mma<T>::run(acc[i][2 * k + 1], e[i], b[2], b[3]);
                }
            }
        }

        // context[c] = (1/Q) sum_q acc[q][c] / l[q]: this thread's 4 rows, then the 8 row groups
        if (pair == 0)
            rowInvSum[row] = row < rows ? 1.f / rowSum : 0.f;
        __syncthreads();
        float invSum[2][2];
#pragma unroll
        for (int i = 0; i < kMTiles; ++i)
#pragma unroll
            for (int h = 0; h < 2; ++h)
                invSum[i][h] = rowInvSum[16 * i + 8 * h + lane / 4];
        T* out = context + size_t(f) * C + c0;                   // this warp's channels of [1, C]
        float* partOut = split + (size_t(f) * 2 + group) * C + c0; // groups == 2: of [2, C]
#pragma unroll
        for (int j = 0; j < kAccTiles; ++j)
        {
            float v[2] = {0.f, 0.f};
#pragma unroll
            for (int i = 0; i < kMTiles; ++i)
#pragma unroll
                for (int k = 0; k < 4; ++k)
                    v[k % 2] += acc[i][j][k] * invSum[i][k / 2];
#pragma unroll
            for (int offset = 4; offset < 32; offset *= 2)
            {
                v[0] += __shfl_xor_sync(0xffffffffu, v[0], offset);
                v[1] += __shfl_xor_sync(0xffffffffu, v[1], offset);
            }
            int const c = 8 * j + 2 * lane; // within this warp's channels
            if (lane < 4 && c < width && groups == 1)
            {
                out[c] = fromFloat<T>(v[0] * invQ);
                out[c + 1] = fromFloat<T>(v[1] * invQ);
            }
            else if (lane < 4 && c < width)
            {
                partOut[c] = v[0] * invQ;
                partOut[c + 1] = v[1] * invQ;
            }
        }
    }
    waitCopies<0>(); // nothing left in flight when the block exits
#endif
}

// context[f] = split[f][0] + split[f][1], rounded once to T.
template <typename T>
__global__ void combineGroups(float const* __restrict__ split, T* __restrict__ context, int frames, int C)
{
    size_t const count = size_t(frames) * C, stride = size_t(gridDim.x) * blockDim.x;
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < count; i += stride)
    {
        size_t const f = i / C, c = i % C;
        context[i] = fromFloat<T>(split[2 * f * C + c] + split[(2 * f + 1) * C + c]);
    }
}

template <typename T, int kStages, int kMTiles>
cudaError_t launchKernel(T const* queries, T const* patches, T* context, float* split, int frames, int groups, int Q,
    int N, int C, float scale, int resident, cudaStream_t stream)
{
    auto kernel = tensorCoreKernel<T, kStages, kMTiles>;
    size_t const bytes = tcSharedBytes(kStages);
    cudaError_t const status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
    if (status != cudaSuccess)
        return status;
    int const items = frames * groups;
    kernel<<<unsigned(std::min(items, resident)), kTcThreads, bytes, stream>>>(
        queries, patches, context, split, frames, groups, Q, N, C, scale * kLog2e, tcSlice(C));
    return cudaGetLastError();
}

template <typename T, int kStages>
cudaError_t launchWithStages(T const* queries, T const* patches, T* context, int frames, int Q, int N, int C,
    float scale, void* workspace, size_t workspaceBytes, cudaStream_t stream)
{
    int device = 0, processors = 0;
    cudaError_t status = cudaGetDevice(&device);
    if (status == cudaSuccess)
        status = cudaDeviceGetAttribute(&processors, cudaDevAttrMultiProcessorCount, device);
    if (status != cudaSuccess)
        return status;
    // one block per SM (registers and shared memory); two per frame while that still fits in one wave
    bool const split = Q > 16 && 2 * int64_t(frames) <= processors && workspace
        && workspaceBytes >= tensorCoreWorkspaceBytes(frames, C);
    if (!split)
        return launchKernel<T, kStages, 2>(
            queries, patches, context, nullptr, frames, 1, Q, N, C, scale, processors, stream);
    auto* parts = static_cast<float*>(workspace);
    status = launchKernel<T, kStages, 1>(
        queries, patches, context, parts, frames, 2, Q, N, C, scale, processors, stream);
    if (status != cudaSuccess)
        return status;
    combineGroups<T><<<unsigned((int64_t(frames) * C + 255) / 256), 256, 0, stream>>>(parts, context, frames, C);
    return cudaGetLastError();
}

} // namespace

int tensorCoreStages(int maxShared)
{
    for (int stages = 2; stages >= 1; --stages)
        if (tcSharedBytes(stages) <= size_t(maxShared))
            return stages;
    return 0;
}

template <typename T>
int tensorCoreKernelArch()
{
    cudaFuncAttributes attributes{};
    if (cudaFuncGetAttributes(&attributes, tensorCoreKernel<T, 1, 2>) != cudaSuccess)
    {
        cudaGetLastError(); // not sticky: clear it
        return 0;
    }
    return attributes.ptxVersion;
}

size_t tensorCoreWorkspaceBytes(int64_t frames, int32_t channels)
{
    return size_t(frames) * 2 * size_t(channels) * sizeof(float);
}

template <typename T>
cudaError_t launchTensorCores(T const* queries, T const* patches, T* context, int64_t frames, int32_t numQueries,
    int32_t numPatches, int32_t channels, float scale, int stages, void* workspace, size_t workspaceBytes,
    cudaStream_t stream)
{
    if (stages >= 2)
        return launchWithStages<T, 2>(queries, patches, context, int(frames), numQueries, numPatches, channels, scale,
            workspace, workspaceBytes, stream);
    return launchWithStages<T, 1>(queries, patches, context, int(frames), numQueries, numPatches, channels, scale,
        workspace, workspaceBytes, stream);
}

template int tensorCoreKernelArch<__half>();
template int tensorCoreKernelArch<__nv_bfloat16>();
template cudaError_t launchTensorCores<__half>(__half const*, __half const*, __half*, int64_t, int32_t, int32_t,
    int32_t, float, int, void*, size_t, cudaStream_t);
template cudaError_t launchTensorCores<__nv_bfloat16>(__nv_bfloat16 const*, __nv_bfloat16 const*, __nv_bfloat16*,
    int64_t, int32_t, int32_t, int32_t, float, int, void*, size_t, cudaStream_t);

} // namespace ca
} // namespace llamavid
