"""The core's backends in shared libraries, on the CPU: the C++ TensorRT backend compiles against TensorRT's
headers with warnings as errors, and runs on fake TensorRT and CUDA (runtime/csrc/backends/tests: options, engine
checks, a context and buffers per session, every error path; under ASan and UBSan); built as a library with the
fakes inside, it is loaded by the core by path and Pipeline.open runs engine variants on it (same answers as the
same function as a Python stage, from many threads). The C embedding example (runtime/csrc/examples/ask.c) compiles
with -Wall -Wextra -Werror and, where no C-callable backend runs a stage, exits 1 with the core's one-line error.
Real engines on a GPU: tests/test_gpu_tensorrt.py."""
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from export.build import build
from kernels import build as kernels_build
from runtime import _llamavid
from runtime.backends import available_backends
from runtime.backends import tensorrt as trt_backend
from runtime.manifest import hash_files, read_manifest, write_manifest
from runtime.pipeline import Pipeline
from test_export_build import quiet, tiny_checkpoint

REPO = Path(__file__).resolve().parent.parent
CSRC = REPO / "runtime" / "csrc"
BACKENDS = CSRC / "backends"
CORE = sorted(str(c) for c in CSRC.glob("*.c") if c.name != "pymodule.c")
QUESTIONS = ["what color is the square ?", "how many shapes are there ?"]
PYTHON_ENV = {**os.environ, "PYTHONPATH": str(REPO)}

try:
    HEADERS = ["-isystem", str(kernels_build.find_tensorrt_include()), "-isystem", str(kernels_build.cuda_include())]
    MISSING = None
except kernels_build.BuildError as e:
    HEADERS, MISSING = [], str(e).splitlines()[0]
needs_headers = pytest.mark.skipif(MISSING is not None, reason=f"TensorRT or CUDA headers missing: {MISSING}")
CXX = ["g++", "-std=c++17", "-Wall", "-Wextra", "-Werror", f"-I{CSRC}", f"-I{BACKENDS}", *HEADERS]


def compile(command):
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def run(command, **kw):
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, **kw)


# ---- the backend on fake TensorRT and CUDA ------------------------------------------------------------------------
@needs_headers
def test_tensorrt_backend_compiles_against_the_tensorrt_headers():
    compile([*CXX, "-fsyntax-only", BACKENDS / "tensorrt.cpp"])


@needs_headers
def test_tensorrt_backend_on_fake_tensorrt_and_cuda(tmp_path):
    sanitize = "-fsanitize=address,undefined"
    compile(["gcc", "-std=c11", sanitize, "-c", CSRC / "error.c", "-o", tmp_path / "error.o"])
    compile([*CXX, "-g", sanitize, BACKENDS / "tests" / "check_tensorrt.cpp", BACKENDS / "tests" / "fake_tensorrt.cpp",
             BACKENDS / "tensorrt.cpp", tmp_path / "error.o", "-o", tmp_path / "check"])
    result = run([tmp_path / "check"])
    found = re.fullmatch(r"(\d+) checks, 0 failures\n", result.stdout)
    assert result.returncode == 0 and found and int(found[1]) >= 50, result.stdout + result.stderr


@pytest.fixture(scope="module")
def fake_library(tmp_path_factory):
    """The TensorRT backend as the core loads it, with the fake TensorRT and CUDA linked in."""
    if MISSING:
        pytest.skip(f"TensorRT or CUDA headers missing: {MISSING}")
    out = tmp_path_factory.mktemp("fake_trt") / "libllamavid_tensorrt.so"
    compile([*CXX, "-O1", "-shared", "-fPIC", "-fvisibility=hidden", BACKENDS / "tensorrt.cpp",
             BACKENDS / "tests" / "fake_tensorrt.cpp", "-o", out])
    return out


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    root = tmp_path_factory.mktemp("c_backends")
    return build(tiny_checkpoint(root, fused=True, seed=7), "fp32", root / "art", "ort", log=quiet)


def with_vision_engine(art, out, built_with) -> Path:
    """A copy of art whose vision stage lists a fake engine first (its function: FakeVision)."""
    shutil.copytree(art, out)
    m = read_manifest(out, verify_hashes=False)
    size = m["preprocess"]["image_size"]
    _, tokens, width = m["stages"]["vision"]["outputs"]["vision_feats"]["shape"]
    (out / "vision.fake.engine").write_text(f"llamavid-fake-engine\nprofile 64\ninput pixel_values float32 F 3 {size} "
                                            f"{size}\noutput vision_feats float32 F {tokens} {width}\n")
    m["stages"]["vision"]["variants"].insert(0, {"file": "vision.fake.engine", "precision": "fp32", "backend": "tensorrt",
                                                 "built_with": built_with})
    m["files"] = {**m["files"], **hash_files(out, ["vision.fake.engine"])}
    write_manifest(out, m)
    return out


class FakeVision:
    """The fake engine's function as a Python stage: feats[f, j] = mean(pixels[f]) + 0.01 (j % 7), in its order
    of float operations (a sequential sum in double)."""

    def run(self, inputs, outputs, ctx):
        px, out = np.asarray(inputs["pixel_values"]), np.asarray(outputs["vision_feats"])
        flat = px.reshape(len(px), -1).astype(np.float64)
        mean = (np.cumsum(flat, axis=1)[:, -1] / flat.shape[1]).astype(np.float32)
        j = np.arange(out[0].size) % 7
        out[:] = (mean[:, None] + np.float32(0.01) * j.astype(np.float32)).reshape(out.shape)


@pytest.fixture
def fake_tensorrt_here(fake_library, monkeypatch, tmp_path):
    """This machine as the runtime sees it with the backend built and a CUDA device (no plugin library)."""
    from kernels import cuda_available
    monkeypatch.setattr(trt_backend, "backend_library", lambda: fake_library)
    monkeypatch.setattr(cuda_available, "cuda_available", lambda: (True, "1 CUDA device(s)"))
    monkeypatch.setattr(kernels_build, "DEFAULT_OUT", tmp_path / "no-plugin")


def test_tensorrt_usable_only_where_built_loadable_and_with_a_device(fake_library, monkeypatch, tmp_path):
    from kernels import cuda_available
    assert trt_backend.backend_library() is None and "tensorrt" not in available_backends()
    assert trt_backend.backend_missing().startswith("the TensorRT backend is not built (runtime/libllamavid_tensorrt*.so)")
    broken = tmp_path / "libllamavid_tensorrt.so"
    broken.write_bytes(b"\x7fELF")
    monkeypatch.setattr(trt_backend, "backend_library", lambda: broken)
    assert trt_backend.backend_missing().startswith("libllamavid_tensorrt.so does not load:")
    monkeypatch.setattr(trt_backend, "backend_library", lambda: fake_library)
    monkeypatch.setattr(cuda_available, "cuda_available", lambda: (False, "cudaErrorNoDevice (100)"))
    assert trt_backend.backend_missing() == "the TensorRT backend needs a CUDA device: cudaErrorNoDevice (100)"
    monkeypatch.setattr(cuda_available, "cuda_available", lambda: (True, "1 CUDA device(s)"))
    assert trt_backend.backend_missing() is None and available_backends()[0] == "tensorrt"


def test_pipeline_runs_engine_variants_on_the_native_backend(art, tmp_path, fake_tensorrt_here):
    out = with_vision_engine(art, tmp_path / "art", {"tensorrt": "10.3.0.26", "sm": 87})
    trt = Pipeline.open(out)
    assert trt.core.stage("vision") == "vision.fake.engine fp32 on tensorrt" and "vision" not in trt.stages
    assert trt.core.stage("head") == "head.onnx fp32 on python"
    ort = Pipeline.open(out, backend="ort-cpu")
    ref = Pipeline(out, ort.manifest, {**ort.stages, "vision": FakeVision()}, ort.chosen)
    rng = np.random.default_rng(3)
    clips = [rng.standard_normal((n, 3, 28, 28)).astype(np.float32) for n in (1, 5)]
    want = [ref.ask(c, q, max_new_tokens=10) for c in clips for q in QUESTIONS]
    assert [trt.ask(c, q, max_new_tokens=10) for c in clips for q in QUESTIONS] == want
    with ThreadPoolExecutor(4) as pool:                       # a context per core session, on many threads
        got = list(pool.map(lambda k: trt.ask(clips[k // 2 % 2], QUESTIONS[k % 2], max_new_tokens=10), range(16)))
    assert got == [want[k // 2 % 2 * 2 + k % 2] for k in range(16)]


def test_engines_built_elsewhere_are_refused_with_the_fix(art, tmp_path, fake_tensorrt_here):
    out = with_vision_engine(art, tmp_path / "art", {"tensorrt": "10.3.0.26", "sm": 80})
    with pytest.raises(RuntimeError, match=r"^stage vision: vision.fake.engine \(tensorrt\) on backend tensorrt: "
                                           r"vision.fake.engine was built with TensorRT 10.3.0.26 for sm_80, this machine "
                                           r"has TensorRT 10.3.0 and sm_87: rebuild the engines here \(python -m export.trt "
                                           r"--artifacts .*\) or run the stage's ONNX variants \(ort-cuda, ort-cpu\)$"):
        Pipeline.open(out)
    assert Pipeline.open(out, backend="ort-cpu").core.stage("vision") == "vision.onnx fp32 on python"


def test_native_backend_libraries_are_checked_when_loaded(art, fake_library, tmp_path):
    with pytest.raises(OSError, match=r"^backend library .*none.so: expected a loadable shared library, found: "):
        _llamavid.Model(str(art), {}, native=[(str(tmp_path / "none.so"), {})])
    with pytest.raises(ValueError, match=r"^backend library .*: tensorrt: unknown option \"colour\": expected device, "
                                         r"plugin_library or precision$"):
        _llamavid.Model(str(art), {}, native=[(str(fake_library), {"colour": "red"})])
    with pytest.raises(ValueError, match=r"^native\[0\]: expected \(library path, \{option: value\}\), found 'x'$"):
        _llamavid.Model(str(art), {}, native=["x"])
    with pytest.raises(RuntimeError, match=r"^stage vision: expected a backend that runs one of its variants "
                                           r"\[vision.onnx fp32 \(ort-cpu\), vision.onnx fp32 \(ort-cuda\)\], found backends "
                                           r"\[python, tensorrt\] and none runs them$"):
        _llamavid.Model(str(art), {}, native=[(str(fake_library), {})])


# ---- the embedding example -------------------------------------------------------------------------------------------
def test_ids_script_gives_the_pipelines_ids(art):
    pipe, q = Pipeline.open(art, backend="ort-cpu"), QUESTIONS[0]
    result = run([sys.executable, CSRC / "examples" / "ids.py", art, q], cwd=REPO, env=PYTHON_ENV)
    prompt, qformer = ([int(i) for i in line.split()] for line in result.stdout.splitlines())
    media_prefix = pipe.manifest["prompt"]["media_prefix"]
    assert prompt == pipe.encode_prompt(pipe.prompt_text([(0, media_prefix + q), (1, None)]))
    assert qformer == pipe.qformer_tokenizer([q])[0][0].tolist()
    answer = list(pipe.generate(prompt, pipe.load_media(np.zeros((2, 3, 28, 28), np.float32)), q, max_new_tokens=8))
    decoded = run([sys.executable, CSRC / "examples" / "ids.py", art, "--decode", *answer], cwd=REPO, env=PYTHON_ENV)
    assert decoded.stdout == pipe.tokenizer.decode(answer) + "\n"


@pytest.fixture(scope="module")
def ask(tmp_path_factory):
    """The example built as its README says, with the sanitizers: a leak or memory error exits 99, not ask's 1."""
    exe = tmp_path_factory.mktemp("ask") / "ask"
    compile(["gcc", "-std=c11", "-Wall", "-Wextra", "-Werror", "-g", "-fsanitize=address,undefined", f"-I{CSRC}",
             CSRC / "examples" / "ask.c", *CORE, "-ldl", "-lm", "-o", exe])
    return exe


ASAN = {"ASAN_OPTIONS": "exitcode=99"}


def test_ask_example_normalises_frames_and_prints_tokens_through_the_callback(art, ask, tmp_path):
    """Run end to end on a backend library that records the pixel values it gets (backends/tests/dump_backend.c)."""
    library, dump, frames, ids = (tmp_path / n for n in ("libdump.so", "pixels.f32", "frames.rgb", "ids.txt"))
    compile(["gcc", "-std=c11", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", f"-I{CSRC}",
             BACKENDS / "tests" / "dump_backend.c", "-o", library])
    rgb = np.random.default_rng(0).integers(0, 256, (3, 28, 28, 3), dtype=np.uint8)
    frames.write_bytes(rgb.tobytes())
    ids.write_text("1 22 -200 13\n101 7 102\n")
    result = run([ask, art, ids, frames, "--backend", library, "--option", f"dump={dump}", "--option", "token=9",
                  "--max-new-tokens", "4"], env=ASAN)
    assert (result.returncode, result.stdout, result.stderr) == (0, "9 9 9 9 \n", "")
    p = read_manifest(art)["preprocess"]
    mean, std = (np.float32(p[k]).reshape(1, 3, 1, 1) for k in ("mean", "std"))
    want = (rgb.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255) - mean) / std
    np.testing.assert_array_equal(np.fromfile(dump, np.float32).reshape(want.shape), want)
    dump.unlink()
    result = run([ask, art, ids, "--synthetic", "2", "--backend", library, "--option", f"dump={dump}"], env=ASAN)
    assert result.returncode == 0 and np.fromfile(dump, np.float32).size == 2 * 3 * 28 * 28
    frames.write_bytes(rgb.tobytes()[:-1])
    result = run([ask, art, ids, frames, "--backend", library, "--option", f"dump={dump}"], env=ASAN)
    assert (result.returncode, result.stderr) == (1, f"ask: {frames}: expected raw RGB frames of 28x28 pixels (a "
                                                     f"multiple of 2352 bytes)\n")


def test_ask_example_names_the_stage_no_backend_runs(art, ask, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("1 22 -200 13\n101 7 102\n")
    result = run([ask, art, ids, "--synthetic", "3"], env=ASAN)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == ("ask: stage vision: expected a backend that runs one of its variants [vision.onnx fp32 "
                             "(ort-cpu), vision.onnx fp32 (ort-cuda)], found backends [] and none runs them\n")
    result = run([ask, art, ids], env=ASAN)
    assert result.returncode == 2 and result.stderr.startswith("usage: ask ARTIFACTS IDS_FILE")


def test_ask_example_with_the_tensorrt_backend_library(art, ask, fake_library, tmp_path):
    """Loaded (fake TensorRT inside): it runs no ONNX variant, and its option errors reach the host."""
    ids = tmp_path / "ids.txt"
    ids.write_text("1 22 -200 13\n101 7 102\n")
    result = run([ask, art, ids, "--synthetic", "3", "--backend", fake_library], env=ASAN)
    assert result.returncode == 1 and result.stderr.endswith("found backends [tensorrt] and none runs them\n")
    result = run([ask, art, ids, "--synthetic", "3", "--backend", fake_library, "--option", "device=7"], env=ASAN)
    assert result.returncode == 1 and result.stderr == (
        f"ask: backend library {fake_library}: tensorrt: option device: expected an ordinal below 1 (the CUDA devices "
        f"here), found 7\n")
