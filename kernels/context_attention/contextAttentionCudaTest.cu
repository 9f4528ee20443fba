// C entry points around launchContextAttention for Python (ctypes), not part of the plugin
// library. Built by kernels.build.build_cuda_test for tests/test_gpu_context_attention.py (host
// arrays: copy in, run, copy back) and kernels/bench.py (device pointers, the caller's stream).
//
// dtype 0: float32, 1: float16, 2: bfloat16 (16-bit buffers as their bit patterns).
// storage 0: auto, 1: force the streaming path (CUDA cores). algorithm: the Algorithm values
// (0 auto, 1 CUDA cores, 2 tensor cores). workspace: the launcher's optional workspace (device
// memory, contextAttentionWorkspaceBytes(frames, C)), or null. Functions return the cudaError_t
// value (0 on success).
#include "contextAttentionKernel.h"

#include <cstddef>
#include <cstdint>

#define CA_EXPORT extern "C" __attribute__((visibility("default")))

namespace
{

using llamavid::ca::Algorithm;
using llamavid::ca::ScoreStorage;

struct Launch
{
    int64_t frames;
    int Q, N, C;
    float scale;
    int storage, algorithm;
    void* workspace;
    cudaStream_t stream;
};

template <typename T>
cudaError_t launch(void const* queries, void const* patches, void* context, Launch const& a)
{
    size_t const workspaceBytes = a.workspace ? llamavid::ca::contextAttentionWorkspaceBytes(a.frames, a.C) : 0;
    return llamavid::ca::launchContextAttention<T>(static_cast<T const*>(queries), static_cast<T const*>(patches),
        static_cast<T*>(context), a.frames, a.Q, a.N, a.C, a.scale, a.stream,
        a.storage ? ScoreStorage::kStreaming : ScoreStorage::kAuto, static_cast<Algorithm>(a.algorithm), a.workspace,
        workspaceBytes);
}

cudaError_t launchAny(int dtype, void const* queries, void const* patches, void* context, Launch const& a)
{
    switch (dtype)
    {
    case 0: return launch<float>(queries, patches, context, a);
    case 1: return launch<__half>(queries, patches, context, a);
    case 2: return launch<__nv_bfloat16>(queries, patches, context, a);
    default: return cudaErrorInvalidValue;
    }
}

} // namespace

// Host arrays: copies them to the current GPU, runs, synchronizes, copies the context back.
// useWorkspace: give the launcher its optional workspace.
CA_EXPORT int ca_cuda_context_attention(int dtype, void const* hostQueries, void const* hostPatches,
    void* hostContext, int64_t frames, int Q, int N, int C, float scale, int storage, int algorithm, int useWorkspace)
{
    if (frames < 1 || Q < 1 || N < 1 || C < 1 || dtype < 0 || dtype > 2)
        return int(cudaErrorInvalidValue);
    size_t const element = dtype ? 2 : 4;
    size_t const qBytes = size_t(frames) * Q * C * element;
    size_t const pBytes = size_t(frames) * N * C * element;
    size_t const cBytes = size_t(frames) * C * element;
    void* queries = nullptr;
    void* patches = nullptr;
    void* context = nullptr;
    void* workspace = nullptr;
    cudaError_t status = cudaMalloc(&queries, qBytes);
    if (status == cudaSuccess && useWorkspace)
        status = cudaMalloc(&workspace, llamavid::ca::contextAttentionWorkspaceBytes(frames, C));
    if (status == cudaSuccess)
        status = cudaMalloc(&patches, pBytes);
    if (status == cudaSuccess)
        status = cudaMalloc(&context, cBytes);
    if (status == cudaSuccess) // poisoned: a NaN in every 16-bit / 32-bit slot the kernel fails to write
        status = cudaMemset(context, 0xff, cBytes);
    if (status == cudaSuccess)
        status = cudaMemcpy(queries, hostQueries, qBytes, cudaMemcpyHostToDevice);
    if (status == cudaSuccess)
        status = cudaMemcpy(patches, hostPatches, pBytes, cudaMemcpyHostToDevice);
    if (status == cudaSuccess)
    {
        Launch const args{frames, Q, N, C, scale, storage, algorithm, workspace, nullptr};
        status = launchAny(dtype, queries, patches, context, args);
    }
    if (status == cudaSuccess)
        status = cudaDeviceSynchronize();
    if (status == cudaSuccess)
        status = cudaMemcpy(hostContext, context, cBytes, cudaMemcpyDeviceToHost);
    cudaFree(queries);
    cudaFree(patches);
    cudaFree(context);
    cudaFree(workspace);
    return int(status);
}

// Device pointers, enqueued on `stream` (no synchronization): the bench times this.
CA_EXPORT int ca_cuda_launch(int dtype, void const* queries, void const* patches, void* context, int64_t frames, int Q,
    int N, int C, float scale, int algorithm, void* workspace, void* stream)
{
    Launch const args{frames, Q, N, C, scale, 0, algorithm, workspace, static_cast<cudaStream_t>(stream)};
    return int(launchAny(dtype, queries, patches, context, args));
}

CA_EXPORT uint64_t ca_cuda_workspace_bytes(int64_t frames, int C)
{
    return llamavid::ca::contextAttentionWorkspaceBytes(frames, C);
}

// The Algorithm that auto picks for device buffers of these sizes (1 CUDA cores, 2 tensor cores).
CA_EXPORT int ca_cuda_auto_algorithm(int dtype, void const* queries, void const* patches, int Q, int C)
{
    using llamavid::ca::chooseAlgorithm;
    switch (dtype)
    {
    case 1: return int(chooseAlgorithm(static_cast<__half const*>(queries), static_cast<__half const*>(patches), Q, C));
    case 2: return int(chooseAlgorithm(
        static_cast<__nv_bfloat16 const*>(queries), static_cast<__nv_bfloat16 const*>(patches), Q, C));
    default: return int(Algorithm::kCudaCores);
    }
}

// bf16Support: *supported 0/1, the kernel image's and the device's compute capability.
CA_EXPORT int ca_cuda_bf16_support(int* supported, int* kernelArch, int* deviceArch)
{
    bool ok = false;
    cudaError_t const status = llamavid::ca::bf16Support(&ok, kernelArch, deviceArch);
    *supported = ok ? 1 : 0;
    return int(status);
}
