// CPU check of the built plugin library, without TensorRT: loads it with dlopen as TensorRT's
// loadLibrary does, resolves getCreators / setLoggerFinder, and drives the creator and the
// IPluginV3 capability interfaces with fake TensorRT objects (logger, error recorder, resource
// context, expression builder). The kernel itself is never run (enqueue is called only where it
// returns before any CUDA work). Built with g++ by tests/test_plugin_build.py:
//
//   g++ -std=c++17 -I<TensorRT include> -I<CUDA include> contextAttentionPluginCheck.cpp -ldl
//   ./a.out path/to/libllamavid_trt_plugins.so [bf16]  exit 0 when every check holds
//
// "bf16": this machine's GPU runs the library's bfloat16 kernels (sm_80+ build and device), so
// bf16 must be accepted; without it bf16 must be refused with the launcher's reason (no GPU here).
#include <NvInferRuntime.h>

#include <dlfcn.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <deque>
#include <limits>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace
{

int gChecks = 0;
int gFailures = 0;

void check(bool ok, std::string const& what)
{
    ++gChecks;
    if (!ok)
    {
        ++gFailures;
        std::printf("FAIL: %s\n", what.c_str());
    }
}

bool contains(std::string const& text, char const* part)
{
    return text.find(part) != std::string::npos;
}

// ----------------------------------------------------------------------------------------------
// Fakes of the objects TensorRT hands a plugin
// ----------------------------------------------------------------------------------------------
struct CapturingLogger : ILogger
{
    std::vector<std::string> errors, warnings;
    void log(Severity severity, AsciiChar const* msg) noexcept override
    {
        (severity <= Severity::kERROR ? errors : warnings).emplace_back(msg);
    }
    std::string lastError() const { return errors.empty() ? "" : errors.back(); }
};

struct Finder : ILoggerFinder
{
    ILogger* logger;
    explicit Finder(ILogger* l) : logger(l) {}
    ILogger* findLogger() override { return logger; }
};

struct Recorder : IErrorRecorder
{
    std::vector<std::pair<ErrorCode, std::string>> errors;
    int32_t getNbErrors() const noexcept override { return int32_t(errors.size()); }
    ErrorCode getErrorCode(int32_t i) const noexcept override { return errors[i].first; }
    ErrorDesc getErrorDesc(int32_t i) const noexcept override { return errors[i].second.c_str(); }
    bool hasOverflowed() const noexcept override { return false; }
    void clear() noexcept override { errors.clear(); }
    bool reportError(ErrorCode code, ErrorDesc desc) noexcept override
    {
        errors.emplace_back(code, desc);
        return true;
    }
    RefCount incRefCount() noexcept override { return 1; }
    RefCount decRefCount() noexcept override { return 1; }
};

struct ResourceContext : IPluginResourceContext
{
    IErrorRecorder* recorder;
    explicit ResourceContext(IErrorRecorder* r) : recorder(r) {}
    IGpuAllocator* getGpuAllocator() const noexcept override { return nullptr; }
    IErrorRecorder* getErrorRecorder() const noexcept override { return recorder; }
};

// A dimension expression that is a constant (value >= 0) or a runtime value (-1).
struct ExprImpl : apiv::VDimensionExpr
{
    int64_t value;
    explicit ExprImpl(int64_t v) : value(v) {}
    bool isConstant() const override { return value >= 0; }
    int64_t getConstantValue() const override { return value >= 0 ? value : std::numeric_limits<int64_t>::min(); }
    bool isSizeTensor() const override { return false; }
};

struct Expr : IDimensionExpr
{
    ExprImpl impl;
    explicit Expr(int64_t v) : impl(v) { mImpl = &impl; }
};

struct BuilderImpl : apiv::VExprBuilder
{
    std::deque<Expr> made;
    IDimensionExpr const* constant(int64_t value) override { return &made.emplace_back(value); }
    IDimensionExpr const* operation(DimensionOperation, IDimensionExpr const&, IDimensionExpr const&) override
    {
        return nullptr;
    }
    IDimensionExpr const* declareSizeTensor(int32_t, IDimensionExpr const&, IDimensionExpr const&) override
    {
        return nullptr;
    }
};

struct Builder : IExprBuilder
{
    BuilderImpl impl;
    Builder() { mImpl = &impl; }
};

Dims dims3(int64_t a, int64_t b, int64_t c)
{
    Dims d{};
    d.nbDims = 3;
    d.d[0] = a;
    d.d[1] = b;
    d.d[2] = c;
    return d;
}

PluginTensorDesc tensor(Dims dims, DataType type = DataType::kFLOAT, TensorFormat format = TensorFormat::kLINEAR)
{
    PluginTensorDesc t{};
    t.dims = dims;
    t.type = type;
    t.format = format;
    t.scale = 1.f;
    return t;
}

DynamicPluginTensorDesc dynamic(PluginTensorDesc desc)
{
    DynamicPluginTensorDesc d{};
    d.desc = desc;
    d.min = d.max = d.opt = desc.dims;
    return d;
}

// ----------------------------------------------------------------------------------------------
// Checks
// ----------------------------------------------------------------------------------------------
void checkCreator(IPluginCreatorV3One* creator, CapturingLogger& logger)
{
    check(std::strcmp(creator->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0, "creator is IPluginCreatorV3One");
    check(std::strcmp(creator->getPluginName(), "ContextAttention") == 0, "creator name ContextAttention");
    check(std::strcmp(creator->getPluginVersion(), "1") == 0, "creator version 1");
    check(std::strcmp(creator->getPluginNamespace(), "llamavid") == 0, "creator namespace llamavid");
    PluginFieldCollection const* names = creator->getFieldNames();
    check(names && names->nbFields == 1 && std::strcmp(names->fields[0].name, "scale") == 0
            && names->fields[0].type == PluginFieldType::kFLOAT32,
        "creator advertises one kFLOAT32 field 'scale'");

    auto rejects = [&](std::vector<PluginField> const& fields, char const* expected, char const* what) {
        PluginFieldCollection fc{int32_t(fields.size()), fields.data()};
        IPluginV3* plugin = creator->createPlugin("ctx", &fc, TensorRTPhase::kBUILD);
        check(plugin == nullptr, std::string("createPlugin rejects ") + what);
        delete plugin;
        check(contains(logger.lastError(), expected),
            std::string("error for ") + what + " says '" + expected + "': " + logger.lastError());
    };
    float const nan = std::nanf(""), inf = INFINITY, negative = -1.f, zero = 0.f, two[2] = {1.f, 2.f};
    double const asDouble = 0.5;
    rejects({}, "required attribute 'scale'", "a missing scale");
    rejects({PluginField("scale", &nan, PluginFieldType::kFLOAT32, 1)}, "finite and > 0", "scale NaN");
    rejects({PluginField("scale", &inf, PluginFieldType::kFLOAT32, 1)}, "finite and > 0", "scale inf");
    rejects({PluginField("scale", &zero, PluginFieldType::kFLOAT32, 1)}, "finite and > 0", "scale 0");
    rejects({PluginField("scale", &negative, PluginFieldType::kFLOAT32, 1)}, "finite and > 0", "scale -1");
    rejects({PluginField("scale", &asDouble, PluginFieldType::kFLOAT64, 1)}, "must be float32", "a float64 scale");
    rejects({PluginField("scale", two, PluginFieldType::kFLOAT32, 2)}, "one value", "two scale values");

    float const scale = 0.125f;
    int32_t const other = 7;
    std::vector<PluginField> fields{PluginField("scale", &scale, PluginFieldType::kFLOAT32, 1),
        PluginField("plugin_extra", &other, PluginFieldType::kINT32, 1)};
    PluginFieldCollection fc{2, fields.data()};
    IPluginV3* plugin = creator->createPlugin("ctx", &fc, TensorRTPhase::kBUILD);
    check(plugin != nullptr, "createPlugin accepts scale 0.125 plus an unknown field");
    check(!logger.warnings.empty() && contains(logger.warnings.back(), "plugin_extra"), "unknown field is warned about");
    delete plugin;
}

void checkBuild(IPluginV3OneBuild* build, CapturingLogger& logger, bool bf16)
{
    check(std::strcmp(build->getInterfaceInfo().kind, "PLUGIN_V3ONE_BUILD") == 0, "build capability");
    check(build->getNbOutputs() == 1, "one output");

    Dims const q = dims3(-1, 32, 1408), p = dims3(-1, 576, 1408), o = dims3(-1, 1, 1408);
    auto supports = [&](DataType t0, DataType t1, DataType t2, int32_t pos, TensorFormat f = TensorFormat::kLINEAR) {
        DynamicPluginTensorDesc io[3] = {dynamic(tensor(q, t0, f)), dynamic(tensor(p, t1, f)), dynamic(tensor(o, t2, f))};
        return build->supportsFormatCombination(pos, io, 2, 1);
    };
    auto const F = DataType::kFLOAT, H = DataType::kHALF, B = DataType::kBF16;
    check(supports(F, F, F, 0) && supports(F, F, F, 1) && supports(F, F, F, 2), "fp32 linear supported");
    check(supports(H, H, H, 0) && supports(H, H, H, 1) && supports(H, H, H, 2), "fp16 linear supported");
    check((supports(B, B, B, 0) && supports(B, B, B, 1) && supports(B, B, B, 2)) == bf16,
        bf16 ? "bf16 linear supported" : "bf16 rejected without an sm_80+ GPU");
    check(!supports(F, H, H, 1) && !supports(H, H, F, 2) && !supports(B, B, H, 2), "mixed types rejected");
    check(!supports(DataType::kINT32, F, F, 0) && !supports(B, F, F, 1), "int32 / bf16 with fp32 rejected");
    check(!supports(H, H, H, 0, TensorFormat::kHWC8), "non-linear format rejected");

    DataType out = DataType::kINT8;
    DataType const ff[2] = {F, F}, hh[2] = {H, H}, fh[2] = {F, H}, bb[2] = {B, B};
    check(build->getOutputDataTypes(&out, 1, ff, 2) == 0 && out == F, "output type follows fp32 inputs");
    check(build->getOutputDataTypes(&out, 1, hh, 2) == 0 && out == H, "output type follows fp16 inputs");
    check(build->getOutputDataTypes(&out, 1, fh, 2) != 0 && contains(logger.lastError(), "share one type"),
        "mixed input types fail: " + logger.lastError());
    if (bf16)
        check(build->getOutputDataTypes(&out, 1, bb, 2) == 0 && out == B, "output type follows bf16 inputs");
    else
        check(build->getOutputDataTypes(&out, 1, bb, 2) != 0 && contains(logger.lastError(), "bfloat16 needs"),
            "bf16 without an sm_80+ GPU fails with the reason: " + logger.lastError());

    auto configure = [&](Dims dq, Dims dp, DataType t = DataType::kFLOAT) {
        DynamicPluginTensorDesc in[2] = {dynamic(tensor(dq, t)), dynamic(tensor(dp, t))};
        DynamicPluginTensorDesc outDesc[1] = {dynamic(tensor(o, t))};
        return build->configurePlugin(in, 2, outDesc, 1);
    };
    check(configure(q, p) == 0, "configurePlugin accepts [-1,32,1408] x [-1,576,1408]");
    {
        DynamicPluginTensorDesc in[2] = {dynamic(tensor(dims3(64, 32, 1408))), dynamic(tensor(dims3(64, 576, 1408)))};
        DynamicPluginTensorDesc outDesc[1] = {dynamic(tensor(dims3(64, 1, 1408)))};
        check(build->getWorkspaceSize(in, 2, outDesc, 1) == size_t(64) * 2 * 1408 * sizeof(float),
            "workspace: 2 fp32 partial contexts per frame of the profile's max");
    }
    Dims rank2{};
    rank2.nbDims = 2;
    rank2.d[0] = 32;
    rank2.d[1] = 1408;
    check(configure(rank2, p) != 0 && contains(logger.lastError(), "rank 3"), "rank-2 queries fail: " + logger.lastError());
    check(configure(q, dims3(-1, 576, 1024)) != 0 && contains(logger.lastError(), "channel counts C differ"),
        "C mismatch fails: " + logger.lastError());
    check(configure(dims3(4, 32, 1408), dims3(5, 576, 1408)) != 0
            && contains(logger.lastError(), "frame counts F differ"),
        "F mismatch fails: " + logger.lastError());
    check(configure(q, p, DataType::kINT32) != 0
            && contains(logger.lastError(), "must be float32, float16 or bfloat16"),
        "int32 fails: " + logger.lastError());
    if (bf16)
        check(configure(q, p, B) == 0, "configurePlugin accepts bf16");
    else
        check(configure(q, p, B) != 0 && contains(logger.lastError(), "bfloat16 needs")
                && contains(logger.lastError(), "float16 or float32"),
            "configurePlugin refuses bf16 with the reason and what to do: " + logger.lastError());

    Builder builder;
    Expr runtimeF(-1), constF(4), q32(32), n576(576), c1408(1408), c1024(1024);
    DimsExprs inputs[2]{};
    inputs[0].nbDims = inputs[1].nbDims = 3;
    inputs[0].d[0] = &runtimeF;
    inputs[0].d[1] = &q32;
    inputs[0].d[2] = &c1408;
    inputs[1].d[0] = &constF;
    inputs[1].d[1] = &n576;
    inputs[1].d[2] = &c1408;
    DimsExprs outputs[1]{};
    int32_t const status = build->getOutputShapes(inputs, 2, nullptr, 0, outputs, 1, builder);
    check(status == 0 && outputs[0].nbDims == 3 && outputs[0].d[0] == &constF
            && outputs[0].d[1]->getConstantValue() == 1 && outputs[0].d[2]->getConstantValue() == 1408,
        "getOutputShapes gives [F, 1, C]");
    inputs[1].d[2] = &c1024;
    check(build->getOutputShapes(inputs, 2, nullptr, 0, outputs, 1, builder) != 0
            && contains(logger.lastError(), "channel counts C differ"),
        "getOutputShapes rejects a C mismatch: " + logger.lastError());
}

void checkRuntime(IPluginV3* plugin, IPluginCreatorV3One* creator)
{
    Recorder recorder;
    ResourceContext context(&recorder);
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    check(std::strcmp(runtime->getInterfaceInfo().kind, "PLUGIN_V3ONE_RUNTIME") == 0, "runtime capability");
    IPluginV3* attached = runtime->attachToContext(&context);
    check(attached != nullptr, "attachToContext clones");
    if (!attached)
        return;
    auto* rt = static_cast<IPluginV3OneRuntime*>(attached->getCapabilityInterface(PluginCapabilityType::kRUNTIME));

    PluginTensorDesc good[3] = {tensor(dims3(2, 32, 64)), tensor(dims3(2, 16, 64)), tensor(dims3(2, 1, 64))};
    check(rt->onShapeChange(good, 2, good + 2, 1) == 0, "onShapeChange accepts matching shapes");
    PluginTensorDesc bad[3] = {tensor(dims3(2, 32, 64)), tensor(dims3(3, 16, 64)), tensor(dims3(2, 1, 64))};
    check(rt->onShapeChange(bad, 2, bad + 2, 1) != 0 && recorder.getNbErrors() == 1
            && recorder.errors[0].first == ErrorCode::kINVALID_ARGUMENT
            && contains(recorder.errors[0].second, "frame counts F differ"),
        "onShapeChange F mismatch goes to the ErrorRecorder as kINVALID_ARGUMENT");

    PluginTensorDesc empty[3] = {tensor(dims3(0, 32, 64)), tensor(dims3(0, 16, 64)), tensor(dims3(0, 1, 64))};
    void const* inputs[2] = {nullptr, nullptr};
    void* outputs[1] = {nullptr};
    check(rt->enqueue(empty, empty + 2, inputs, outputs, nullptr, nullptr) == 0, "enqueue of 0 frames is a no-op");
    recorder.clear();
    check(rt->enqueue(good, good + 2, inputs, outputs, nullptr, nullptr) != 0 && recorder.getNbErrors() == 1
            && contains(recorder.errors[0].second, "cudaErrorInvalidValue"),
        "enqueue with null buffers reports the launcher's cudaError");

    PluginFieldCollection const* saved = rt->getFieldsToSerialize();
    check(saved && saved->nbFields == 1 && std::strcmp(saved->fields[0].name, "scale") == 0
            && saved->fields[0].type == PluginFieldType::kFLOAT32
            && *static_cast<float const*>(saved->fields[0].data) == 0.125f,
        "getFieldsToSerialize gives scale 0.125");
    IPluginV3* restored = creator->createPlugin("ctx", saved, TensorRTPhase::kRUNTIME);
    check(restored != nullptr, "creator rebuilds the plugin from its serialized fields");
    delete restored;
    delete attached;
}

} // namespace

int main(int argc, char** argv)
{
    if (argc < 2 || argc > 3 || (argc == 3 && std::strcmp(argv[2], "bf16") != 0))
    {
        std::fprintf(stderr, "usage: %s libllamavid_trt_plugins.so [bf16]\n", argv[0]);
        return 2;
    }
    bool const bf16 = argc == 3;
    void* library = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!library)
    {
        std::fprintf(stderr, "dlopen failed: %s\n", dlerror());
        return 2;
    }
    using GetCreators = IPluginCreatorInterface* const* (*) (int32_t&);
    using SetLoggerFinder = void (*)(ILoggerFinder*);
    auto getCreators = reinterpret_cast<GetCreators>(dlsym(library, "getCreators"));
    auto setLoggerFinder = reinterpret_cast<SetLoggerFinder>(dlsym(library, "setLoggerFinder"));
    if (!getCreators || !setLoggerFinder)
    {
        std::fprintf(stderr, "getCreators / setLoggerFinder not exported\n");
        return 2;
    }
    CapturingLogger logger;
    Finder finder(&logger);
    setLoggerFinder(&finder);

    int32_t count = 0;
    IPluginCreatorInterface* const* creators = getCreators(count);
    check(count == 1 && creators && creators[0], "getCreators returns one creator");
    if (count == 1 && creators && creators[0])
    {
        auto* creator = static_cast<IPluginCreatorV3One*>(creators[0]);
        checkCreator(creator, logger);

        float const scale = 0.125f;
        PluginField field("scale", &scale, PluginFieldType::kFLOAT32, 1);
        PluginFieldCollection fc{1, &field};
        IPluginV3* plugin = creator->createPlugin("ctx", &fc, TensorRTPhase::kBUILD);
        check(plugin != nullptr, "createPlugin(scale=0.125)");
        if (plugin)
        {
            auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
            check(std::strcmp(core->getInterfaceInfo().kind, "PLUGIN_V3ONE_CORE") == 0
                    && std::strcmp(core->getPluginName(), "ContextAttention") == 0
                    && std::strcmp(core->getPluginVersion(), "1") == 0
                    && std::strcmp(core->getPluginNamespace(), "llamavid") == 0,
                "core capability names the plugin");
            checkBuild(static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD)),
                logger, bf16);
            checkRuntime(plugin, creator);
            IPluginV3* copy = plugin->clone();
            check(copy != nullptr, "clone");
            delete copy;
            delete plugin;
        }
    }
    setLoggerFinder(nullptr);
    std::printf("plugin checks: %d run, %d failed\n", gChecks, gFailures);
    return gFailures == 0 ? 0 : 1;
}
