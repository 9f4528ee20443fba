// TensorRT IPluginV3 ContextAttention plugin and its creator. No math here (see
// contextAttentionKernel.h); every noexcept method that can fail catches and reports.
#include "contextAttentionPlugin.h"
#include "contextAttentionKernel.h"

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <new>
#include <sstream>
#include <stdexcept>
#include <string>

using namespace nvinfer1;

namespace llamavid
{
namespace plugin
{
namespace
{

std::atomic<ILoggerFinder*> gLoggerFinder{nullptr};

// A check of what the network hands the plugin (attributes, shapes, types): reported as
// kINVALID_ARGUMENT. Anything else thrown is a broken internal assumption or a CUDA failure.
class UserError : public std::runtime_error
{
public:
    using std::runtime_error::runtime_error;
};

void checkUser(bool ok, std::string const& message)
{
    if (!ok)
        throw UserError(message);
}

void logMessage(ILogger::Severity severity, std::string const& message) noexcept
{
    try
    {
        ILoggerFinder* finder = gLoggerFinder.load();
        ILogger* logger = finder ? finder->findLogger() : nullptr;
        if (logger)
            logger->log(severity, message.c_str());
        else
            std::cerr << message << std::endl;
    }
    catch (...)
    {
    }
}

// Called from a catch (...) block: reports the exception in flight to the execution context's
// ErrorRecorder (when attached) and to the logger. Returns the failure status -1.
int32_t reportCurrentException(IErrorRecorder* recorder, char const* method) noexcept
{
    try
    {
        ErrorCode code = ErrorCode::kINTERNAL_ERROR;
        std::string what = "unknown exception";
        try
        {
            throw;
        }
        catch (UserError const& e)
        {
            code = ErrorCode::kINVALID_ARGUMENT;
            what = e.what();
        }
        catch (std::bad_alloc const&)
        {
            code = ErrorCode::kFAILED_ALLOCATION;
            what = "out of host memory";
        }
        catch (std::exception const& e)
        {
            what = e.what();
        }
        catch (...)
        {
        }
        std::string const message = std::string(kCONTEXT_ATTENTION_NAMESPACE) + "::" + kCONTEXT_ATTENTION_NAME
            + "::" + method + ": " + what;
        if (recorder)
            recorder->reportError(code, message.c_str());
        logMessage(ILogger::Severity::kERROR, message);
    }
    catch (...)
    {
    }
    return -1;
}

std::string toString(Dims const& dims)
{
    std::ostringstream os;
    os << '[';
    for (int32_t i = 0; i < dims.nbDims; ++i)
        os << (i ? ", " : "") << dims.d[i];
    os << ']';
    return os.str();
}

char const* toString(DataType type)
{
    switch (type)
    {
    case DataType::kFLOAT: return "float32";
    case DataType::kHALF: return "float16";
    case DataType::kBF16: return "bfloat16";
    case DataType::kINT8: return "int8";
    case DataType::kINT32: return "int32";
    case DataType::kINT64: return "int64";
    default: return "another type";
    }
}

void checkCounts(int32_t nbInputs, int32_t nbOutputs)
{
    checkUser(nbInputs == 2,
        "expects 2 inputs (queries [F,Q,C], patches [F,N,C]), got " + std::to_string(nbInputs));
    checkUser(nbOutputs == 1, "expects 1 output (context [F,1,C]), got " + std::to_string(nbOutputs));
}

// -1 marks a dimension not known yet (build time); known ones must be >= 1 and agree.
void checkShapes(Dims const& queries, Dims const& patches)
{
    checkUser(queries.nbDims == 3, "input 0 'queries' must be rank 3 [F,Q,C], got " + toString(queries));
    checkUser(patches.nbDims == 3, "input 1 'patches' must be rank 3 [F,N,C], got " + toString(patches));
    auto agree = [](int64_t a, int64_t b) { return a < 0 || b < 0 || a == b; };
    std::string const both = ": queries " + toString(queries) + ", patches " + toString(patches);
    checkUser(agree(queries.d[0], patches.d[0]), "frame counts F differ" + both);
    checkUser(agree(queries.d[2], patches.d[2]), "channel counts C differ" + both);
    checkUser(queries.d[1] != 0 && queries.d[2] != 0 && patches.d[1] != 0, "Q, N and C must be >= 1" + both);
}

// Empty when this library runs bfloat16 on the current device, else why not and what to do.
std::string bf16Unsupported()
{
    bool supported = false;
    int kernelArch = 0, deviceArch = 0;
    cudaError_t const status = ca::bf16Support(&supported, &kernelArch, &deviceArch);
    if (status != cudaSuccess)
        return std::string("bfloat16 needs an sm_80+ GPU to run on, and asking the CUDA runtime for one failed with ")
            + cudaGetErrorName(status) + ": run where one is, or use float16 or float32";
    if (supported)
        return "";
    std::string const built = kernelArch ? "compute_" + std::to_string(kernelArch) : "no architecture this device runs";
    return "bfloat16 needs kernels built for sm_80 or newer running on an sm_80+ GPU; this library's kernels for the "
           "device (sm_"
        + std::to_string(deviceArch) + ") are " + built
        + ": rebuild with python -m kernels.build --arch 80,87,89,90 (sm_80+ GPUs), or use float16 or float32";
}

// deviceChecks: also ask the device whether this build runs the type (bfloat16); enqueue skips
// the query and reports the launcher's cudaErrorNoKernelImageForDevice instead.
void checkTypes(DataType queries, DataType patches, DataType context, bool deviceChecks = true)
{
    checkUser(queries == DataType::kFLOAT || queries == DataType::kHALF || queries == DataType::kBF16,
        std::string("inputs must be float32, float16 or bfloat16, got queries ") + toString(queries));
    checkUser(patches == queries && context == queries,
        std::string("queries, patches and context must share one type, got ") + toString(queries) + ", "
            + toString(patches) + ", " + toString(context));
    if (queries == DataType::kBF16 && deviceChecks)
    {
        std::string const why = bf16Unsupported();
        checkUser(why.empty(), why);
    }
}

void checkRuntime(PluginTensorDesc const& queries, PluginTensorDesc const& patches, PluginTensorDesc const& context,
    bool deviceChecks = true)
{
    checkShapes(queries.dims, patches.dims);
    checkTypes(queries.type, patches.type, context.type, deviceChecks);
    checkUser(queries.dims.d[1] <= INT32_MAX && patches.dims.d[1] <= INT32_MAX && queries.dims.d[2] <= INT32_MAX,
        "Q, N and C must fit in int32: queries " + toString(queries.dims) + ", patches " + toString(patches.dims));
}

} // namespace

// ---------------------------------------------------------------------------------------------
// ContextAttentionPlugin
// ---------------------------------------------------------------------------------------------
// Methods returning constants or plain members cannot throw and have no try block.

ContextAttentionPlugin::ContextAttentionPlugin(float scale) noexcept
    : mScale(scale)
    , mField(kSCALE_FIELD, &mScale, PluginFieldType::kFLOAT32, 1)
    , mFieldCollection{1, &mField}
{
}

ContextAttentionPlugin::ContextAttentionPlugin(ContextAttentionPlugin const& other) noexcept
    : ContextAttentionPlugin(other.mScale)
{
    mRecorder = other.mRecorder;
}

IPluginCapability* ContextAttentionPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

IPluginV3* ContextAttentionPlugin::clone() noexcept
{
    try
    {
        return new ContextAttentionPlugin(*this);
    }
    catch (...)
    {
        reportCurrentException(mRecorder, "clone");
        return nullptr;
    }
}

char const* ContextAttentionPlugin::getPluginName() const noexcept
{
    return kCONTEXT_ATTENTION_NAME;
}

char const* ContextAttentionPlugin::getPluginVersion() const noexcept
{
    return kCONTEXT_ATTENTION_VERSION;
}

char const* ContextAttentionPlugin::getPluginNamespace() const noexcept
{
    return kCONTEXT_ATTENTION_NAMESPACE;
}

int32_t ContextAttentionPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    try
    {
        checkCounts(nbInputs, nbOutputs);
        checkShapes(in[0].desc.dims, in[1].desc.dims);
        checkTypes(in[0].desc.type, in[1].desc.type, out[0].desc.type);
        return 0;
    }
    catch (...)
    {
        return reportCurrentException(mRecorder, "configurePlugin");
    }
}

int32_t ContextAttentionPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    try
    {
        checkCounts(nbInputs, nbOutputs);
        checkTypes(inputTypes[0], inputTypes[1], inputTypes[0]);
        outputTypes[0] = inputTypes[0];
        return 0;
    }
    catch (...)
    {
        return reportCurrentException(mRecorder, "getOutputDataTypes");
    }
}

int32_t ContextAttentionPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs,
    DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs,
    IExprBuilder& exprBuilder) noexcept
{
    try
    {
        checkCounts(nbInputs, nbOutputs);
        DimsExprs const& queries = inputs[0];
        DimsExprs const& patches = inputs[1];
        // The known (constant) extents, -1 where only an expression is known.
        auto known = [](DimsExprs const& e) {
            Dims d{};
            d.nbDims = e.nbDims;
            for (int32_t i = 0; i < e.nbDims && i < Dims::MAX_DIMS; ++i)
                d.d[i] = e.d[i]->isConstant() ? e.d[i]->getConstantValue() : -1;
            return d;
        };
        checkShapes(known(queries), known(patches));
        // Prefer a constant extent where only one input has one.
        auto pick = [](IDimensionExpr const* a, IDimensionExpr const* b) { return a->isConstant() ? a : b; };
        outputs[0].nbDims = 3;
        outputs[0].d[0] = pick(queries.d[0], patches.d[0]); // F
        outputs[0].d[1] = exprBuilder.constant(1);
        outputs[0].d[2] = pick(patches.d[2], queries.d[2]); // C
        return 0;
    }
    catch (...)
    {
        return reportCurrentException(mRecorder, "getOutputShapes");
    }
}

bool ContextAttentionPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    try
    {
        checkCounts(nbInputs, nbOutputs);
        if (pos < 0 || pos >= nbInputs + nbOutputs)
            throw std::logic_error("position " + std::to_string(pos) + " out of range");
        PluginTensorDesc const& desc = inOut[pos].desc;
        bool const type = desc.type == DataType::kFLOAT || desc.type == DataType::kHALF
            || (desc.type == DataType::kBF16 && bf16Unsupported().empty());
        return desc.format == TensorFormat::kLINEAR && type && (pos == 0 || desc.type == inOut[0].desc.type);
    }
    catch (...)
    {
        reportCurrentException(mRecorder, "supportsFormatCombination");
        return false;
    }
}

int32_t ContextAttentionPlugin::getNbOutputs() const noexcept
{
    return 1;
}

// The launcher's optional workspace for the profile's largest frame count (it lets few frames
// use two blocks each); 0 where the dimensions are not known.
size_t ContextAttentionPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    if (nbInputs < 1 || inputs[0].max.nbDims != 3 || inputs[0].max.d[0] < 0 || inputs[0].max.d[2] < 1
        || inputs[0].max.d[2] > INT32_MAX)
        return 0;
    return ca::contextAttentionWorkspaceBytes(inputs[0].max.d[0], int32_t(inputs[0].max.d[2]));
}

int32_t ContextAttentionPlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    try
    {
        checkCounts(nbInputs, nbOutputs);
        checkRuntime(in[0], in[1], out[0]);
        return 0;
    }
    catch (...)
    {
        return reportCurrentException(mRecorder, "onShapeChange");
    }
}

int32_t ContextAttentionPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    try
    {
        checkRuntime(inputDesc[0], inputDesc[1], outputDesc[0], false);
        Dims const& q = inputDesc[0].dims; // [F, Q, C]
        Dims const& p = inputDesc[1].dims; // [F, N, C]
        int64_t const frames = q.d[0];
        auto const numQueries = int32_t(q.d[1]), numPatches = int32_t(p.d[1]), channels = int32_t(q.d[2]);
        // TensorRT gives getWorkspaceSize bytes for the profile's max frames, >= what these frames use
        size_t const workspaceBytes = workspace ? ca::contextAttentionWorkspaceBytes(frames, channels) : 0;
        auto const automatic = ca::Algorithm::kAuto;
        auto const storage = ca::ScoreStorage::kAuto;
        cudaError_t status = cudaSuccess;
        if (inputDesc[0].type == DataType::kFLOAT)
            status = ca::launchContextAttention(static_cast<float const*>(inputs[0]),
                static_cast<float const*>(inputs[1]), static_cast<float*>(outputs[0]), frames, numQueries, numPatches,
                channels, mScale, stream, storage, automatic, workspace, workspaceBytes);
        else if (inputDesc[0].type == DataType::kHALF)
            status = ca::launchContextAttention(static_cast<__half const*>(inputs[0]),
                static_cast<__half const*>(inputs[1]), static_cast<__half*>(outputs[0]), frames, numQueries,
                numPatches, channels, mScale, stream, storage, automatic, workspace, workspaceBytes);
        else
            status = ca::launchContextAttention(static_cast<__nv_bfloat16 const*>(inputs[0]),
                static_cast<__nv_bfloat16 const*>(inputs[1]), static_cast<__nv_bfloat16*>(outputs[0]), frames,
                numQueries, numPatches, channels, mScale, stream, storage, automatic, workspace, workspaceBytes);
        if (status == cudaErrorNoKernelImageForDevice && inputDesc[0].type == DataType::kBF16)
            throw UserError(bf16Unsupported());
        if (status != cudaSuccess)
            throw std::runtime_error(std::string("kernel launch failed: ") + cudaGetErrorName(status) + " ("
                + cudaGetErrorString(status) + ") for queries " + toString(q) + ", patches " + toString(p));
        return 0;
    }
    catch (...)
    {
        return reportCurrentException(mRecorder, "enqueue");
    }
}

IPluginV3* ContextAttentionPlugin::attachToContext(IPluginResourceContext* context) noexcept
{
    try
    {
        auto* attached = new ContextAttentionPlugin(*this);
        attached->mRecorder = context ? context->getErrorRecorder() : nullptr;
        return attached;
    }
    catch (...)
    {
        reportCurrentException(mRecorder, "attachToContext");
        return nullptr;
    }
}

PluginFieldCollection const* ContextAttentionPlugin::getFieldsToSerialize() noexcept
{
    return &mFieldCollection;
}

// ---------------------------------------------------------------------------------------------
// ContextAttentionPluginCreator
// ---------------------------------------------------------------------------------------------

ContextAttentionPluginCreator::ContextAttentionPluginCreator() noexcept
    : mField(kSCALE_FIELD, nullptr, PluginFieldType::kFLOAT32, 1)
    , mFieldCollection{1, &mField}
{
}

char const* ContextAttentionPluginCreator::getPluginName() const noexcept
{
    return kCONTEXT_ATTENTION_NAME;
}

char const* ContextAttentionPluginCreator::getPluginVersion() const noexcept
{
    return kCONTEXT_ATTENTION_VERSION;
}

char const* ContextAttentionPluginCreator::getPluginNamespace() const noexcept
{
    return kCONTEXT_ATTENTION_NAMESPACE;
}

PluginFieldCollection const* ContextAttentionPluginCreator::getFieldNames() noexcept
{
    return &mFieldCollection;
}

IPluginV3* ContextAttentionPluginCreator::createPlugin(
    char const* /*name*/, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept
{
    try
    {
        bool found = false;
        float scale = 0.f;
        for (int32_t i = 0; fc && i < fc->nbFields; ++i)
        {
            PluginField const& field = fc->fields[i];
            if (!field.name || std::strcmp(field.name, kSCALE_FIELD) != 0)
            {
                logMessage(ILogger::Severity::kWARNING,
                    std::string(kCONTEXT_ATTENTION_NAME) + ": ignoring unknown field '"
                        + (field.name ? field.name : "(null)") + "'");
                continue;
            }
            checkUser(field.type == PluginFieldType::kFLOAT32,
                "attribute 'scale' must be float32 (PluginFieldType::kFLOAT32), got PluginFieldType "
                    + std::to_string(int32_t(field.type)));
            checkUser(field.length == 1 && field.data,
                "attribute 'scale' must hold one value, got " + std::to_string(field.length));
            std::memcpy(&scale, field.data, sizeof(float));
            found = true;
        }
        checkUser(found, "required attribute 'scale' (float32, 1/sqrt(C) in the released model) is missing");
        checkUser(std::isfinite(scale) && scale > 0.f,
            "attribute 'scale' must be finite and > 0, got " + std::to_string(scale));
        return new ContextAttentionPlugin(scale);
    }
    catch (...)
    {
        reportCurrentException(nullptr, "createPlugin");
        return nullptr;
    }
}

} // namespace plugin
} // namespace llamavid

extern "C" LLAMAVID_PLUGIN_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept
{
    llamavid::plugin::gLoggerFinder.store(finder);
}

extern "C" LLAMAVID_PLUGIN_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) noexcept
{
    static llamavid::plugin::ContextAttentionPluginCreator creator;
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&creator};
    nbCreators = 1;
    return creators;
}
