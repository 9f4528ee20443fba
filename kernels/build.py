"""Builds the TensorRT plugin library and the host twin of the ContextAttention kernel.

    python -m kernels.build [--out DIR] [--arch 80,87,89,90] [--tensorrt-include DIR] [--host]

Default: nvcc -> DIR/libllamavid_trt_plugins.so (kernel + IPluginV3 plugin), SASS for every
--arch plus PTX for the newest, against the first TensorRT header folder found in this order:
$TENSORRT_ROOT/include, /usr/include/<multiarch> (Jetson), /usr/include, the `kernel-lens`
package's copy of the headers. --host instead compiles the kernel's arithmetic with g++ into
DIR/libcontext_attention_host.so (no CUDA, no TensorRT) for the CPU tests.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SRC = Path(__file__).resolve().parent / "context_attention"
DEFAULT_OUT = REPO / "build" / "kernels"
DEFAULT_ARCHS = (80, 87, 89, 90)  # A100, Jetson Orin, Ada, H100

PLUGIN_LIBRARY = "libllamavid_trt_plugins.so"
HOST_LIBRARY = "libcontext_attention_host.so"
CUDA_TEST_LIBRARY = "libcontext_attention_cuda_test.so"
PLUGIN_CHECK_PROGRAM = "contextAttentionPluginCheck"

KERNEL_SOURCES = ("contextAttentionKernel.cu", "contextAttentionTensorCore.cu")
PLUGIN_SOURCES = (*KERNEL_SOURCES, "contextAttentionPlugin.cpp")
CUDA_TEST_SOURCES = (*KERNEL_SOURCES, "contextAttentionCudaTest.cu")


class BuildError(RuntimeError):
    """A build step could not run or failed; the message says what to do."""


# ----------------------------------------------------------------------------------------------
# Where things are
# ----------------------------------------------------------------------------------------------
def tensorrt_include_candidates(env: dict | None = None) -> list[Path]:
    """The folders searched for NvInfer.h, in order."""
    env = os.environ if env is None else env
    places = []
    if env.get("TENSORRT_ROOT"):
        places.append(Path(env["TENSORRT_ROOT"]) / "include")
    places.append(Path("/usr/include") / f"{platform.machine()}-linux-gnu")
    places.append(Path("/usr/include"))
    # find_spec locates the package without importing it (its __init__ needs triton).
    spec = importlib.util.find_spec("kernel_lens")
    if spec is not None and spec.submodule_search_locations:
        places.append(Path(next(iter(spec.submodule_search_locations))) / "include" / "tensorrt")
    return places


def find_tensorrt_include(candidates: list[Path] | None = None) -> Path:
    """First folder holding NvInfer.h, or BuildError naming every folder looked at."""
    candidates = tensorrt_include_candidates() if candidates is None else candidates
    for folder in candidates:
        if (Path(folder) / "NvInfer.h").is_file():
            return Path(folder)
    looked = "\n".join(f"  {folder}" for folder in candidates) or "  (no folder given)"
    raise BuildError(
        "TensorRT headers (NvInfer.h) not found. Looked in:\n" + looked + "\n"
        "Set TENSORRT_ROOT to a TensorRT install, pass --tensorrt-include DIR, or install the headers "
        "with `pip install --no-deps kernel-lens==2.0.1`."
    )


def cuda_roots() -> list[Path]:
    """CUDA toolkit folders to try: $CUDA_HOME, $CUDA_PATH, /usr/local/cuda."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    return [Path(root) for root in roots if root]


def find_tool(name: str) -> str:
    """A CUDA tool from PATH or a toolkit's bin folder."""
    found = shutil.which(name)
    if found:
        return found
    for root in cuda_roots():
        if (root / "bin" / name).is_file():
            return str(root / "bin" / name)
    looked = ", ".join(str(root / "bin") for root in cuda_roots())
    raise BuildError(f"{name} not found on PATH or in {looked}: install the CUDA toolkit or set CUDA_HOME")


def cuda_include() -> Path:
    """The CUDA toolkit's include folder (cuda_runtime_api.h, needed by NvInferRuntimeBase.h)."""
    for root in cuda_roots():
        if (root / "include" / "cuda_runtime_api.h").is_file():
            return root / "include"
    looked = ", ".join(str(root / "include") for root in cuda_roots())
    raise BuildError(f"cuda_runtime_api.h not found in {looked}: set CUDA_HOME to the CUDA toolkit")


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------
def parse_archs(text: str) -> list[int]:
    archs = sorted({int(a.strip().replace("sm_", "")) for a in text.split(",") if a.strip()})
    if not archs:
        raise BuildError(f"no architecture in --arch {text!r}; expected e.g. 80,87,89,90")
    return archs


def gencode_flags(archs: list[int]) -> list[str]:
    """SASS for every arch, plus PTX of the newest so later GPUs can JIT it."""
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs[:-1]]
    newest = archs[-1]
    flags.append(f"-gencode=arch=compute_{newest},code=[sm_{newest},compute_{newest}]")
    return flags


def nvcc_command(sources, output: Path, archs: list[int], system_includes: list[Path] = ()) -> list[str]:
    """Third-party headers go in with -isystem so their deprecation warnings stay quiet."""
    return [
        find_tool("nvcc"),
        "-std=c++17",
        "-O3",
        "-shared",
        "-nodlink",  # no relocatable device code: skip nvlink's duplicate copy of every cubin
        "--threads=0",  # the architectures compile in parallel
        "-Xcompiler=-fPIC,-fvisibility=hidden,-Wall",
        *gencode_flags(archs),
        f"-I{SRC}",
        *[f"-isystem={folder}" for folder in system_includes],
        *[str(SRC / name) for name in sources],
        "-o",
        str(output),
    ]


def run(command: list[str]) -> None:
    print(shlex.join(command), flush=True)
    try:
        result = subprocess.run(command, capture_output=True, text=True)
    except FileNotFoundError:
        raise BuildError(f"{command[0]} not found: install it (Debian: apt-get install g++)") from None
    if result.stdout:
        print(result.stdout, end="")
    if result.returncode != 0:
        raise BuildError(f"{Path(command[0]).name} failed (exit {result.returncode}):\n{result.stderr}")
    if result.stderr:
        print(result.stderr, end="", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# Builds
# ----------------------------------------------------------------------------------------------
def output_path(out_dir: Path, name: str) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir / name


def build_plugin(out_dir: Path = DEFAULT_OUT, archs=DEFAULT_ARCHS, tensorrt_include: Path | None = None) -> Path:
    """nvcc -> out_dir/libllamavid_trt_plugins.so; returns its path."""
    include = find_tensorrt_include(None if tensorrt_include is None else [Path(tensorrt_include)])
    print(f"TensorRT headers: {include}")
    output = output_path(out_dir, PLUGIN_LIBRARY)
    run(nvcc_command(PLUGIN_SOURCES, output, sorted(archs), [include]))
    return output


def build_cuda_test(out_dir: Path = DEFAULT_OUT, archs=DEFAULT_ARCHS) -> Path:
    """nvcc -> out_dir/libcontext_attention_cuda_test.so: the kernel behind a C entry point
    that copies host arrays to a GPU and back (tests/test_gpu_context_attention.py)."""
    output = output_path(out_dir, CUDA_TEST_LIBRARY)
    run(nvcc_command(CUDA_TEST_SOURCES, output, sorted(archs)))
    return output


def build_plugin_check(out_dir: Path = DEFAULT_OUT) -> Path:
    """g++ -> out_dir/contextAttentionPluginCheck: drives a built plugin library through fake
    TensorRT objects on the CPU (tests/test_plugin_build.py)."""
    include = find_tensorrt_include()
    output = output_path(out_dir, PLUGIN_CHECK_PROGRAM)
    run(["g++", "-std=c++17", "-O1", "-Wall", "-Wno-deprecated-declarations", "-isystem", str(include),
         "-isystem", str(cuda_include()), str(SRC / "contextAttentionPluginCheck.cpp"), "-ldl", "-o", str(output)])
    return output


def build_host(out_dir: Path = DEFAULT_OUT) -> Path:
    """g++ -> out_dir/libcontext_attention_host.so (ctypes), the kernel arithmetic on the CPU."""
    output = output_path(out_dir, HOST_LIBRARY)
    run(["g++", "-std=c++17", "-O2", "-Wall", "-Wextra", "-fPIC", "-shared",
         str(SRC / "contextAttentionHost.cpp"), "-o", str(output)])
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.build", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--arch", default=",".join(map(str, DEFAULT_ARCHS)),
                        help="comma-separated SM versions (default 80,87,89,90)")
    parser.add_argument("--tensorrt-include", type=Path, default=None,
                        help="folder with NvInfer.h (default: search, see the module doc)")
    parser.add_argument("--host", action="store_true", help="build the g++ host twin instead of the plugin")
    args = parser.parse_args(argv)
    try:
        if args.host:
            output = build_host(args.out)
        else:
            output = build_plugin(args.out, parse_archs(args.arch), args.tensorrt_include)
    except BuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"built {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
