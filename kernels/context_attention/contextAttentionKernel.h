// ContextAttention CUDA kernel launcher (no TensorRT in here).
//
//   queries [F, Q, C], patches [F, N, C]  ->  context [F, 1, C]
//   context[f] = (1/Q) sum_q softmax_n(scale * queries[f,q] . patches[f,n]) patches[f,n]
//
// T is float or __half for all three tensors; accumulation is fp32. See README.md.
#pragma once

#include <cstdint>

#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

namespace llamavid
{
namespace ca
{

// Where a block keeps its Q x N scores. kAuto keeps them in shared memory when they fit the
// device's opt-in limit and otherwise streams them (recomputed per pass, no extra memory).
enum class ScoreStorage : int32_t
{
    kAuto = 0,
    kStreaming = 1,
};

// Enqueues the op on `stream`. All pointers are device pointers of contiguous row-major
// tensors. Returns cudaErrorInvalidValue for sizes < 1 (frames == 0 is a no-op) or when even
// the streaming path exceeds the device's shared memory, else the launch status.
template <typename T>
cudaError_t launchContextAttention(T const* queries, T const* patches, T* context, int64_t frames,
    int32_t numQueries, int32_t numPatches, int32_t channels, float scale, cudaStream_t stream,
    ScoreStorage storage = ScoreStorage::kAuto);

extern template cudaError_t launchContextAttention<float>(
    float const*, float const*, float*, int64_t, int32_t, int32_t, int32_t, float, cudaStream_t, ScoreStorage);
extern template cudaError_t launchContextAttention<__half>(
    __half const*, __half const*, __half*, int64_t, int32_t, int32_t, int32_t, float, cudaStream_t, ScoreStorage);

} // namespace ca
} // namespace llamavid
