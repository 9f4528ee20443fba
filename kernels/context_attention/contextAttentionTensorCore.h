// The tensor-core ContextAttention kernel (fp16 / bf16), internal to the launcher in
// contextAttentionKernel.cu. See contextAttentionTensorCore.cu and README.md.
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

// The pipeline depth (patch tiles in shared memory) the tensor-core kernel uses within maxShared
// bytes per block: 2, 1, or 0 when not even one tile fits.
int tensorCoreStages(int maxShared);

// Compute capability the tensor-core kernel of T was compiled for on the current device (e.g. 90),
// 0 when its image does not load there; the kernel body exists only for 80 and newer.
template <typename T>
int tensorCoreKernelArch();

// Workspace that lets the tensor-core kernel split a frame over two blocks (used when 2F <= SMs).
size_t tensorCoreWorkspaceBytes(int64_t frames, int32_t channels);

// Enqueues the tensor-core kernel. The caller (launchContextAttention) has checked what
// Algorithm::kAuto checks: Q <= 32, C <= kTcMaxChannels and C % 8 == 0, 16-byte aligned
// buffers, stages = tensorCoreStages(maxShared) >= 1, tensorCoreKernelArch<T>() >= 80.
// workspace (device memory, may be null) is used when workspaceBytes >= tensorCoreWorkspaceBytes.
template <typename T>
cudaError_t launchTensorCores(T const* queries, T const* patches, T* context, int64_t frames, int32_t numQueries,
    int32_t numPatches, int32_t channels, float scale, int stages, void* workspace, size_t workspaceBytes,
    cudaStream_t stream);

extern template int tensorCoreKernelArch<__half>();
extern template int tensorCoreKernelArch<__nv_bfloat16>();
extern template cudaError_t launchTensorCores<__half>(__half const*, __half const*, __half*, int64_t, int32_t, int32_t,
    int32_t, float, int, void*, size_t, cudaStream_t);
extern template cudaError_t launchTensorCores<__nv_bfloat16>(__nv_bfloat16 const*, __nv_bfloat16 const*,
    __nv_bfloat16*, int64_t, int32_t, int32_t, int32_t, float, int, void*, size_t, cudaStream_t);

} // namespace ca
} // namespace llamavid
