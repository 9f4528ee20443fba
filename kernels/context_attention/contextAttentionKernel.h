// ContextAttention CUDA kernel launcher (no TensorRT in here).
//
//   queries [F, Q, C], patches [F, N, C]  ->  context [F, 1, C]
//   context[f] = (1/Q) sum_q softmax_n(scale * queries[f,q] . patches[f,n]) patches[f,n]
//
// T is float, __half or __nv_bfloat16 for all three tensors; accumulation is fp32. See README.md.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

namespace llamavid
{
namespace ca
{

// Which kernel runs. kAuto takes the tensor cores where they apply (fp16 / bf16, Q <= 32,
// C <= 1408 and a multiple of 8, 16-byte aligned buffers, an sm_80+ build and device, the
// shared memory of one block) and the CUDA cores otherwise. Forcing kTensorCores where they do
// not apply returns cudaErrorNotSupported.
enum class Algorithm : int32_t
{
    kAuto = 0,
    kCudaCores = 1,   // fp32 FMAs; scores kept or streamed (ScoreStorage)
    kTensorCores = 2, // mma.sync with fp32 accumulation, one pass with an online softmax
};

// Where the CUDA-core kernel keeps its Q x N scores. kAuto keeps them in shared memory when they
// fit the device's opt-in limit and otherwise streams them (recomputed per pass, no extra memory).
enum class ScoreStorage : int32_t
{
    kAuto = 0,
    kStreaming = 1,
};

// Enqueues the op on `stream`. All pointers are device pointers of contiguous row-major
// tensors. Returns cudaErrorInvalidValue for sizes < 1 (frames == 0 is a no-op) or when even
// the streaming path exceeds the device's shared memory, cudaErrorNoKernelImageForDevice for
// bfloat16 without an sm_80+ kernel image for the device (bf16Support), else the launch status.
// workspace (optional, device memory of workspaceBytes >= contextAttentionWorkspaceBytes) lets
// the tensor-core kernel give a frame two blocks when there are fewer than half as many frames as
// SMs; without it each frame gets one block (same result up to fp32 rounding).
template <typename T>
cudaError_t launchContextAttention(T const* queries, T const* patches, T* context, int64_t frames,
    int32_t numQueries, int32_t numPatches, int32_t channels, float scale, cudaStream_t stream,
    ScoreStorage storage = ScoreStorage::kAuto, Algorithm algorithm = Algorithm::kAuto, void* workspace = nullptr,
    size_t workspaceBytes = 0);

// The workspace launchContextAttention can use for `frames` frames of `channels` channels.
size_t contextAttentionWorkspaceBytes(int64_t frames, int32_t channels);

// Whether this build runs bfloat16 on the current device: its bf16 kernels exist only for sm_80
// and newer (the tensor cores' bf16 mma, and bf16 arithmetic). kernelArch: the compute
// capability the kernel image was compiled for (0 when none loads on the device); deviceArch:
// the device's. Returns the CUDA status of the queries (an error when there is no device).
cudaError_t bf16Support(bool* supported, int* kernelArch, int* deviceArch);

// The algorithm kAuto picks for these sizes on the current device (no launch).
template <typename T>
Algorithm chooseAlgorithm(T const* queries, T const* patches, int32_t numQueries, int32_t channels);

#define LLAMAVID_CA_DECLARE(T)                                                                                       \
    extern template cudaError_t launchContextAttention<T>(T const*, T const*, T*, int64_t, int32_t, int32_t, int32_t, \
        float, cudaStream_t, ScoreStorage, Algorithm, void*, size_t);                                                 \
    extern template Algorithm chooseAlgorithm<T>(T const*, T const*, int32_t, int32_t);
LLAMAVID_CA_DECLARE(float)
LLAMAVID_CA_DECLARE(__half)
LLAMAVID_CA_DECLARE(__nv_bfloat16)
#undef LLAMAVID_CA_DECLARE

} // namespace ca
} // namespace llamavid
