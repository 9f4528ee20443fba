"""export/trt.py on CPU: the TensorRT engine plan passes every check for a tiny model's artifacts and
for the released 7B video shapes (profiles from the preset, ops from a narrow model of the same graph
structure); each check fails with a clear message on a broken input; the engine build's control flow
(every parser error printed, temp names, nothing half-built) through a stand-in tensorrt module;
without TensorRT the build fails clearly and writes nothing; and the wiring: python -m export.build
--target tensorrt builds the engines once and keeps them on a re-run, the runtime runs engines only on
tensorrt and chunks frames by their profile. The runtime's TensorRT backend (C++) is checked on fake
TensorRT in tests/test_c_backends.py."""
import dataclasses
import math
import shutil
import sys
import types

import onnx
import pytest

import llamavid_ref
from export import build as build_mod
from export import trt
from export.head import PLUGIN, export_head
from runtime.manifest import FRAME_CHUNK, read_manifest
from export.vision import export_vision
from kernels import build as kernels_build
from llamavid_ref.config import LLMConfig, from_name
from llamavid_ref.model import LlamaVid
from llamavid_ref.tiny import random_init, tiny_model
from runtime.backends import choose_variant
from runtime.backends.tensorrt import TensorrtUnavailable
from runtime.pipeline import frame_chunk

RELEASED = "llama-vid-7b-full-224-video-fps-1"


def tensorrt_installed() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """A tiny model exported with the CLI, fp32."""
    root = tmp_path_factory.mktemp("trt_plan")
    ckpt = llamavid_ref.save(tiny_model(root / "src"), root / "ckpt")
    assert build_mod.main(["--checkpoint", str(ckpt), "--precision", "fp32", "--out", str(root / "art")]) == 0
    return root / "art"


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """A stand-in plugin library file: check (d) only asks whether it exists."""
    path = tmp_path_factory.mktemp("lib") / kernels_build.PLUGIN_LIBRARY
    path.write_bytes(b"\x7fELF")
    return path


def manifest_for(cfg, precision="fp16") -> dict:
    """The manifest fields a plan reads, as export.build writes them, for a config without exporting it."""
    io = build_mod.model_io(cfg, "shared")
    variants = {"vision": [{"file": "vision.onnx", "precision": "fp32", "backend": "ort-cpu"}],
                "head": [{"file": "head.onnx", "precision": "fp32", "backend": "ort-cpu"},
                         {"file": "head_trt.onnx", "precision": precision, "backend": "tensorrt",
                          "plugin": build_mod.plugin_record(cfg)}],
                "llm": []}
    return {"model": {"config": cfg.to_dict()}, "tokenizers": {"qformer_max_length": cfg.qformer.max_text_len},
            "runtime": {"frame_chunk": FRAME_CHUNK},
            "build": {"precision": precision}, "stages": {s: {**io[s], "variants": variants[s]} for s in io}}


def narrow(cfg):
    """The same graph structure (224 px, patch 14, 32 queries, 256 text tokens, mean pooling, mlp2x_gelu)
    at toy widths."""
    return dataclasses.replace(
        cfg, vision=dataclasses.replace(cfg.vision, width=32, depth=2, heads=4, mlp_dim=64),
        qformer=dataclasses.replace(cfg.qformer, hidden=24, layers=2, heads=3, ffn=48, vocab_size=64),
        llm=LLMConfig(vocab_size=96, hidden=32, layers=1, heads=4, kv_heads=2, ffn=64, max_positions=512))


def failed(checks):
    return {(c.stage, c.name): c.message for c in checks if not c.ok}


def head_plan(plan):
    return next(sp for sp in plan.stages if sp.stage == "head")


# ---- every check passes ---------------------------------------------------------------------------
def test_tiny_artifacts_pass_every_check(art, library, capsys):
    plan = trt.make_plan(art, plugin_library=library)
    checks = trt.check_plan(plan)
    assert failed(checks) == {}
    assert {(c.stage, c.name) for c in checks} == {
        (s, n) for s in ("vision", "head") for n in ("profiles", "io", "ops", "precision")} | {
        ("head", "plugin"), ("head", "library")}
    vision, head = plan.stages
    assert (vision.onnx, vision.engine, head.onnx, head.engine) == ("vision.onnx", "vision.fp32.engine",
                                                                    "head_trt.onnx", "head.fp32.engine")
    assert plan.runtime == {"frames": (1, 64), "text": (1, 256)}
    assert vision.profile["pixel_values"] == trt.Dims((1, 3, 28, 28), (64, 3, 28, 28), (64, 3, 28, 28))
    assert head.profile["qformer_ids"] == trt.Dims((1, 1), (1, 32), (1, 256))
    assert head.plugins[0].fields == {"scale": "kFLOAT32"} and head.fp32_layers == ()
    assert trt.main(["--artifacts", str(art), "--plan-only", "--plugin-library", str(library)]) == 0
    out = capsys.readouterr().out
    assert "profile qformer_ids: min [1, 1] opt [1, 32] max [1, 256]" in out and "FAIL" not in out


def test_creator_is_read_from_the_plugin_source_and_matches_the_exporter():
    p = trt.creator_from_source()
    assert (p.name, p.version, p.namespace, p.fields) == ("ContextAttention", "1", "llamavid", {"scale": "kFLOAT32"})
    assert (PLUGIN["op_type"], PLUGIN["plugin_version"], PLUGIN["plugin_namespace"]) == (p.name, p.version, p.namespace)


def test_fp16_keeps_norms_softmax_and_reductions_fp32_and_int8_needs_a_cache(art, library, tmp_path):
    plan = trt.make_plan(art, precision="fp16", plugin_library=library)
    checks = trt.check_plan(plan)
    assert failed(checks) == {}
    msg = {c.stage: c.message for c in checks if c.name == "precision"}
    assert "NORMALIZATION, SOFTMAX, REDUCE" in msg["vision"] and "4 LayerNormalization, 2 Softmax" in msg["vision"]
    assert "8 LayerNormalization, 1 ReduceMean, 3 Softmax" in msg["head"]
    assert [sp.engine for sp in plan.stages] == ["vision.fp16.engine", "head.fp16.engine"]
    int8 = trt.make_plan(art, precision="int8", plugin_library=library)
    assert "int8 needs a calibration cache: expected --calibration-cache FILE, found none" in failed(trt.check_plan(int8))[("head", "precision")]
    cache = tmp_path / "calib.cache"
    cache.write_bytes(b"TRT-8601-EntropyCalibration2\n")                  # a header and no scale
    msg = failed(trt.check_plan(trt.make_plan(art, precision="int8", plugin_library=library, calibration_cache=cache)))
    assert "found none for 8 of 8 (e.g. '/Reshape_4_output_0'): a cache made for another model?" in msg[("vision", "precision")]
    names = [n.input[0] for g in ("vision.onnx", "head_trt.onnx") for n in onnx.load(str(art / g)).graph.node
             if n.op_type == "MatMul"]
    trt.write_calibration_cache(cache, dict.fromkeys(names, 0.01))       # both graphs' MatMul inputs
    assert failed(trt.check_plan(trt.make_plan(art, precision="int8", plugin_library=library, calibration_cache=cache))) == {}


def test_released_7b_video_shapes_are_covered():
    cfg = from_name(RELEASED)
    plan = trt.make_plan("unused", manifest_for(cfg))
    assert failed(trt.check_profiles(plan)) == {}
    vision, head = plan.stages
    assert vision.profile["pixel_values"].max == (64, 3, 224, 224)
    assert head.profile["vision_feats"] == trt.Dims((1, 257, 1408), (64, 257, 1408), (64, 257, 1408))
    assert head.profile["qformer_mask"].max == (1, 256) and plan.runtime["text"] == (1, 256)
    assert head.precision == "fp16" and head.fp32_layers == trt.FP32_LAYER_TYPES
    assert math.isclose(head.plugin_node["scale"], 1 / math.sqrt(1408))
    assert not any("positions" in n for n in plan.notes)         # 512 Q-Former positions >= 256 tokens


def test_narrow_model_with_the_7b_graph_structure_passes_every_check(tmp_path, library):
    cfg = narrow(from_name(RELEASED))
    assert (cfg.vision.num_patches, cfg.qformer.num_query, cfg.qformer.max_text_len) == (256, 32, 256)
    model = random_init(LlamaVid(cfg)).eval()
    export_vision(model, tmp_path / "vision.onnx")
    export_head(model, tmp_path / "head_trt.onnx", "plugin")
    plan = trt.make_plan(tmp_path, manifest_for(cfg), plugin_library=library)
    assert failed(trt.check_plan(plan)) == {}


# ---- each check fails clearly on a broken input ---------------------------------------------------
def test_profile_too_small_names_the_shape_and_what_the_runtime_needs(art, library):
    checks = trt.check_profiles(trt.make_plan(art, max_text=64, plugin_library=library))
    assert failed(checks) == {("head", "profiles"): failed(checks)[("head", "profiles")]}
    msg = failed(checks)[("head", "profiles")]
    assert "qformer_ids [1, 65] is outside the profile min [1, 1] max [1, 64]" in msg and "text up to 256" in msg
    msg = failed(trt.check_profiles(trt.make_plan(art, max_frames=16, plugin_library=library)))[("vision", "profiles")]
    assert "pixel_values [17, 3, 28, 28] is outside" in msg and "frames up to 64" in msg and "--max-frames" in msg
    plan = trt.make_plan(art, plugin_library=library)
    del head_plan(plan).profile["qformer_mask"]
    assert "expected a profile for exactly the inputs" in failed(trt.check_profiles(plan))[("head", "profiles")]


def test_unknown_unsupported_or_too_new_ops_are_named(art, library):
    plan = trt.make_plan(art, plugin_library=library)
    sp = head_plan(plan)
    model = trt.load_graph(art / sp.onnx)
    ops = {n.op_type: n for n in model.graph.node}
    ops["Sub"].op_type = "MatMulInteger"
    ops["Where"].op_type, ops["Where"].domain = "FusedMatMul", "com.microsoft"
    ops["Pow"].op_type = "RMSNormalization"
    msg = failed(trt.check_ops(sp, model, "10.3"))[("head", "ops")]
    assert f"MatMulInteger (domain 'ai.onnx', node '{ops['Sub'].name}'): TensorRT's ONNX parser lists it as unsupported" in msg
    assert "FusedMatMul (domain 'com.microsoft'" in msg and "no plugin of the plan provides it" in msg
    assert "RMSNormalization" in msg and "parsed since TensorRT 10.15, the plan targets 10.3" in msg
    model = trt.load_graph(art / sp.onnx)
    model.opset_import[0].version = 23
    assert "opset 23: TensorRT 10.3 parses opsets 9..20" in failed(trt.check_ops(sp, model, "10.3"))[("head", "ops")]
    assert failed(trt.check_ops(sp, model, "10.15")) == {}
    no_plugin = dataclasses.replace(sp, plugins=())
    msg = failed(trt.check_ops(no_plugin, trt.load_graph(art / sp.onnx)))[("head", "ops")]
    assert "ContextAttention (domain 'llamavid', node '/ContextAttention'): not an ONNX op and no plugin" in msg


def plugin_node(model):
    return next(n for n in model.graph.node if n.op_type == "ContextAttention")


def set_attribute(node, name, value):
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept + ([onnx.helper.make_attribute(name, value)] if value is not None else []))


@pytest.mark.parametrize("name, value, tensorrt, expect", [
    ("plugin_version", "2", "10.3", "plugin_version '2', the creator registers version '1'"),
    ("plugin_namespace", "", "10.3", "plugin_namespace '' (domain 'llamavid'), the creator registers namespace 'llamavid'"),
    ("plugin_namespace", None, "10.3", "plugin_namespace None (domain 'llamavid')"),
    ("scale", 2, "10.3", "field 'scale': the creator takes kFLOAT32 (attribute type FLOAT or FLOATS), the node has INT"),
    ("scale", 0.5, "10.3", "field 'scale' = 0.5, the manifest records 0.17677"),
    ("scale", None, "10.3", "field 'scale' (kFLOAT32) missing"),
    ("scal", 0.5, "10.3", "attributes ['scal'] are not fields of the creator (its fields: ['scale'])"),
])
def test_plugin_node_fields_must_match_the_creator(art, library, name, value, tensorrt, expect):
    sp = head_plan(trt.make_plan(art, plugin_library=library))
    model = trt.load_graph(art / sp.onnx)
    set_attribute(plugin_node(model), name, value)
    assert expect in failed(trt.check_plugin_nodes(sp, model, tensorrt))[("head", "plugin")]


def test_namespace_from_the_domain_is_enough_from_tensorrt_10_10(art, library):
    sp = head_plan(trt.make_plan(art, plugin_library=library))
    model = trt.load_graph(art / sp.onnx)
    set_attribute(plugin_node(model), "plugin_namespace", None)
    assert failed(trt.check_plugin_nodes(sp, model, "10.10")) == {}


def test_a_changed_creator_source_is_caught(art, library, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(kernels_build.SRC, src)
    header = src / "contextAttentionPlugin.h"
    header.write_text(header.read_text().replace('kCONTEXT_ATTENTION_VERSION = "1"', 'kCONTEXT_ATTENTION_VERSION = "2"'))
    sp = head_plan(trt.make_plan(art, plugin_library=library))
    sp = dataclasses.replace(sp, plugins=(trt.creator_from_source(src, library),))
    msg = failed(trt.check_plugin_nodes(sp, trt.load_graph(art / sp.onnx)))[("head", "plugin")]
    assert "the creator registers version '2'" in msg and "the manifest records ('ContextAttention', '1', 'llamavid')" in msg


def test_io_mismatch_names_the_tensor(art, library):
    sp = head_plan(trt.make_plan(art, plugin_library=library))
    io = {"inputs": {**sp.io["inputs"], "qformer_ids": {"shape": ["frames", 8], "dtype": "int32"}},
          "outputs": sp.io["outputs"]}
    msg = failed(trt.check_io(dataclasses.replace(sp, io=io), trt.load_graph(art / sp.onnx)))[("head", "io")]
    assert "qformer_ids: manifest ['frames', 8] int32, graph [1, '?'] int64" in msg


def test_plugin_library_missing_is_built_or_fails_with_the_reason(art, tmp_path, monkeypatch):
    sp = head_plan(trt.make_plan(art, plugin_library=tmp_path / "none.so"))
    monkeypatch.setattr(kernels_build, "find_tool", lambda name: f"/opt/{name}")
    monkeypatch.setattr(kernels_build, "find_tensorrt_include", lambda: tmp_path)
    check, = trt.check_library(sp)
    assert check.ok and "missing; build_engines builds it first" in check.message

    def no_nvcc(name):
        raise kernels_build.BuildError("nvcc not found on PATH")
    monkeypatch.setattr(kernels_build, "find_tool", no_nvcc)
    check, = trt.check_library(sp)
    assert not check.ok and "none.so missing and cannot be built here: nvcc not found on PATH" in check.message


# ---- the build ----------------------------------------------------------------------------------------
@pytest.mark.skipif(tensorrt_installed(), reason="tensorrt is installed here")
def test_engine_build_without_tensorrt_fails_clearly_and_writes_nothing(art, library, tmp_path, capsys, monkeypatch):
    before = sorted((p, p.stat().st_mtime_ns) for p in art.rglob("*"))
    assert trt.main(["--artifacts", str(art), "--plugin-library", str(library)]) == 2
    err = capsys.readouterr().err
    assert "expected the Python package `tensorrt`, found none" in err and "pip install tensorrt" in err
    assert "nothing was written" in err
    assert sorted((p, p.stat().st_mtime_ns) for p in art.rglob("*")) == before
    with pytest.raises(TensorrtUnavailable, match="python3-libnvinfer"):
        trt.build_engines(trt.make_plan(art, plugin_library=library))
    # python -m export.build --target tensorrt writes what the engines are built from, and names what it did not build
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)
    out = copy_art(art, tmp_path)
    assert build_mod.main(["--checkpoint", str(art.parent / "ckpt"), "--precision", "fp32", "--target", "tensorrt",
                           "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "[build] --target tensorrt: no TensorRT engines here (TensorRT: expected the Python package" in text
    assert "[build] llm: TensorRT-LLM engine not built here (TensorRT-LLM: expected the Python package" in text
    assert trt.check_plan(trt.make_plan(out, plugin_library=library)) == trt.check_plan(trt.make_plan(art, plugin_library=library))


class FakeTensorRT:
    """Just enough of the tensorrt module for build_engine's control flow; records what it was told."""

    def __init__(self, parse_errors=(), layers=()):
        self.calls, self.parse_errors, self.layers = [], list(parse_errors), list(layers)

    def module(self):
        fake, calls = types.ModuleType("tensorrt"), self.calls
        fake.__version__ = "10.3.0.26"
        fake.float32, fake.float16, fake.int64 = "float32", "float16", "int64"
        for kind, names in (("BuilderFlag", ("FP16", "INT8", "TF32", "OBEY_PRECISION_CONSTRAINTS")),
                            ("LayerType", ("NORMALIZATION", "SOFTMAX", "REDUCE", "MATRIX_MULTIPLY")),
                            ("MemoryPoolType", ("WORKSPACE",))):
            setattr(fake, kind, types.SimpleNamespace(**{n: n for n in names}))
        rec = lambda name: (lambda *a: calls.append((name, *a)))                    # noqa: E731
        fake.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
        network = types.SimpleNamespace(num_layers=len(self.layers), get_layer=self.layers.__getitem__)
        config = types.SimpleNamespace(set_memory_pool_limit=rec("workspace"), add_optimization_profile=rec("profile"),
                                       set_flag=rec("set_flag"), clear_flag=rec("clear_flag"))
        builder = types.SimpleNamespace(
            get_plugin_registry=lambda: types.SimpleNamespace(load_library=rec("load_library")),
            create_network=lambda flags: network, create_builder_config=lambda: config,
            create_optimization_profile=lambda: types.SimpleNamespace(set_shape=rec("set_shape")),
            build_serialized_network=lambda net, cfg: b"ENGINE")
        fake.Builder = lambda logger: builder
        errors = self.parse_errors
        fake.OnnxParser = lambda net, logger: types.SimpleNamespace(
            parse_from_file=lambda path: not errors, num_errors=len(errors), get_error=errors.__getitem__)
        return fake


def fake_layer(kind, dtype="float32"):
    layer = types.SimpleNamespace(type=kind, num_outputs=1, precision=None, out=[None],
                                  get_output=lambda i: types.SimpleNamespace(dtype=dtype))
    layer.set_output_type = lambda i, t: layer.out.__setitem__(i, t)
    return layer


@pytest.fixture
def fake_gpu(monkeypatch):
    from kernels import cuda_available
    monkeypatch.setattr(cuda_available, "cuda_available", lambda: (True, "1 CUDA device(s)"))
    monkeypatch.setattr(cuda_available, "compute_capability", lambda device=0: 87)

    def install(fake):
        monkeypatch.setitem(sys.modules, "tensorrt", fake.module())
    return install


def copy_art(art, tmp_path):
    shutil.copytree(art, tmp_path / "art")
    return tmp_path / "art"


def test_build_prints_every_parser_error_and_leaves_nothing(art, library, tmp_path, fake_gpu):
    out = copy_art(art, tmp_path)
    fake_gpu(FakeTensorRT(parse_errors=["In node 3 (Foo): UNSUPPORTED_NODE", "In node 9 (Bar): INVALID_NODE"]))
    before = sorted(p.name for p in out.iterdir())
    lines = []
    with pytest.raises(RuntimeError, match="ONNX parser failed with 2 error"):
        trt.build_engines(trt.make_plan(out, plugin_library=library), log=lines.append)
    assert lines == ["[trt] vision.onnx: parser error 1/2: In node 3 (Foo): UNSUPPORTED_NODE",
                     "[trt] vision.onnx: parser error 2/2: In node 9 (Bar): INVALID_NODE"]
    assert sorted(p.name for p in out.iterdir()) == before


def test_build_sets_profiles_and_precision_and_records_the_engines(art, library, tmp_path, fake_gpu):
    out = copy_art(art, tmp_path)
    norm, mm, shape_reduce = fake_layer("NORMALIZATION"), fake_layer("MATRIX_MULTIPLY"), fake_layer("REDUCE", "int64")
    fake = FakeTensorRT(layers=[norm, mm, shape_reduce])
    fake_gpu(fake)
    plan = trt.make_plan(out, precision="fp16", plugin_library=library)
    built = trt.build_engines(plan, log=lambda *_: None)
    assert built == {"tensorrt": "10.3.0.26", "sm": 87}
    assert (out / "vision.fp16.engine").read_bytes() == b"ENGINE" and not list(out.glob(".*.tmp-*"))
    assert ("set_shape", "qformer_ids", (1, 1), (1, 32), (1, 256)) in fake.calls
    assert ("load_library", str(library)) in fake.calls and ("set_flag", "OBEY_PRECISION_CONSTRAINTS") in fake.calls
    assert (norm.precision, norm.out, mm.precision, shape_reduce.precision) == ("float32", ["float32"], None, None)
    m = read_manifest(trt.record_engines(plan, built).parent)                    # hashes verified
    first = m["stages"]["head"]["variants"][0]
    assert (first["file"], first["backend"], first["source"], first["built_with"]) == (
        "head.fp16.engine", "tensorrt", "head_trt.onnx", {"tensorrt": "10.3.0.26", "sm": 87})
    assert first["plugins"][0]["library"] == kernels_build.PLUGIN_LIBRARY


# ---- wired into python -m export.build and the runtime (stand-in tensorrt and GPU) -----------------------
def engine_count(fake):
    return sum(call[0] == "profile" for call in fake.calls)          # one optimisation profile per engine built


def test_tensorrt_target_builds_the_engines_once_and_keeps_them_on_rerun(art, library, tmp_path, fake_gpu, monkeypatch):
    fake = FakeTensorRT()
    fake_gpu(fake)
    ckpt, out, lines = art.parent / "ckpt", tmp_path / "trt", []

    def no_nvcc(name):
        raise kernels_build.BuildError("nvcc not found on PATH")
    monkeypatch.setattr(kernels_build, "DEFAULT_OUT", tmp_path / "no-plugin")
    monkeypatch.setattr(kernels_build, "find_tool", no_nvcc)
    with pytest.raises(build_mod.BuildError, match=r"(?s)TensorRT engine plan: 1 check\(s\) failed, no engine built.*"
                                                   r"FAIL head   library .*cannot be built here: nvcc not found"):
        build_mod.build(ckpt, "fp32", out, "tensorrt", log=lines.append)
    assert read_manifest(out)["stages"]["head"]["variants"][0]["file"] == "head.onnx"       # the ONNX stages stand
    monkeypatch.setattr(kernels_build, "DEFAULT_OUT", library.parent)
    fake_gpu(FakeTensorRT(parse_errors=["In node 3 (Foo): UNSUPPORTED_NODE"]))
    with pytest.raises(build_mod.BuildError, match=r"TensorRT engine build: vision.onnx: TensorRT's ONNX parser failed "
                                                   r"with 1 error\(s\): In node 3 \(Foo\): UNSUPPORTED_NODE"):
        build_mod.build(ckpt, "fp32", out, "tensorrt", log=lines.append)
    fake_gpu(fake)
    lines.clear()
    build_mod.build(ckpt, "fp32", out, "tensorrt", log=lines.append)
    assert sum("unchanged, skipped" in line for line in lines) == 4
    assert "[build] engines: building vision.fp32.engine, head.fp32.engine ..." in lines and engine_count(fake) == 2
    m = read_manifest(out)
    assert [m["stages"][s]["variants"][0]["file"] for s in ("vision", "head")] == ["vision.fp32.engine", "head.fp32.engine"]
    lines.clear()
    build_mod.build(ckpt, "fp32", out, "tensorrt", log=lines.append)
    assert "[build] engines: unchanged, skipped" in lines and engine_count(fake) == 2
    assert read_manifest(out) == m
    sys.modules["tensorrt"].__version__ = "10.4.0.26"                # another TensorRT: engines rebuilt, ONNX kept
    lines.clear()
    build_mod.build(ckpt, "fp32", out, "tensorrt", log=lines.append)
    assert sum("unchanged, skipped" in line for line in lines) == 5 and engine_count(fake) == 4   # 4 stages + trtllm
    assert read_manifest(out)["stages"]["vision"]["variants"][0]["built_with"] == {"tensorrt": "10.4.0.26", "sm": 87}


def test_tensorrt_runs_only_engines():
    """Where the core's TensorRT backend runs (tests/test_c_backends.py) it comes first, for engine variants."""
    source, ort_cpu = {"file": "head_trt.onnx", "backend": "tensorrt"}, {"file": "head.onnx", "backend": "ort-cpu"}
    engine = {"file": "head.fp16.engine", "backend": "tensorrt"}
    assert choose_variant([source, ort_cpu], ["tensorrt", "ort-cpu"]) is ort_cpu
    assert choose_variant([source, ort_cpu, engine], ["tensorrt", "ort-cpu"]) is engine
    assert choose_variant([source], ["tensorrt"]) is None


def test_frames_are_chunked_by_an_engine_profile_below_the_runtime_chunk(art, library):
    m = read_manifest(art)
    engines = trt.engine_variants(trt.make_plan(art, max_frames=16, plugin_library=library), {"tensorrt": "10.3", "sm": 87})
    onnx_only = {s: m["stages"][s]["variants"][0] for s in ("vision", "head")}
    assert frame_chunk(m, onnx_only) == FRAME_CHUNK
    assert frame_chunk(m, {**onnx_only, "head": engines["head"]}) == 16
