// TensorRT IPluginV3 wrapper of the ContextAttention kernel (see README.md).
//
// The plugin holds no math: it validates attributes, shapes and types, switches on the data
// type and calls launchContextAttention (contextAttentionKernel.h). The library exports the
// C entry points TensorRT looks up when it loads a plugin library by path (getCreators,
// setLoggerFinder), so it does not link libnvinfer.
#pragma once

#include <NvInferRuntime.h>

#include <cstdint>

namespace llamavid
{
namespace plugin
{

constexpr char const* kCONTEXT_ATTENTION_NAME = "ContextAttention";
constexpr char const* kCONTEXT_ATTENTION_VERSION = "1";
constexpr char const* kCONTEXT_ATTENTION_NAMESPACE = "llamavid";
constexpr char const* kSCALE_FIELD = "scale";

class ContextAttentionPlugin : public nvinfer1::IPluginV3,
                               public nvinfer1::IPluginV3OneCore,
                               public nvinfer1::IPluginV3OneBuild,
                               public nvinfer1::IPluginV3OneRuntime
{
public:
    explicit ContextAttentionPlugin(float scale) noexcept;
    ContextAttentionPlugin(ContextAttentionPlugin const& other) noexcept;
    ContextAttentionPlugin& operator=(ContextAttentionPlugin const&) = delete;
    ~ContextAttentionPlugin() noexcept override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t getNbOutputs() const noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    float mScale;
    nvinfer1::IErrorRecorder* mRecorder{nullptr}; // set by attachToContext; null while building
    nvinfer1::PluginField mField;                 // "scale" -> mScale, what getFieldsToSerialize returns
    nvinfer1::PluginFieldCollection mFieldCollection;
};

class ContextAttentionPluginCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    ContextAttentionPluginCreator() noexcept;

    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;

private:
    nvinfer1::PluginField mField;
    nvinfer1::PluginFieldCollection mFieldCollection;
};

} // namespace plugin
} // namespace llamavid

// Entry points TensorRT resolves in a plugin library loaded by path
// (IPluginRegistry::loadLibrary, trtexec --dynamicPlugins / --setPluginsToSerialize). The
// library is built with -fvisibility=hidden: these two are its only exported symbols of ours.
// (TENSORRTAPI is empty outside TensorRT's own build, hence our own attribute.)
#define LLAMAVID_PLUGIN_EXPORT __attribute__((visibility("default")))
extern "C" LLAMAVID_PLUGIN_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept;
extern "C" LLAMAVID_PLUGIN_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) noexcept;
