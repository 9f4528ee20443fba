// tensorrt.cpp -- the TensorRT backend on the core's backend table (llamavid.h); llamavid_tensorrt.h says how to
// load it and lists its options.
//
//   create        a CUDA device, an IRuntime, the ContextAttention plugin library loaded into its registry
//   open_stage    a variant of backend "tensorrt" whose file is an .engine: built_with checked against this
//                 machine, the engine deserialized, its I/O tensors checked against the manifest's names and dtypes
//   open_context  per session: an IExecutionContext, a CUDA stream, a device buffer per tensor
//   run           inputs: setInputShape          outputs: shape from the context (another shape than the core's is
//                 reported to the core, nothing runs);   then per tensor: buffer grown if too small,
//                 setTensorAddress, H2D copy of each input;   enqueueV3;   D2H copy of each output;   stream sync
//
// No exception crosses the C ABI: every entry point runs its body inside guard(), which turns them into llamavid
// errors made with the host's error_new (the library uses no symbol of the core). TensorRT objects are not
// thread-safe, so deserializing and making or destroying contexts take the backend's mutex; runs on different
// contexts go concurrently, as TensorRT allows.
#include "llamavid_tensorrt.h"

#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace
{

// ---- errors -------------------------------------------------------------------------------------------------------
struct Failure
{
    llamavid_code code;
    std::string message;
};

std::string format(char const* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(char const* fmt, ...)
{
    char buf[2048];
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return buf;
}

[[noreturn]] void fail(std::string message, llamavid_code code = LLAMAVID_ERR_BACKEND)
{
    throw Failure{code, std::move(message)};
}

// Runs body; a thrown Failure or C++ exception becomes the returned error.
template <typename Body>
llamavid_error* guard(llamavid_error_new_fn errorNew, Body&& body) noexcept
{
    try
    {
        body();
        return nullptr;
    }
    catch (Failure const& f)
    {
        return errorNew(f.code, "%s", f.message.c_str());
    }
    catch (std::bad_alloc const&)
    {
        return errorNew(LLAMAVID_ERR_MEMORY, "tensorrt: out of host memory");
    }
    catch (std::exception const& e)
    {
        return errorNew(LLAMAVID_ERR_BACKEND, "tensorrt: unexpected C++ exception: %s", e.what());
    }
    catch (...)
    {
        return errorNew(LLAMAVID_ERR_BACKEND, "tensorrt: unexpected C++ exception");
    }
}

// call: what was called, e.g. "cudaMemcpyAsync of input"; tensor: its name, if any.
void check(cudaError_t status, char const* call, char const* tensor = "")
{
    if (status != cudaSuccess)
        fail(format("%s%s%s failed: %s (%d): %s", call, *tensor ? " " : "", tensor, cudaGetErrorName(status),
            int(status), cudaGetErrorString(status)));
}

// TensorRT reports why a call failed through its logger: the last error of this thread, kept for the message.
std::string& lastError()
{
    thread_local std::string text;
    return text;
}

std::string takeError()
{
    std::string e = lastError().empty() ? "TensorRT logged no error" : lastError();
    lastError().clear();
    return e;
}

struct Logger : ILogger
{
    void log(Severity severity, AsciiChar const* msg) noexcept override
    {
        if (severity > Severity::kWARNING)
            return;
        std::fprintf(stderr, "[tensorrt] %s\n", msg);
        try
        {
            if (severity <= Severity::kERROR)
                lastError() = msg;
        }
        catch (...)
        {
        }
    }
};

// ---- tensors ----------------------------------------------------------------------------------------------------------
// The core's dtype of a TensorRT I/O type, 0 where the core has none.
llamavid_dtype fromTensorrt(DataType t)
{
    switch (t)
    {
    case DataType::kFLOAT: return LLAMAVID_F32;
    case DataType::kHALF: return LLAMAVID_F16;
    case DataType::kBF16: return LLAMAVID_BF16;
    case DataType::kINT64: return LLAMAVID_I64;
    case DataType::kINT32: return LLAMAVID_I32;
    case DataType::kUINT8: return LLAMAVID_U8;
    default: return llamavid_dtype(0);
    }
}

std::string dtypeName(llamavid_dtype t)
{
    static char const* const names[] = {"?", "float32", "float16", "bfloat16", "int64", "int32", "uint8"};
    return t >= LLAMAVID_F32 && t <= LLAMAVID_U8 ? names[t] : format("dtype %d", int(t));
}

size_t dtypeSize(llamavid_dtype t)
{
    return t == LLAMAVID_I64 ? 8 : t == LLAMAVID_F32 || t == LLAMAVID_I32 ? 4 : t == LLAMAVID_U8 ? 1 : 2;
}

std::string shapeText(int64_t const* d, int32_t n)
{
    std::string s = "[";
    for (int32_t i = 0; i < n; ++i)
        s += (i ? "," : "") + std::to_string(d[i]);
    return s + "]";
}

std::string shapeText(Dims const& d)
{
    return shapeText(d.d, std::max(d.nbDims, 0));
}

size_t bytes(llamavid_tensor const& t)
{
    size_t n = dtypeSize(t.dtype);
    for (int32_t i = 0; i < t.ndim; ++i)
        n *= size_t(t.shape[i]);
    return n;
}

// ---- backend, stage, context ------------------------------------------------------------------------------------
struct Backend
{
    llamavid_backend table{};      // what the core holds; table.user is this
    llamavid_error_new_fn errorNew{};
    int device = 0;
    int sm = 0;                    // this GPU's compute capability, e.g. 87
    int version = 0;               // TensorRT here: (major * 100 + minor) * 100 + patch
    std::string precision, pluginLibrary, pluginState = "none given (option plugin_library)";
    Logger logger;
    std::unique_ptr<IRuntime> runtime;
    void* plugins = nullptr;       // the plugin library's handle in the runtime's registry
    std::mutex mutex;

    ~Backend()
    {
        if (plugins)
            runtime->getPluginRegistry().deregisterLibrary(plugins);
    }
};

struct Tensor
{
    std::string name;
    bool input;
    llamavid_dtype dtype;
};

struct Stage
{
    Backend* backend;
    std::string file;
    std::unique_ptr<ICudaEngine> engine;
    std::vector<Tensor> io;        // the manifest's inputs, then its outputs

    size_t find(llamavid_tensor const& t, bool input) const
    {
        for (size_t k = 0; k < io.size(); ++k)
            if (io[k].input == input && io[k].name == t.name)
            {
                if (io[k].dtype != t.dtype)
                    fail(format("%s %s: expected %s, found %s", input ? "input" : "output", t.name,
                        dtypeName(io[k].dtype).c_str(), dtypeName(t.dtype).c_str()));
                return k;
            }
        fail(format("%s %s: expected one of the engine's %s", input ? "input" : "output", t.name,
            input ? "inputs" : "outputs"));
    }
};

struct Context
{
    std::unique_ptr<IExecutionContext> exec;
    cudaStream_t stream = nullptr;
    std::vector<std::pair<void*, size_t>> buffers;   // per Stage::io entry: device memory, its bytes

    // The device buffer of tensor k, reallocated only when `need` bytes do not fit.
    void* grow(size_t k, size_t need, char const* name)
    {
        auto& [ptr, size] = buffers[k];
        if (ptr && need <= size)
            return ptr;
        if (ptr)
            check(cudaFree(ptr), "cudaFree of the buffer of", name);
        ptr = nullptr;
        size = 0;
        check(cudaMalloc(&ptr, std::max<size_t>(need, 1)), format("cudaMalloc of %zu bytes for", need).c_str(), name);
        size = std::max<size_t>(need, 1);
        return ptr;
    }

    ~Context()
    {
        for (auto& b : buffers)
            if (b.first)
                cudaFree(b.first);
        if (stream)
            cudaStreamDestroy(stream);
    }
};

// ---- open_stage -------------------------------------------------------------------------------------------------
// The value of `key` in built_with's "key=value;..." text, "" when absent.
std::string builtWith(char const* pairs, std::string const& key)
{
    std::string s = pairs ? pairs : "";
    for (size_t at = 0; at < s.size();)
    {
        size_t end = std::min(s.find(';', at), s.size()), eq = s.find('=', at);
        if (eq < end && s.compare(at, eq - at, key) == 0)
            return s.substr(eq + 1, end - eq - 1);
        at = end + 1;
    }
    return "";
}

// Engines run only on the TensorRT version and GPU architecture they were built for (export/trt.py builds
// neither version- nor hardware-compatible engines).
void checkBuiltWith(Backend const& b, llamavid_variant const& v, std::string const& dir)
{
    std::string trt = builtWith(v.built_with, "tensorrt"), sm = builtWith(v.built_with, "sm");
    int major = -1, minor = -1, patch = -1;
    std::sscanf(trt.c_str(), "%d.%d.%d", &major, &minor, &patch);
    bool sameVersion = trt.empty() || (major * 100 + minor) * 100 + patch == b.version;
    bool sameSm = sm.empty() || sm == std::to_string(b.sm);
    if (!sameVersion || !sameSm)
        fail(format("%s was built with TensorRT %s for sm_%s, this machine has TensorRT %d.%d.%d and sm_%d: rebuild the "
                    "engines here (python -m export.trt --artifacts %s) or run the stage's ONNX variants (ort-cuda, "
                    "ort-cpu)", v.file, trt.empty() ? "?" : trt.c_str(), sm.empty() ? "?" : sm.c_str(), b.version / 10000,
                    b.version / 100 % 100, b.version % 100, b.sm, dir.c_str()),
            LLAMAVID_ERR_MANIFEST);
}

std::vector<char> readFile(char const* path)
{
    std::ifstream f(path, std::ios::binary);
    std::vector<char> data((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    if (!f.good() && !f.eof())
        fail(format("%s: expected a readable engine file, found: %s", path, std::strerror(errno)), LLAMAVID_ERR_IO);
    return data;
}

// The manifest's tensors of the variant, each found in the engine with the same direction and dtype.
std::vector<Tensor> checkTensors(ICudaEngine& engine, llamavid_variant const& v, std::string const& dir)
{
    std::vector<std::string> problems;
    std::vector<Tensor> io;
    for (bool input : {true, false})
    {
        llamavid_tensor const* want = input ? v.inputs : v.outputs;
        int32_t n = input ? v.n_inputs : v.n_outputs;
        std::vector<std::string> have;                        // the engine's tensors of this direction
        for (int32_t i = 0; i < engine.getNbIOTensors(); ++i)
            if ((engine.getTensorIOMode(engine.getIOTensorName(i)) == TensorIOMode::kINPUT) == input)
                have.push_back(engine.getIOTensorName(i));
        std::string missing, extra;
        for (int32_t i = 0; i < n; ++i)
        {
            char const* name = want[i].name;
            if (std::find(have.begin(), have.end(), name) == have.end())
            {
                missing += (missing.empty() ? "" : ", ") + std::string(name);
                continue;
            }
            DataType type = engine.getTensorDataType(name);
            if (fromTensorrt(type) != want[i].dtype)
                problems.push_back(format("%s: manifest dtype %s, engine %s", name, dtypeName(want[i].dtype).c_str(),
                    fromTensorrt(type) ? dtypeName(fromTensorrt(type)).c_str() : format("DataType %d", int(type)).c_str()));
            if (engine.getTensorLocation(name) != TensorLocation::kDEVICE)
                problems.push_back(format("%s: expected a device tensor, found a host (shape) tensor", name));
            io.push_back({name, input, want[i].dtype});
        }
        for (auto const& name : have)
            if (std::none_of(want, want + n, [&](llamavid_tensor const& t) { return name == t.name; }))
                extra += (extra.empty() ? "" : ", ") + name;
        char const* kind = input ? "inputs" : "outputs";
        if (!missing.empty())
            problems.push_back(format("%s [%s] in the manifest, not in the engine", kind, missing.c_str()));
        if (!extra.empty())
            problems.push_back(format("%s [%s] in the engine, not in the manifest", kind, extra.c_str()));
    }
    if (!problems.empty())
    {
        std::string all;
        for (auto const& p : problems)
            all += (all.empty() ? "" : "; ") + p;
        fail(format("%s: the engine does not match the manifest: %s; rebuild it with python -m export.trt --artifacts %s",
                 v.file, all.c_str(), dir.c_str()),
            LLAMAVID_ERR_MANIFEST);
    }
    return io;
}

bool endsWith(std::string const& s, std::string const& tail)
{
    return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

llamavid_error* openStage(void* user, llamavid_variant const* v, void** out)
{
    auto* b = static_cast<Backend*>(user);
    *out = nullptr;
    return guard(b->errorNew, [&] {
        if (std::strcmp(v->backend, "tensorrt") != 0 || !endsWith(v->file, ".engine")
            || (!b->precision.empty() && b->precision != v->precision))
            return;                                           // not this backend's: the next one is tried
        std::string path = v->path, dir = path.substr(0, path.size() - std::strlen(v->file) - 1);
        checkBuiltWith(*b, *v, dir);
        std::vector<char> blob = readFile(v->path);
        auto st = std::make_unique<Stage>();
        st->backend = b;
        st->file = v->file;
        check(cudaSetDevice(b->device), "cudaSetDevice");
        {
            std::lock_guard<std::mutex> lock(b->mutex);
            st->engine.reset(b->runtime->deserializeCudaEngine(blob.data(), blob.size()));
        }
        if (!st->engine)
            fail(format("TensorRT could not deserialize the engine: %s; plugin library: %s", takeError().c_str(),
                b->pluginState.c_str()));
        st->io = checkTensors(*st->engine, *v, dir);
        *out = st.release();
    });
}

void closeStage(void* stage)
{
    auto* st = static_cast<Stage*>(stage);
    std::lock_guard<std::mutex> lock(st->backend->mutex);
    delete st;
}

// ---- contexts and runs ---------------------------------------------------------------------------------------------
llamavid_error* openContext(void* stage, void** out)
{
    auto* st = static_cast<Stage*>(stage);
    *out = nullptr;
    return guard(st->backend->errorNew, [&] {
        check(cudaSetDevice(st->backend->device), "cudaSetDevice");
        auto c = std::make_unique<Context>();
        c->buffers.resize(st->io.size());
        {
            std::lock_guard<std::mutex> lock(st->backend->mutex);
            c->exec.reset(st->engine->createExecutionContext());
        }
        if (!c->exec)
            fail(format("%s: createExecutionContext failed (out of device memory?): %s", st->file.c_str(),
                takeError().c_str()));
        check(cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
        *out = c.release();
    });
}

void closeContext(void* stage, void* context)
{
    std::lock_guard<std::mutex> lock(static_cast<Stage*>(stage)->backend->mutex);
    delete static_cast<Context*>(context);
}

std::string profile(ICudaEngine const& e, char const* name)
{
    return format("min %s, opt %s, max %s", shapeText(e.getProfileShape(name, 0, OptProfileSelector::kMIN)).c_str(),
        shapeText(e.getProfileShape(name, 0, OptProfileSelector::kOPT)).c_str(),
        shapeText(e.getProfileShape(name, 0, OptProfileSelector::kMAX)).c_str());
}

void runOnce(Stage const& st, Context& c, llamavid_tensor const* in, int32_t nIn, llamavid_tensor* out, int32_t nOut)
{
    IExecutionContext& x = *c.exec;
    check(cudaSetDevice(st.backend->device), "cudaSetDevice");
    if (size_t(nIn) + size_t(nOut) != st.io.size())
        fail(format("expected the manifest's %zu tensors, found %d inputs and %d outputs", st.io.size(), nIn, nOut));
    for (int32_t i = 0; i < nIn; ++i)
    {
        llamavid_tensor const& t = in[i];
        st.find(t, true);
        Dims d{};
        if (t.ndim < 1 || t.ndim > Dims::MAX_DIMS)
            fail(format("input %s: expected 1 to %d dims, found %d", t.name, Dims::MAX_DIMS, t.ndim));
        d.nbDims = t.ndim;
        std::copy(t.shape, t.shape + t.ndim, d.d);
        if (!x.setInputShape(t.name, d))
            fail(format("input %s %s is outside the engine's optimisation profile (%s): use fewer frames or a shorter "
                        "question, or rebuild the engine for larger ones (python -m export.trt --max-frames N --max-text N)",
                t.name, shapeText(t.shape, t.ndim).c_str(), profile(*st.engine, t.name).c_str()));
    }
    for (int32_t i = 0; i < nOut; ++i)
    {
        llamavid_tensor& t = out[i];
        st.find(t, false);
        Dims d = x.getTensorShape(t.name);
        if (d.nbDims < 0 || std::any_of(d.d, d.d + d.nbDims, [](int64_t v) { return v < 0; }))
            fail(format("output %s: TensorRT could not infer its shape (%s): %s", t.name, shapeText(d).c_str(),
                takeError().c_str()));
        if (d.nbDims != t.ndim || !std::equal(d.d, d.d + d.nbDims, t.shape))
        {                                                     // the core reports the mismatch; nothing runs
            t.ndim = d.nbDims;
            for (int32_t k = 0; k < LLAMAVID_MAX_DIMS; ++k)
                t.shape[k] = k < d.nbDims ? d.d[k] : 0;
            return;
        }
    }
    for (int32_t i = 0; i < nIn + nOut; ++i)
    {
        bool input = i < nIn;
        llamavid_tensor const& t = input ? in[i] : out[i - nIn];
        void* dev = c.grow(st.find(t, input), bytes(t), t.name);
        if (!x.setTensorAddress(t.name, dev))
            fail(format("setTensorAddress(%s) failed: %s", t.name, takeError().c_str()));
        if (input && bytes(t))
            check(cudaMemcpyAsync(dev, t.data, bytes(t), cudaMemcpyHostToDevice, c.stream), "cudaMemcpyAsync of input",
                t.name);
    }
    if (!x.enqueueV3(c.stream))
        fail(format("enqueueV3 failed: %s", takeError().c_str()));
    for (int32_t i = 0; i < nOut; ++i)
        if (bytes(out[i]))
            check(cudaMemcpyAsync(out[i].data, c.buffers[st.find(out[i], false)].first, bytes(out[i]),
                      cudaMemcpyDeviceToHost, c.stream),
                "cudaMemcpyAsync of output", out[i].name);
    check(cudaStreamSynchronize(c.stream), "cudaStreamSynchronize after enqueueV3");
}

llamavid_error* run(void* stage, void* context, llamavid_tensor const* in, int32_t nIn, llamavid_tensor* out, int32_t nOut)
{
    auto* st = static_cast<Stage*>(stage);
    auto* c = static_cast<Context*>(context);
    llamavid_error* e = guard(st->backend->errorNew, [&] { runOnce(*st, *c, in, nIn, out, nOut); });
    if (e)
        cudaStreamSynchronize(c->stream);                     // no copy still reads or writes the core's buffers
    return e;
}

// ---- create ---------------------------------------------------------------------------------------------------------
void setOption(Backend& b, std::string const& key, std::string const& value)
{
    if (key == "device")
    {
        char* end = nullptr;
        long d = std::strtol(value.c_str(), &end, 10);
        if (value.empty() || *end || d < 0 || d > 1024)
            fail(format("tensorrt: option device: expected a CUDA device ordinal, found \"%s\"", value.c_str()),
                LLAMAVID_ERR_ARGUMENT);
        b.device = int(d);
    }
    else if (key == "plugin_library")
        b.pluginLibrary = value;
    else if (key == "precision")
    {
        if (!value.empty() && value != "fp32" && value != "fp16" && value != "bf16" && value != "int8")
            fail(format("tensorrt: option precision: expected fp32, fp16, bf16, int8 or \"\", found \"%s\"",
                value.c_str()), LLAMAVID_ERR_ARGUMENT);
        b.precision = value;
    }
    else
        fail(format("tensorrt: unknown option \"%s\": expected device, plugin_library or precision", key.c_str()),
            LLAMAVID_ERR_ARGUMENT);
}

void create(Backend& b)
{
    int count = 0;
    cudaError_t status = cudaGetDeviceCount(&count);
    if (status != cudaSuccess || count < 1)
        fail(format("tensorrt: expected a CUDA device, found %s", status != cudaSuccess
                ? format("%s (%d): %s", cudaGetErrorName(status), int(status), cudaGetErrorString(status)).c_str()
                : "none"));
    if (b.device >= count)
        fail(format("tensorrt: option device: expected an ordinal below %d (the CUDA devices here), found %d", count,
            b.device), LLAMAVID_ERR_ARGUMENT);
    int major = 0, minor = 0;
    check(cudaSetDevice(b.device), "cudaSetDevice");
    check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, b.device), "cudaDeviceGetAttribute");
    check(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, b.device), "cudaDeviceGetAttribute");
    b.sm = 10 * major + minor;
    b.version = getInferLibVersion();
    b.runtime.reset(createInferRuntime(b.logger));
    if (!b.runtime)
        fail(format("tensorrt: createInferRuntime failed: %s", takeError().c_str()));
    if (!b.pluginLibrary.empty())
    {
        struct stat s;
        if (stat(b.pluginLibrary.c_str(), &s) != 0 || !S_ISREG(s.st_mode))
            fail(format("tensorrt: option plugin_library: expected the plugin library file %s, found none; build it with "
                        "python -m kernels.build", b.pluginLibrary.c_str()), LLAMAVID_ERR_IO);
        b.plugins = b.runtime->getPluginRegistry().loadLibrary(b.pluginLibrary.c_str());
        // A failed load (e.g. its plugins already registered by another backend) is reported if an engine needs it.
        b.pluginState = b.pluginLibrary + (b.plugins ? " loaded" : " not loaded: " + takeError());
    }
}

} // namespace

extern "C" llamavid_error* llamavid_backend_create(int32_t apiVersion, llamavid_error_new_fn errorNew,
    char const* const* keys, char const* const* values, int32_t n, llamavid_backend** out)
{
    if (!errorNew || !out)
        return nullptr;                                       // nothing to report with; *out untouched
    *out = nullptr;
    if (apiVersion != LLAMAVID_API_VERSION)
        return errorNew(LLAMAVID_ERR_ARGUMENT, "tensorrt: expected llamavid API version %d, found %d: build the library "
                        "with the core's llamavid.h", LLAMAVID_API_VERSION, apiVersion);
    return guard(errorNew, [&] {
        auto b = std::make_unique<Backend>();
        b->errorNew = errorNew;
        for (int32_t i = 0; i < n; ++i)
            setOption(*b, keys[i] ? keys[i] : "", values[i] ? values[i] : "");
        create(*b);
        b->table = {"tensorrt", b.get(), openStage, openContext, run, closeContext, closeStage};
        *out = &b.release()->table;
    });
}

extern "C" void llamavid_backend_free(llamavid_backend* backend)
{
    if (backend)
        delete static_cast<Backend*>(backend->user);
}
