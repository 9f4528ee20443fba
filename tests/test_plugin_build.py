"""The TensorRT plugin library builds with nvcc here and has what TensorRT needs.

`python -m kernels.build` runs once per session (four archs, ~10-20 s). Checked without a GPU
or TensorRT: the exported entry points, no libnvinfer dependency, SASS for every arch (with
cuobjdump when installed, and always by reading the fatbin headers), and the plugin's own
behaviour (attribute, shape and type validation, error reporting, serialization) through
contextAttentionPluginCheck.cpp, which loads the library like TensorRT's loadLibrary does.
"""
from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from kernels import build

ARCHS = [80, 87, 89, 90]
REPO = Path(__file__).resolve().parent.parent


def _missing_tools() -> str | None:
    try:
        build.find_tool("nvcc")
        build.find_tensorrt_include()
    except build.BuildError as error:
        return str(error)
    return None


MISSING = _missing_tools()
needs_toolchain = pytest.mark.skipif(MISSING is not None, reason=f"cannot build the plugin here: {MISSING}")


@pytest.fixture(scope="session")
def plugin_build(tmp_path_factory):
    """(library path, build stdout) of `python -m kernels.build --out TMP`."""
    out = tmp_path_factory.mktemp("trt_plugins")
    result = subprocess.run(
        [sys.executable, "-m", "kernels.build", "--out", str(out), "--arch", ",".join(map(str, ARCHS))],
        cwd=REPO, capture_output=True, text=True,
    )
    assert result.returncode == 0, f"build failed:\n{result.stdout}\n{result.stderr}"
    return out / build.PLUGIN_LIBRARY, result.stdout


@pytest.fixture(scope="session")
def library(plugin_build):
    return plugin_build[0]


def find_cuobjdump() -> str | None:
    """cuobjdump from PATH, the CUDA toolkit, or the nvidia-cuda-cuobjdump wheel (nvidia/cu13/bin)."""
    try:
        return build.find_tool("cuobjdump")
    except build.BuildError:
        pass
    try:
        import nvidia
    except ImportError:
        return None
    for root in nvidia.__path__:
        for candidate in sorted(Path(root).glob("cu*/bin/cuobjdump")):
            return str(candidate)
    return None


def fatbin_images(path: Path) -> list[list[tuple[str, int]]]:
    """Per fatbin of the library (one per .cu file with device code), the (kind, sm) of each
    image: kind "elf" (SASS) or "ptx".

    Layout read here: a fatbin is a 16-byte header (magic 0xBA55ED50, u16 version, u16 header
    size, u64 payload size) followed by entries, each with a header (u16 kind 1=PTX 2=ELF, u16,
    u32 header size, u64 payload size, ..., u32 sm version at byte 28) and its payload."""
    data = path.read_bytes()
    magic = struct.pack("<I", 0xBA55ED50)
    fatbins, start = [], data.find(magic)
    while start >= 0:
        _, _, header_size, fat_size = struct.unpack_from("<IHHQ", data, start)
        entry, end = start + header_size, start + header_size + fat_size
        images = []
        while entry < end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
            (sm,) = struct.unpack_from("<I", data, entry + 28)
            images.append(({1: "ptx", 2: "elf"}.get(kind, str(kind)), sm))
            entry += entry_header + payload
        fatbins.append(images)
        start = data.find(magic, end)
    return fatbins


# ----------------------------------------------------------------------------------------------
@needs_toolchain
def test_library_is_built_and_command_printed(plugin_build):
    library, stdout = plugin_build
    assert library.is_file()
    assert "nvcc" in stdout and "-std=c++17" in stdout
    for arch in ARCHS:
        assert f"-gencode=arch=compute_{arch},code=" in stdout and f"sm_{arch}" in stdout
    assert f"compute_{ARCHS[-1]}]" in stdout  # PTX of the newest arch


@needs_toolchain
def test_exports_tensorrt_entry_points(library):
    defined = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True, check=True)
    exported = {line.split()[-1] for line in defined.stdout.splitlines() if " T " in line}
    assert {"getCreators", "setLoggerFinder"} <= exported


@needs_toolchain
def test_does_not_link_libnvinfer(library):
    needed = subprocess.run(["readelf", "-d", str(library)], capture_output=True, text=True, check=True).stdout
    assert "libnvinfer" not in needed
    undefined = subprocess.run(["nm", "-D", "--undefined-only", str(library)], capture_output=True, text=True,
                               check=True).stdout
    for symbol in ("getPluginRegistry", "getLogger", "createInferRuntime_INTERNAL"):
        assert symbol not in undefined


@needs_toolchain
def test_fatbin_has_sass_for_every_arch(library):
    """Both kernel files (CUDA cores, tensor cores) hold SASS for every arch plus PTX of the newest."""
    fatbins = fatbin_images(library)
    assert len(fatbins) == len(build.KERNEL_SOURCES)
    for images in fatbins:
        assert sorted(sm for kind, sm in images if kind == "elf") == ARCHS
        assert [sm for kind, sm in images if kind == "ptx"] == [ARCHS[-1]]


@needs_toolchain
def test_cuobjdump_lists_sass_for_every_arch(library):
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("cuobjdump not installed (pip install nvidia-cuda-cuobjdump); fatbin headers checked instead")
    listing = subprocess.run([cuobjdump, "--list-elf", "--list-ptx", str(library)], capture_output=True, text=True,
                             check=True).stdout
    elves = [line for line in listing.splitlines() if line.startswith("ELF file")]
    sms = sorted(line.rsplit(".sm_", 1)[1].split(".")[0] for line in elves)
    assert sms == sorted([str(a) for a in ARCHS] * len(build.KERNEL_SOURCES))
    assert any(line.startswith("PTX file") and f"sm_{ARCHS[-1]}.ptx" in line for line in listing.splitlines())


def gpu_runs_bf16() -> bool:
    """The library holds sm_80+ kernels for every arch it targets: bf16 runs wherever a GPU of
    sm_80 or newer is present (and is refused, with the reason, elsewhere: no GPU here)."""
    from kernels.cuda_available import compute_capability, cuda_available
    return cuda_available()[0] and compute_capability() >= 80


@needs_toolchain
def test_plugin_behaviour_through_fake_tensorrt(library, tmp_path):
    program = build.build_plugin_check(tmp_path)
    result = subprocess.run([str(program), str(library)] + (["bf16"] if gpu_runs_bf16() else []),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 failed" in result.stdout


@needs_toolchain
def test_cuda_test_library_builds(tmp_path):
    """The GPU test's launcher library compiles (one arch to keep it quick)."""
    library = build.build_cuda_test(tmp_path, archs=[87])
    defined = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True, check=True)
    assert "ca_cuda_context_attention" in defined.stdout


# ----------------------------------------------------------------------------------------------
def test_missing_headers_error_names_every_place(tmp_path):
    places = [tmp_path / "a" / "include", tmp_path / "b"]
    with pytest.raises(build.BuildError) as caught:
        build.find_tensorrt_include(places)
    message = str(caught.value)
    assert "NvInfer.h" in message and "kernel-lens" in message
    for place in places:
        assert str(place) in message


def test_header_search_order():
    places = build.tensorrt_include_candidates({"TENSORRT_ROOT": "/opt/tensorrt"})
    machine = os.uname().machine
    assert places[:3] == [Path("/opt/tensorrt/include"), Path(f"/usr/include/{machine}-linux-gnu"), Path("/usr/include")]
    if len(places) > 3:
        assert places[3].parts[-3:] == ("kernel_lens", "include", "tensorrt")
    assert build.tensorrt_include_candidates({})[0] == Path(f"/usr/include/{machine}-linux-gnu")


def test_cli_reports_missing_headers(tmp_path):
    missing = tmp_path / "no_tensorrt_here"
    result = subprocess.run(
        [sys.executable, "-m", "kernels.build", "--out", str(tmp_path), "--tensorrt-include", str(missing)],
        cwd=REPO, capture_output=True, text=True,
    )
    assert result.returncode == 1
    assert "NvInfer.h" in result.stderr and str(missing) in result.stderr
    assert not (tmp_path / build.PLUGIN_LIBRARY).exists()


def test_arch_list_parsing():
    assert build.parse_archs("90, sm_87,80,87") == [80, 87, 90]
    assert build.gencode_flags([80, 90])[-1] == "-gencode=arch=compute_90,code=[sm_90,compute_90]"
    with pytest.raises(build.BuildError):
        build.parse_archs(" , ")
