// fake_tensorrt.cpp -- TensorRT and the CUDA runtime faked on the CPU, so that tensorrt.cpp runs where neither exists
// (tests/test_c_backends.py). Compiled against the real headers: the backend's calls go through TensorRT's own inline
// wrappers (IRuntime -> apiv::VRuntime, ...) into these classes. Device memory is host memory; "this machine" has
// TensorRT 10.3.0 and one sm_87 GPU (a Jetson Orin on JetPack 6).
//
// An engine file is text:
//     llamavid-fake-engine
//     profile 8                          dim 0 ("F") of every input may be 1..8
//     input pixel_values float32 F 3 4 4
//     output vision_feats float32 F 5 6
//     fail enqueue                       (optional) enqueueV3 returns false
// Each float32 output is out[f, j] = mean(first input[f, :]) + 0.01 (j % 7).
#include "fake_tensorrt.h"

#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <sstream>
#include <string>
#include <vector>

using namespace nvinfer1;

FakeCounters fake;

namespace
{

// ---- CUDA: each call fails once with cudaErrorInvalidValue when fake.fail names it -------------------------------------
bool failing(char const* call)
{
    if (fake.fail != call)
        return false;
    fake.fail.clear();
    return true;
}

} // namespace

extern "C"
{
cudaError_t cudaGetDeviceCount(int* count)
{
    *count = fake.devices;
    return fake.devices ? cudaSuccess : cudaErrorNoDevice;
}
cudaError_t cudaSetDevice(int device)
{
    return device < fake.devices ? cudaSuccess : cudaErrorInvalidDevice;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int)
{
    *value = attr == cudaDevAttrComputeCapabilityMajor ? 8 : 7;
    return cudaSuccess;
}
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int)
{
    *stream = reinterpret_cast<cudaStream_t>(new char);
    fake.streams++;
    return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t stream)
{
    delete reinterpret_cast<char*>(stream);
    fake.streams--;
    return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t)
{
    return cudaSuccess;
}
cudaError_t cudaMalloc(void** ptr, size_t size)
{
    if (failing("cudaMalloc"))
        return cudaErrorMemoryAllocation;
    *ptr = std::malloc(size);
    fake.mallocs++;
    fake.buffers++;
    return cudaSuccess;
}
cudaError_t cudaFree(void* ptr)
{
    std::free(ptr);
    fake.buffers--;
    return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, void const* src, size_t count, cudaMemcpyKind, cudaStream_t)
{
    if (failing("cudaMemcpyAsync"))
        return cudaErrorInvalidValue;
    std::memcpy(dst, src, count);
    return cudaSuccess;
}
char const* cudaGetErrorName(cudaError_t e)
{
    return e == cudaErrorNoDevice ? "cudaErrorNoDevice" : e == cudaErrorMemoryAllocation ? "cudaErrorMemoryAllocation"
                                                                                        : "cudaErrorInvalidValue";
}
char const* cudaGetErrorString(cudaError_t)
{
    return "(fake CUDA)";
}
} // extern "C"

namespace
{

// ---- TensorRT -----------------------------------------------------------------------------------------------------------
struct FakeTensor
{
    std::string name;
    bool input;
    DataType type;
    std::vector<int64_t> dims;     // -1: F
};

Dims toDims(std::vector<int64_t> const& v, int64_t f)
{
    Dims d{};
    d.nbDims = int32_t(v.size());
    for (size_t i = 0; i < v.size(); ++i)
        d.d[i] = v[i] < 0 ? f : v[i];
    return d;
}

struct FakeEngine;

struct FakeContext : IExecutionContext, apiv::VExecutionContext
{
    FakeEngine const& engine;
    ILogger& logger;
    int64_t frames = -1;           // F of the input shapes set
    std::map<std::string, void*> address;

    FakeContext(FakeEngine const& e, ILogger& l);
    ~FakeContext() override { fake.contexts--; }
    FakeTensor const* tensor(char const* name) const;
    bool setInputShape(char const* name, Dims const& dims) noexcept override;
    Dims getTensorShape(char const* name) const noexcept override;
    bool setTensorAddress(char const* name, void* data) noexcept override
    {
        address[name] = data;
        return tensor(name) != nullptr;
    }
    bool enqueueV3(cudaStream_t) noexcept override;
    ICudaEngine const& getEngine() const noexcept override;

    // ---- not used by the backend ----
    IExecutionContext* getPImpl() noexcept override { return this; }
    void setDebugSync(bool) noexcept override {}
    bool getDebugSync() const noexcept override { return {}; }
    void setProfiler(IProfiler*) noexcept override {}
    IProfiler* getProfiler() const noexcept override { return {}; }
    void setName(char const*) noexcept override {}
    char const* getName() const noexcept override { return {}; }
    void setDeviceMemory(void*) noexcept override {}
    int32_t getOptimizationProfile() const noexcept override { return {}; }
    bool allInputDimensionsSpecified() const noexcept override { return {}; }
    bool allInputShapesSpecified() const noexcept override { return {}; }
    void setErrorRecorder(IErrorRecorder*) noexcept override {}
    IErrorRecorder* getErrorRecorder() const noexcept override { return {}; }
    bool executeV2(void* const*) noexcept override { return {}; }
    bool setOptimizationProfileAsync(int32_t, cudaStream_t) noexcept override { return {}; }
    void setEnqueueEmitsProfile(bool) noexcept override {}
    bool getEnqueueEmitsProfile() const noexcept override { return {}; }
    bool reportToProfiler() const noexcept override { return {}; }
    Dims getTensorStrides(char const*) const noexcept override { return {}; }
    void const* getTensorAddress(char const*) const noexcept override { return {}; }
    bool setInputTensorAddress(char const*, void const*) noexcept override { return {}; }
    bool setOutputTensorAddress(char const*, void*) noexcept override { return {}; }
    int32_t inferShapes(int32_t, char const**) noexcept override { return {}; }
    bool setInputConsumedEvent(cudaEvent_t) noexcept override { return {}; }
    cudaEvent_t getInputConsumedEvent() const noexcept override { return {}; }
    void* getOutputTensorAddress(char const*) const noexcept override { return {}; }
    bool setOutputAllocator(char const*, IOutputAllocator*) noexcept override { return {}; }
    IOutputAllocator* getOutputAllocator(char const*) noexcept override { return {}; }
    int64_t getMaxOutputSize(char const*) const noexcept override { return {}; }
    bool setTemporaryStorageAllocator(IGpuAllocator*) noexcept override { return {}; }
    IGpuAllocator* getTemporaryStorageAllocator() const noexcept override { return {}; }
    void setPersistentCacheLimit(size_t) noexcept override {}
    size_t getPersistentCacheLimit() const noexcept override { return {}; }
    bool setNvtxVerbosity(ProfilingVerbosity) noexcept override { return {}; }
    ProfilingVerbosity getNvtxVerbosity() const noexcept override { return {}; }
    void setAuxStreams(cudaStream_t*, int32_t) noexcept override {}
    bool setDebugListener(IDebugListener*) noexcept override { return {}; }
    IDebugListener* getDebugListener() noexcept override { return {}; }
    bool setTensorDebugState(char const*, bool) noexcept override { return {}; }
    bool getDebugState(char const*) const noexcept override { return {}; }
    bool setAllTensorsDebugState(bool) noexcept override { return {}; }
    size_t updateDeviceMemorySizeForShapes() noexcept override { return {}; }
    void setDeviceMemoryV2(void*, int64_t) noexcept override {}
    IRuntimeConfig* getRuntimeConfig() const noexcept override { return {}; }
    bool setUnfusedTensorsDebugState(bool) noexcept override { return {}; }
    bool getUnfusedTensorsDebugState() const noexcept override { return {}; }
};

struct FakeEngine : ICudaEngine, apiv::VCudaEngine
{
    std::vector<FakeTensor> tensors;
    int64_t profileMax = 1;
    bool failEnqueue = false;
    ILogger& logger;

    explicit FakeEngine(ILogger& l) : logger(l)
    {
        mImpl = this;
        fake.engines++;
    }
    ~FakeEngine() override { fake.engines--; }

    FakeTensor const* tensor(char const* name) const
    {
        for (auto const& t : tensors)
            if (t.name == name)
                return &t;
        logger.log(ILogger::Severity::kERROR, (std::string("fake: no tensor named ") + name).c_str());
        return nullptr;
    }
    IExecutionContext* createExecutionContext(ExecutionContextAllocationStrategy) noexcept override
    {
        fake.contexts++;
        return new FakeContext(*this, logger);
    }
    int32_t getNbIOTensors() const noexcept override { return int32_t(tensors.size()); }
    char const* getIOTensorName(int32_t i) const noexcept override { return tensors[size_t(i)].name.c_str(); }
    TensorIOMode getTensorIOMode(char const* name) const noexcept override
    {
        FakeTensor const* t = tensor(name);
        return !t ? TensorIOMode::kNONE : t->input ? TensorIOMode::kINPUT : TensorIOMode::kOUTPUT;
    }
    DataType getTensorDataType(char const* name) const noexcept override { return tensor(name)->type; }
    TensorLocation getTensorLocation(char const*) const noexcept override { return TensorLocation::kDEVICE; }
    Dims getProfileShape(char const* name, int32_t, OptProfileSelector select) const noexcept override
    {
        return toDims(tensor(name)->dims, select == OptProfileSelector::kMIN ? 1 : profileMax);
    }

    // ---- not used by the backend ----
    ICudaEngine* getPImpl() noexcept override { return this; }
    int32_t getNbLayers() const noexcept override { return {}; }
    IHostMemory* serialize() const noexcept override { return {}; }
    IExecutionContext* createExecutionContextWithoutDeviceMemory() noexcept override { return {}; }
    size_t getDeviceMemorySize() const noexcept override { return {}; }
    bool isRefittable() const noexcept override { return {}; }
    char const* getName() const noexcept override { return {}; }
    int32_t getNbOptimizationProfiles() const noexcept override { return 1; }
    int32_t const* getProfileTensorValues(char const*, int32_t, OptProfileSelector) const noexcept override { return {}; }
    EngineCapability getEngineCapability() const noexcept override { return {}; }
    void setErrorRecorder(IErrorRecorder*) noexcept override {}
    IErrorRecorder* getErrorRecorder() const noexcept override { return {}; }
    bool hasImplicitBatchDimension() const noexcept override { return {}; }
    TacticSources getTacticSources() const noexcept override { return {}; }
    ProfilingVerbosity getProfilingVerbosity() const noexcept override { return {}; }
    IEngineInspector* createEngineInspector() const noexcept override { return {}; }
    Dims getTensorShape(char const*) const noexcept override { return {}; }
    bool isShapeInferenceIO(char const*) const noexcept override { return {}; }
    int32_t getTensorBytesPerComponent(char const*) const noexcept override { return {}; }
    int32_t getTensorComponentsPerElement(char const*) const noexcept override { return {}; }
    TensorFormat getTensorFormat(char const*) const noexcept override { return {}; }
    char const* getTensorFormatDesc(char const*) const noexcept override { return {}; }
    int32_t getTensorVectorizedDim(char const*) const noexcept override { return {}; }
    HardwareCompatibilityLevel getHardwareCompatibilityLevel() const noexcept override { return {}; }
    int32_t getNbAuxStreams() const noexcept override { return {}; }
    int32_t getTensorBytesPerComponentV2(char const*, int32_t) const noexcept override { return {}; }
    int32_t getTensorComponentsPerElementV2(char const*, int32_t) const noexcept override { return {}; }
    TensorFormat getTensorFormatV2(char const*, int32_t) const noexcept override { return {}; }
    char const* getTensorFormatDescV2(char const*, int32_t) const noexcept override { return {}; }
    int32_t getTensorVectorizedDimV2(char const*, int32_t) const noexcept override { return {}; }
    ISerializationConfig* createSerializationConfig() noexcept override { return {}; }
    IHostMemory* serializeWithConfig(ISerializationConfig&) const noexcept override { return {}; }
    size_t getDeviceMemorySizeForProfile(int32_t) const noexcept override { return {}; }
    IRefitter* createRefitter(ILogger&) noexcept override { return {}; }
    bool setWeightStreamingBudget(int64_t) noexcept override { return {}; }
    int64_t getWeightStreamingBudget() const noexcept override { return {}; }
    int64_t getMinimumWeightStreamingBudget() const noexcept override { return {}; }
    int64_t getStreamableWeightsSize() const noexcept override { return {}; }
    bool isDebugTensor(char const*) const noexcept override { return {}; }
    bool setWeightStreamingBudgetV2(int64_t) noexcept override { return {}; }
    int64_t getWeightStreamingBudgetV2() const noexcept override { return {}; }
    int64_t getWeightStreamingAutomaticBudget() const noexcept override { return {}; }
    int64_t getWeightStreamingScratchMemorySize() const noexcept override { return {}; }
    int64_t getDeviceMemorySizeV2() const noexcept override { return {}; }
    int64_t getDeviceMemorySizeForProfileV2(int32_t) const noexcept override { return {}; }
    int64_t const* getProfileTensorValuesV2(char const*, int32_t, OptProfileSelector) const noexcept override { return {}; }
    IExecutionContext* createExecutionContextWithRuntimeConfig(IRuntimeConfig*) noexcept override { return {}; }
    IRuntimeConfig* createRuntimeConfig() noexcept override { return {}; }
    int64_t getEngineStat(EngineStat) const noexcept override { return {}; }
};

FakeContext::FakeContext(FakeEngine const& e, ILogger& l) : engine(e), logger(l)
{
    mImpl = this;
}

FakeTensor const* FakeContext::tensor(char const* name) const
{
    return engine.tensor(name);
}

ICudaEngine const& FakeContext::getEngine() const noexcept
{
    return engine;
}

bool FakeContext::setInputShape(char const* name, Dims const& dims) noexcept
{
    FakeTensor const* t = tensor(name);
    bool ok = t && t->input && dims.nbDims == int32_t(t->dims.size()) && dims.d[0] >= 1 && dims.d[0] <= engine.profileMax;
    for (int32_t i = 1; ok && i < dims.nbDims; ++i)
        ok = t->dims[size_t(i)] < 0 || t->dims[size_t(i)] == dims.d[i];
    if (!ok)
    {
        logger.log(ILogger::Severity::kERROR, (std::string("fake: shape of ") + name + " outside the profile").c_str());
        return false;
    }
    frames = dims.d[0];
    return true;
}

Dims FakeContext::getTensorShape(char const* name) const noexcept
{
    FakeTensor const* t = tensor(name);
    return t ? toDims(t->dims, frames) : Dims{};
}

bool FakeContext::enqueueV3(cudaStream_t) noexcept
{
    fake.enqueues++;
    if (engine.failEnqueue)
    {
        logger.log(ILogger::Severity::kERROR, "fake: enqueue failed as the engine file asks");
        return false;
    }
    FakeTensor const& first = engine.tensors.front();
    int64_t per = 1;
    for (size_t i = 1; i < first.dims.size(); ++i)
        per *= first.dims[i];
    auto const* x = static_cast<float const*>(address.at(first.name));
    for (auto const& t : engine.tensors)
    {
        if (t.input || t.type != DataType::kFLOAT)
            continue;
        int64_t outPer = 1;
        for (size_t i = 1; i < t.dims.size(); ++i)
            outPer *= t.dims[i];
        auto* y = static_cast<float*>(address.at(t.name));
        for (int64_t f = 0; f < frames; ++f)
        {
            double sum = 0;
            for (int64_t j = 0; j < per; ++j)
                sum += x[f * per + j];
            for (int64_t j = 0; j < outPer; ++j)
                y[f * outPer + j] = float(sum / double(per)) + 0.01f * float(j % 7);
        }
    }
    return true;
}

DataType parseType(std::string const& s)
{
    static std::map<std::string, DataType> const types = {{"float32", DataType::kFLOAT}, {"float16", DataType::kHALF},
        {"int64", DataType::kINT64}, {"int32", DataType::kINT32}, {"int8", DataType::kINT8}};
    return types.at(s);
}

struct FakeRuntime : IRuntime, apiv::VRuntime
{
    ILogger& logger;
    explicit FakeRuntime(ILogger& l) : logger(l)
    {
        mImpl = this;
        fake.runtimes++;
    }
    ~FakeRuntime() override { fake.runtimes--; }

    nvinfer1::ICudaEngine* deserializeCudaEngine(void const* blob, std::size_t size) noexcept override
    {
        std::istringstream text(std::string(static_cast<char const*>(blob), size));
        std::string line, word;
        if (!std::getline(text, line) || line != "llamavid-fake-engine")
        {
            logger.log(ILogger::Severity::kERROR, "fake: the file is not a fake engine");
            return nullptr;
        }
        auto* e = new FakeEngine(logger);
        while (std::getline(text, line))
        {
            std::istringstream words(line);
            words >> word;
            if (word == "profile")
                words >> e->profileMax;
            else if (word == "fail")
                e->failEnqueue = true;
            else if (word == "input" || word == "output")
            {
                FakeTensor t{"", word == "input", DataType::kFLOAT, {}};
                words >> t.name >> word;
                t.type = parseType(word);
                while (words >> word)
                    t.dims.push_back(word == "F" ? -1 : std::stoll(word));
                e->tensors.push_back(t);
            }
        }
        return e;
    }

    // ---- not used by the backend ----
    IRuntime* getPImpl() noexcept override { return this; }
    nvinfer1::ICudaEngine* deserializeCudaEngine(IStreamReader&) noexcept override { return {}; }
    void setDLACore(int32_t) noexcept override {}
    int32_t getDLACore() const noexcept override { return {}; }
    int32_t getNbDLACores() const noexcept override { return {}; }
    void setGpuAllocator(IGpuAllocator*) noexcept override {}
    void setErrorRecorder(IErrorRecorder*) noexcept override {}
    IErrorRecorder* getErrorRecorder() const noexcept override { return {}; }
    ILogger* getLogger() const noexcept override { return &logger; }
    bool setMaxThreads(int32_t) noexcept override { return {}; }
    int32_t getMaxThreads() const noexcept override { return {}; }
    void setTemporaryDirectory(char const*) noexcept override {}
    char const* getTemporaryDirectory() const noexcept override { return {}; }
    void setTempfileControlFlags(TempfileControlFlags) noexcept override {}
    TempfileControlFlags getTempfileControlFlags() const noexcept override { return {}; }
    IPluginRegistry& getPluginRegistry() noexcept override { std::abort(); }   // the checks load no plugin
    void setPluginRegistryParent(IPluginRegistry*) noexcept override {}
    IRuntime* loadRuntime(char const*) noexcept override { return {}; }
    void setEngineHostCodeAllowed(bool) noexcept override {}
    bool getEngineHostCodeAllowed() const noexcept override { return {}; }
    nvinfer1::ICudaEngine* deserializeCudaEngineV2(IStreamReaderV2&) noexcept override { return {}; }
};

} // namespace

extern "C" void* createInferRuntime_INTERNAL(void* logger, int32_t) noexcept
{
    return static_cast<IRuntime*>(new FakeRuntime(*static_cast<ILogger*>(logger)));
}

extern "C" int32_t getInferLibVersion() noexcept
{
    return 100300;
}
