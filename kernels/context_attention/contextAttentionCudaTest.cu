// Test-only C entry point around launchContextAttention: copies host arrays to the current GPU,
// runs the kernel, copies the context back. Built by kernels.build.build_cuda_test for
// tests/test_gpu_context_attention.py (ctypes); not part of the plugin library.
#include "contextAttentionKernel.h"

#include <cstddef>
#include <cstdint>

namespace
{

template <typename T>
cudaError_t runOnDevice(void const* hostQueries, void const* hostPatches, void* hostContext, int64_t frames, int Q,
    int N, int C, float scale, llamavid::ca::ScoreStorage storage)
{
    size_t const qBytes = size_t(frames) * Q * C * sizeof(T);
    size_t const pBytes = size_t(frames) * N * C * sizeof(T);
    size_t const cBytes = size_t(frames) * C * sizeof(T);
    T* queries = nullptr;
    T* patches = nullptr;
    T* context = nullptr;
    cudaError_t status = cudaMalloc(&queries, qBytes);
    if (status == cudaSuccess)
        status = cudaMalloc(&patches, pBytes);
    if (status == cudaSuccess)
        status = cudaMalloc(&context, cBytes);
    if (status == cudaSuccess)
        status = cudaMemcpy(queries, hostQueries, qBytes, cudaMemcpyHostToDevice);
    if (status == cudaSuccess)
        status = cudaMemcpy(patches, hostPatches, pBytes, cudaMemcpyHostToDevice);
    if (status == cudaSuccess)
        status = llamavid::ca::launchContextAttention<T>(
            queries, patches, context, frames, Q, N, C, scale, nullptr, storage);
    if (status == cudaSuccess)
        status = cudaDeviceSynchronize();
    if (status == cudaSuccess)
        status = cudaMemcpy(hostContext, context, cBytes, cudaMemcpyDeviceToHost);
    cudaFree(queries);
    cudaFree(patches);
    cudaFree(context);
    return status;
}

} // namespace

// dtype 0: float32, 1: float16 (16-bit patterns). storage 0: auto, 1: force the streaming path.
// Returns the cudaError_t value (0 on success).
extern "C" __attribute__((visibility("default"))) int ca_cuda_context_attention(int dtype, void const* queries,
    void const* patches, void* context, int64_t frames, int Q, int N, int C, float scale, int storage)
{
    if (frames < 1)
        return int(cudaErrorInvalidValue);
    auto const path = storage ? llamavid::ca::ScoreStorage::kStreaming : llamavid::ca::ScoreStorage::kAuto;
    return int(dtype ? runOnDevice<__half>(queries, patches, context, frames, Q, N, C, scale, path)
                     : runOnDevice<float>(queries, patches, context, frames, Q, N, C, scale, path));
}
