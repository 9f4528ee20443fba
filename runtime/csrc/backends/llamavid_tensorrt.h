/* llamavid_tensorrt.h -- the TensorRT backend of the LLaMA-VID core (tensorrt.cpp, C++17 inside, C outside).
 *
 * A shared library (libllamavid_tensorrt*.so: `pip install -e .` builds it where TensorRT's headers and libnvinfer
 * are installed; runtime/csrc/examples/README.md has the g++ line) that the core loads by path:
 *
 *   llamavid_backend *trt;
 *   const char *keys[] = {"plugin_library"}, *values[] = {"build/kernels/libllamavid_trt_plugins.so"};
 *   llamavid_error *e = llamavid_backend_load("runtime/libllamavid_tensorrt.so", keys, values, 1, &trt);
 *   ... llamavid_model_params.backends = {..., trt} ... llamavid_model_open ... llamavid_model_free ...
 *   llamavid_backend_unload(trt);
 *
 * Options (strings, all optional):
 *   device          the CUDA device ordinal, default "0"; each call makes it the calling thread's current device
 *   plugin_library  the ContextAttention plugin library (python -m kernels.build writes
 *                   build/kernels/libllamavid_trt_plugins.so), loaded into the runtime's plugin registry; engines
 *                   holding the plugin need it. Default: none
 *   precision       run only variants of this precision ("fp32", "fp16", "bf16", "int8"); default: any
 *
 * It runs the variants whose backend is "tensorrt" and whose file ends in ".engine" (an ONNX file of backend
 * "tensorrt" is an engine's source: left to the next backend). Opening one checks the manifest's built_with (the
 * TensorRT version and GPU SM the engine was built for) against this machine, and the engine's I/O tensors against
 * the manifest's names and dtypes. Each session gets its own IExecutionContext, CUDA stream and device buffers
 * (grown only when a larger shape arrives); a call copies the core's host buffers in, runs enqueueV3, copies the
 * outputs back and waits for the stream. Sessions run concurrently; errors name the engine file and the tensor.
 */
#ifndef LLAMAVID_TENSORRT_H
#define LLAMAVID_TENSORRT_H

#include "llamavid.h"

#ifdef __cplusplus
extern "C" {
#endif

#define LLAMAVID_TENSORRT_API __attribute__((visibility("default")))

/* The entry points llamavid_backend_load looks up (llamavid.h: "backends in shared libraries"); a host may also
 * link the library and call them directly with llamavid_error_new. */
LLAMAVID_TENSORRT_API llamavid_error *llamavid_backend_create(int32_t api_version, llamavid_error_new_fn error_new,
                                                              const char *const *keys, const char *const *values,
                                                              int32_t n, llamavid_backend **out);
LLAMAVID_TENSORRT_API void llamavid_backend_free(llamavid_backend *backend);

#ifdef __cplusplus
}
#endif
#endif /* LLAMAVID_TENSORRT_H */
