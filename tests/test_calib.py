"""calib/: calibration clips (the shipped set is what its documented command writes; frames as the runtime
samples them), range methods against numpy on known data, the Q/DQ graph against its own arithmetic in
numpy and fused by ONNX Runtime into integer MatMuls, the TensorRT cache format, the expanded plugin
graph, weight-only LLM graphs; the int8 build of a tiny checkpoint (manifest record, TensorRT plan checks
explicit and implicit, python -m calib) and of the default model (its sample clip, visual tokens close to
fp32); and every bad input: wrong shape or dtype, an empty set, NaN ranges, another model's cache or
ranges, nothing written on failure."""
import json
import shutil
import struct

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import llamavid_ref
from calib import data, llm, qdq, ranges
from calib.__main__ import main as calib_main
from export import build as build_mod
from export import trt
from export.common import OPSET, save_model
from llamavid_ref.checkpoint import DEFAULT_MODEL_DIR
from llamavid_ref.data import world
from runtime.manifest import read_manifest
from runtime.pipeline import Pipeline
from test_export_build import quiet, tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny checkpoint built at int8 with the shipped clips (default method) -> (checkpoint, artifacts)."""
    root = tmp_path_factory.mktemp("calib")
    ckpt = tiny_checkpoint(root, fused=True)
    return ckpt, build_mod.build(ckpt, "int8", root / "art", "ort", log=quiet)


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    path = tmp_path_factory.mktemp("lib") / "libplugin.so"          # check (d) only asks whether it exists
    path.write_bytes(b"\x7fELF")
    return path


def cos(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


# ---- calibration data -------------------------------------------------------------------------------
def test_shipped_clips_are_what_the_documented_command_writes(tmp_path):
    world.generate(tmp_path, {"train": 32}, seed=0, log=quiet)          # the command in calib/data.py
    shipped = data.DEFAULT_DATA
    assert (tmp_path / "train.json").read_bytes() == (shipped / "train.json").read_bytes()
    for p in sorted((tmp_path / "videos/train").iterdir()):
        assert p.read_bytes() == (shipped / "videos/train" / p.name).read_bytes(), p.name
    clips = data.clips()
    assert len(clips) == 32 and clips[0].question == "How many shapes are in the last frame?"
    assert sum(p.stat().st_size for p in shipped.rglob("*") if p.is_file()) < 300_000
    assert data.data_sha256(data.clips(tmp_path)) == data.data_sha256(clips)      # content, not paths


def test_frames_are_sampled_as_the_runtime_samples_them(tiny):
    _, art = tiny
    pipe = Pipeline.open(art)
    clip = data.clips()[3]
    batches = list(data.vision_batches([clip], data.Preprocess.of(pipe.manifest), 5))
    assert [b["pixel_values"].shape for b in batches] == [(5, 3, 28, 28), (3, 3, 28, 28)]   # 8 s at 1 fps
    np.testing.assert_array_equal(np.concatenate([b["pixel_values"] for b in batches]), pipe.load_media(clip.video))


def test_a_folder_of_clips_with_questions(tmp_path):
    for name in ("b.mp4", "a.mp4", "c.mp4"):
        shutil.copy(data.clips()[0].video, tmp_path / name)
    (tmp_path / "questions.txt").write_text("Where is the ball?\n\nWho enters?\n")
    got = [(c.video.name, c.question) for c in data.clips(tmp_path)]
    assert got == [("a.mp4", "Where is the ball?"), ("b.mp4", "Who enters?"), ("c.mp4", "Where is the ball?")]


@pytest.mark.parametrize("name, content, expected", [
    ("empty", None, "calibration data {p}: expected one of ['calib.json', 'train.json', 'val.json', 'test.json'] or "
                    "video files (.mp4, .avi, .mkv, .mov, .webm), found neither: an empty calibration set"),
    ("missing", False, "calibration data {p}: expected a LLaVA-style .json, a folder with one of ['calib.json', "
                       "'train.json', 'val.json', 'test.json'], or a folder of clips (.mp4, .avi, .mkv, .mov, .webm); "
                       "found nothing"),
    ("d.json", "[]", "calibration data {p}: expected at least one entry, found an empty list"),
    ("d.json", '[{"image": "x.png"}]', "calibration data {p}: entry 0: expected {{'video': ..., 'conversations': "
                                       "[{{'value': question}}, ...]}}, found {{'image': 'x.png'}}"),
])
def test_bad_calibration_data_is_named(tmp_path, name, content, expected):
    p = tmp_path / name
    if content is None:
        p.mkdir()
    elif content:
        p.write_text(content)
    with pytest.raises(data.CalibrationError) as e:
        data.clips(p)
    assert str(e.value) == expected.format(p=p)


# ---- ranges ---------------------------------------------------------------------------------------------
def identity_graph(tmp_path, shape=("n", 8)):
    """y = relu(x): the tensors x and y to calibrate."""
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))])
    return save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)]), tmp_path / "g.onnx")


def test_methods_against_numpy(tmp_path):
    path = identity_graph(tmp_path)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((4000, 8)).astype(np.float32) * s for s in (1.0, 3.0)]    # the range widens later
    xs[1][7, 3] = 200.0                                                                  # one outlier
    got = {m: ranges.collect({"g": (path, ["x", "y"])}, [{"x": x} for x in xs], m)["g"] for m in ranges.METHODS}
    a = np.abs(np.concatenate(xs))
    assert got["minmax"].amax["x"] == 200.0 and got["minmax"].seen["x"] == [float(np.concatenate(xs).min()), 200.0]
    width = 200.0 / ranges.BINS * 2                                   # bins after widening by a whole factor
    assert abs(got["percentile"].amax["x"] - np.percentile(a, ranges.PERCENTILE)) <= width
    assert 6.0 < got["entropy"].amax["x"] < 20.0                      # clips the outlier, keeps the 3-sigma bulk
    assert got["minmax"].scale("y") == pytest.approx(200.0 / 127) and got["minmax"].batches == 2


def test_entropy_threshold_of_a_gaussian():
    hist = np.histogram(np.abs(np.random.default_rng(1).standard_normal(400_000)), ranges.BINS, (0, 5.0))[0]
    amax = ranges.entropy_threshold(hist) * 5.0 / ranges.BINS
    assert 3.0 < amax < 4.8                                           # TensorRT-style entropy: ~3.5-4.5 sigma


@pytest.mark.parametrize("batch, expected", [
    ({"x": np.zeros((2, 8), np.float64)}, "calibration batch 0: x: expected float32 [?, 8], found float64 [2, 8]"),
    ({"x": np.zeros((2, 4), np.float32)}, "calibration batch 0: x: expected float32 [?, 8], found float32 [2, 4]"),
    ({"pixel_values": np.zeros((2, 8), np.float32)}, "calibration batch 0: expected inputs ['x'], found ['pixel_values']"),
    ([np.zeros((2, 8), np.float32)], "calibration batch 0: expected a dict {input name: array}, found list"),
])
def test_batches_of_the_wrong_shape_or_dtype_are_refused(tmp_path, batch, expected):
    with pytest.raises(data.CalibrationError) as e:
        ranges.collect({"g": (identity_graph(tmp_path), ["y"])}, [batch], "minmax")
    assert str(e.value) == expected


def test_empty_data_and_nan_ranges_are_refused(tmp_path):
    path = identity_graph(tmp_path)
    with pytest.raises(data.CalibrationError, match=r"expected at least one batch with the inputs \{'g.onnx': \['x'\]\}, "
                                                    r"found none \(an empty calibration set\)"):
        ranges.collect({"g": (path, ["y"])}, iter([]), "percentile")
    x = np.ones((2, 8), np.float32)
    x[1, 2] = np.inf
    with pytest.raises(data.CalibrationError, match="calibration batch 0: tensor y of g.onnx holds NaN or infinite"):
        ranges.collect({"g": (path, ["y"])}, [{"x": x}], "minmax")
    with pytest.raises(data.CalibrationError, match=r"expected one of \['minmax', 'entropy', 'percentile'\], found 'kl'"):
        ranges.collect({"g": (path, ["y"])}, [{"x": x}], "kl")


def test_ranges_made_for_another_graph_are_refused(tmp_path):
    r = ranges.collect({"g": (identity_graph(tmp_path), ["y"])}, [{"x": np.ones((1, 8), np.float32)}], "minmax")
    path = ranges.save(tmp_path / "r.json", r)
    assert ranges.load(path, {"g": r["g"].graph_sha256})["g"].amax == {"y": 1.0}
    with pytest.raises(data.CalibrationError, match="ranges collected on g.onnx sha256 .* expected sha256 abc: made for "
                                                    "another model; calibrate again"):
        ranges.load(path, {"g": "abc"})


# ---- Q/DQ graphs --------------------------------------------------------------------------------------
def linear_graph(tmp_path, w):
    """y = (x @ w) + (x @ w), x [1,n,K] as the exporters' activations: one activation feeding two weight MatMuls
    (a shared input, as q/k/v)."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="mm_a"), helper.make_node("MatMul", ["x", "w"], ["b"], name="mm_b"),
             helper.make_node("Add", ["a", "b"], ["y"])]
    g = helper.make_graph(nodes, "lin", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "n", w.shape[0]])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "n", w.shape[1]])],
                          [numpy_helper.from_array(w, "w")])
    return save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)]), tmp_path / "lin.onnx")


def test_qdq_graph_computes_its_int8_arithmetic_and_ort_fuses_it(tmp_path):
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((64, 48)) * np.linspace(0.1, 3, 48)).astype(np.float32)    # columns of different scale
    x = rng.standard_normal((1, 32, 64)).astype(np.float32)
    src = linear_graph(tmp_path, w)
    r = ranges.collect({"lin": (src, ["x"])}, [{"x": x}], "minmax")["lin"]
    dst = qdq.insert_qdq(src, tmp_path / "lin.int8.onnx", r)
    sx = np.float32(np.abs(x).max() / 127)
    sw = np.abs(w).max(0) / np.float32(127)
    expect = 2 * (np.clip(np.rint(x / sx), -128, 127) * sx) @ (np.clip(np.rint(w / sw), -127, 127) * sw)
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    got = ort.InferenceSession(str(dst), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-4 * np.abs(expect).max())
    m = onnx.load(str(dst))
    dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and "weight" in n.name]
    assert len(dq) == 2 and all(helper.get_attribute_value(n.attribute[0]) == 1 for n in dq)       # axis 1: per column
    zps = [numpy_helper.to_array(t) for t in m.graph.initializer if t.name.endswith("zero_point")]
    assert all(z.dtype == np.int8 and not z.any() for z in zps)                                    # symmetric int8
    fused = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert fused.count("MatMulIntegerToFloat") == 2 and "MatMul" not in fused    # one Q/DQ pair per consumer


def test_expanded_plugin_graph_equals_the_standard_head(tiny):
    _, art = tiny
    expanded = qdq.expand_plugin(onnx.load(str(art / "head_trt.onnx")))
    assert {n.domain for n in expanded.graph.node} == {""}
    rng = np.random.default_rng(3)
    feeds = {"vision_feats": rng.standard_normal((3, 17, 32)).astype(np.float32),
             "qformer_ids": np.array([[2, 7, 9, 3]], np.int64), "qformer_mask": np.ones((1, 4), np.int64)}
    a = ort.InferenceSession(expanded.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    b = ort.InferenceSession(str(art / "head.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert np.abs(a - b).max() / np.abs(b).max() < 1e-5


# ---- TensorRT cache ---------------------------------------------------------------------------------------
def test_calibration_cache_format(tmp_path):
    path = trt.write_calibration_cache(tmp_path / "c.cache", {"x": 1.0, "/blk/Add_output_0": 2.0 / 127}, "10.3")
    assert path.read_text().splitlines() == ["TRT-100300-EntropyCalibration2", "x: 3f800000",
                                             f"/blk/Add_output_0: {struct.pack('>f', 2.0 / 127).hex()}"]
    header, scales = trt.read_calibration_cache(path)
    assert header == "TRT-100300-EntropyCalibration2" and scales["x"] == 1.0
    assert trt.cache_header("10.14.1.48") == "TRT-101401-EntropyCalibration2"
    path.write_text("TRT-100300-EntropyCalibration2\nx: 1.0\n")
    with pytest.raises(trt.PlanError, match=r"c.cache:2: expected '<tensor>: <8 hex digits>', found 'x: 1.0'"):
        trt.read_calibration_cache(path)


# ---- the int8 build -------------------------------------------------------------------------------------
def test_int8_build_records_the_calibration(tiny):
    _, art = tiny
    m = read_manifest(art)
    assert m["build"]["calibration"] == {"method": "minmax", "llm_weights": "int4", "data": {
        "source": "default (llamavid_ref/default_model/calib)", "clips": 32, "sha256": data.data_sha256(data.clips())}}
    v = {s: [(x["file"], x["precision"], x["backend"]) for x in m["stages"][s]["variants"]] for s in m["stages"]}
    assert v == {"vision": [("vision.int8.onnx", "int8", "ort-cpu"), ("vision.onnx", "fp32", "ort-cuda"),
                            ("vision.int8.onnx", "int8", "tensorrt")],
                 "head": [("head.int8.onnx", "int8", "ort-cpu"), ("head.onnx", "fp32", "ort-cuda"),
                          ("head_trt.int8.onnx", "int8", "tensorrt")],
                 "llm": [("llm/decoder.int4.onnx", "int4", "ort-cpu"), ("llm/decoder.onnx", "fp32", "ort-cuda")]}
    tv = m["stages"]["vision"]["variants"][2]
    assert tv["trt_cache"] == {"file": "calib/vision.trt.cache", "source": "vision.onnx",
                               "source_sha256": m["files"]["vision.onnx"]}
    recorded = ranges.load(art / "calib/vision.ranges.json", {"vision": m["files"]["vision.onnx"]})["vision"]
    _, scales = trt.read_calibration_cache(art / tv["trt_cache"]["file"])
    assert all(scales[n] == pytest.approx(recorded.scale(n), rel=1e-6) for n in recorded.amax)   # same statistics
    graph = onnx.load(str(art / "vision.int8.onnx")).graph
    q_scales = {t.name: float(numpy_helper.to_array(t)) for t in graph.initializer if "/qdq" in t.name
                and t.name.endswith("/scale")}
    assert len(q_scales) == 12                                   # 2 blocks: q, k, v, proj, fc1, fc2
    for name, s in q_scales.items():
        assert s == pytest.approx(recorded.scale(name.rsplit("/qdq", 1)[0]), rel=1e-6)
    assert {"QuantizeLinear", "DequantizeLinear", "LayerNormalization", "Softmax"} <= {n.op_type for n in graph.node}


def test_int8_build_passes_the_tensorrt_plan_checks_explicit_and_implicit(tiny, library, tmp_path):
    _, art = tiny
    explicit = trt.make_plan(art, plugin_library=library)
    assert [(sp.onnx, sp.precision, sp.calibration_cache) for sp in explicit.stages] == [
        ("vision.int8.onnx", "int8", None), ("head_trt.int8.onnx", "int8", None)]
    checks = trt.check_plan(explicit)
    assert [c for c in checks if not c.ok] == []
    assert "explicit quantization" in next(c.message for c in checks if c.name == "precision" and c.stage == "head")
    implicit = trt.make_plan(art, plugin_library=library, int8="implicit")
    assert [(sp.onnx, sp.calibration_cache) for sp in implicit.stages] == [
        ("vision.onnx", str(art / "calib/vision.trt.cache")), ("head_trt.onnx", str(art / "calib/head_trt.trt.cache"))]
    assert [c for c in trt.check_plan(implicit) if not c.ok] == []
    for mode, head in (("explicit", ("head.int8.onnx", None)), ("implicit", ("head.onnx", str(art / "calib/head.trt.cache")))):
        standard = trt.make_plan(art, plugin_library=library, int8=mode, context_attention="standard")
        assert (standard.stages[1].onnx, standard.stages[1].calibration_cache) == head     # the head without the plugin
        assert [c for c in trt.check_plan(standard) if not c.ok] == []
    assert trt.main(["--artifacts", str(art), "--plan-only", "--plugin-library", str(library), "--int8", "implicit"]) == 0
    # a cache recorded for another model: the manifest's hash of the graph it was made for differs
    m = read_manifest(art)
    m["stages"]["vision"]["variants"][2]["trt_cache"]["source_sha256"] = "0" * 64
    bad = {(c.stage, c.name): c.message for c in trt.check_plan(trt.make_plan(art, m, plugin_library=library,
                                                                                 int8="implicit")) if not c.ok}
    assert list(bad) == [("vision", "precision")]
    assert f"was made for another model: calibrated on sha256 {'0' * 64}, vision.onnx is sha256 " \
           f"{m['files']['vision.onnx']}" in bad[("vision", "precision")]
    # a user's cache for another graph: no scale for this graph's MatMul inputs
    other = trt.write_calibration_cache(tmp_path / "other.cache", {"/encoder/MatMul_output_0": 0.1})
    bad = {(c.stage, c.name): c.message for c in trt.check_plan(trt.make_plan(
        art, plugin_library=library, int8="implicit", calibration_cache=other)) if not c.ok}
    assert "a cache made for another model?" in bad[("vision", "precision")] and ("head", "precision") in bad


def test_int8_pipeline_runs_and_the_calib_cli_inspects_it(tiny, tmp_path, capsys):
    ckpt, art = tiny
    pipe = Pipeline.open(art)
    assert pipe.describe() == ("vision: vision.int8.onnx int8 on ort-cpu, head: head.int8.onnx int8 on ort-cpu, "
                               "llm: llm/decoder.int4.onnx int4 on ort-cpu")
    assert calib_main(["--artifacts", str(art), "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "[vision] vision.onnx: 32 batches, 8 quantized inputs" in out            # 32 clips of 8 frames
    assert "vision.int8.onnx vs vision.onnx on this data" in out                     # the build's own int8 graph
    rows = [line for line in out.splitlines() if "(stage output)" in line]
    assert len(rows) == 2 and all(float(r.split("|")[2]) > 0.999 for r in rows)       # tiny random weights
    recorded = ranges.load(art / "calib/head.ranges.json", {})["head"]
    name = qdq.quantized_inputs(onnx.load(str(art / "head.onnx")))[0]
    assert f"| {name} |" in out and f"| {recorded.amax[name]:.4g} |" in out
    fp32 = build_mod.build(ckpt, "fp32", tmp_path / "fp32", "ort", log=quiet)         # no int8 graph: made from DATA
    assert calib_main(["--artifacts", str(fp32), "--method", "percentile", "--top", "0"]) == 0
    out = capsys.readouterr().out
    assert "int8 from these ranges vs head.onnx on this data" in out and "recorded: none" in out


def test_calibration_failures_write_nothing(tiny, tmp_path):
    ckpt, _ = tiny
    (tmp_path / "empty").mkdir()
    out = tmp_path / "art"
    assert build_mod.main(["--checkpoint", str(ckpt), "--precision", "int8", "--calib", str(tmp_path / "empty"),
                           "--out", str(out)]) == 2
    assert not out.exists()
    with pytest.raises(build_mod.BuildError, match="--calib / --calib-method: expected --precision int8, found "
                                                   "--precision fp32"):
        build_mod.build(ckpt, "fp32", out, calib_method="minmax", log=quiet)
    assert not out.exists()


# ---- the LLM, weight-only ---------------------------------------------------------------------------------
# last-position logits against the fp32 decoder, tiny random weights: measured max rel err 0.098 / 0.019,
# cosine 0.9901 / 0.99966 (int8 also quantizes activations per block inside the op: accuracy_level 4)
@pytest.mark.parametrize("bits, bound, min_cos", [(4, 0.25, 0.98), (8, 0.05, 0.999)])
def test_weight_only_llm(tiny, tmp_path, bits, bound, min_cos):
    _, art = tiny
    dst = llm.weight_only(art / "llm/decoder.onnx", tmp_path / f"d{bits}.onnx", bits)
    nodes = onnx.load(str(dst)).graph.node
    nbits = [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in nodes if n.op_type == "MatMulNBits"]
    assert not [n for n in nodes if n.op_type == "MatMul"] and len(nbits) == 5 * 2 + 1    # 2 layers of qkv, o, gate,
    assert all((a["bits"], a["block_size"], a["accuracy_level"]) == (bits, 32, 4) for a in nbits)    # up, down; lm_head
    m = read_manifest(art)
    c = m["llm"]
    rng = np.random.default_rng(4)
    feeds = {"inputs_embeds": rng.standard_normal((1, 6, c["hidden"])).astype(np.float32),
             "attention_mask": np.ones((1, 6), np.int64),
             **{n: np.zeros((1, c["kv_heads"], c["context"], c["head_dim"]), np.float32) for n in c["past_names"]}}
    a, b = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
            for p in (art / "llm/decoder.onnx", dst))
    assert np.abs(a - b).max() / np.abs(a).max() < bound and cos(a, b) > min_cos


# ---- the default model ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_default_model_int8_answers_its_sample_and_stays_close_to_fp32(tmp_path):
    art8 = build_mod.build(None, "int8", tmp_path / "art8", "ort", log=quiet)
    art32 = build_mod.build(None, "fp32", tmp_path / "art32", "ort", log=quiet)
    sample = json.loads((DEFAULT_MODEL_DIR / "sample.json").read_text())
    p8, p32 = Pipeline.open(art8), Pipeline.open(art32)
    assert p8.ask(DEFAULT_MODEL_DIR / sample["video"], sample["question"], max_new_tokens=8) == sample["answer"]
    px = p8.load_media(DEFAULT_MODEL_DIR / sample["video"])
    ids, mask = p8.qformer_tokenizer([sample["question"]])

    def tokens(p):
        feats = p.stages["vision"].infer({"pixel_values": px})["vision_feats"]
        return p.stages["head"].infer({"vision_feats": feats, "qformer_ids": ids, "qformer_mask": mask})["frame_tokens"]
    assert cos(tokens(p8), tokens(p32)) > 0.999                  # measured 0.99977 (minmax)
    assert llamavid_ref.load().ask(DEFAULT_MODEL_DIR / sample["video"], sample["question"], max_new_tokens=8) \
        == sample["answer"]
