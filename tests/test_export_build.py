"""python -m export.build on tiny checkpoints: manifest contents, every ONNX variant's tensors as the
manifest says, skipping unchanged stages, the TensorRT and auto targets without TensorRT or a CUDA
device (the ONNX stages are written and the missing engines named), and the manifest reader's errors."""
import dataclasses
import json
import shutil
import sys
import types

import pytest

import llamavid_ref
from export import build as build_mod
from export.build import build
from runtime.manifest import MANIFEST_VERSION, ManifestError, read_manifest
from llamavid_ref.config import from_name
from llamavid_ref.tiny import tiny_model
from runtime.backends.ort import OrtBackend


def tiny_checkpoint(root, fused: bool, seed: int = 3):
    """A tiny model saved in the project format. fused=True widens the LLM to head_dim 16, the
    smallest GroupQueryAttention accepts, so the fused decoder is built; else the plain one."""
    cfg = from_name("tiny")
    if fused:
        cfg.llm = dataclasses.replace(cfg.llm, hidden=64)
    model = tiny_model(root / "src", seed=seed, cfg=cfg)
    return llamavid_ref.save(model, root / "ckpt")


def quiet(*_):
    pass


def open_onnx_variants(art):
    """Open every variant ORT runs with its tensors checked against the manifest (fp16 and int8 graphs
    keep fp32 inputs and outputs)."""
    m = read_manifest(art)
    opened = [OrtBackend("ort-cpu").open_stage(art / v["file"], io=entry)
              for entry in m["stages"].values() for v in entry["variants"] if v["backend"] != "tensorrt"]
    assert opened


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("build")
    ckpt = tiny_checkpoint(root, fused=True)
    return ckpt, build(ckpt, "fp16", root / "art", "auto", log=quiet)


def test_manifest_is_the_contract(built):
    _, art = built
    m = read_manifest(art)
    assert m["manifest_version"] == MANIFEST_VERSION
    assert m["model"]["tokens_per_frame"] == 2
    assert m["special_ids"] == {"bos": 1, "eos": 2, "pad": 0, "image": -200}
    assert m["prompt"]["roles"] == ["USER", "ASSISTANT"] and m["prompt"]["sep2"] == "</s>"
    assert m["preprocess"]["image_size"] == 28 and len(m["preprocess"]["mean"]) == 3
    assert m["tokenizers"] == {"llm": "tokenizer/tokenizer.json", "qformer": "tokenizer/qformer_vocab.txt",
                               "qformer_max_length": 256}
    assert m["llm"]["kv_layout"] == "shared" and m["llm"]["context"] == 512
    head = m["stages"]["head"]
    assert head["inputs"]["qformer_ids"] == {"shape": [1, "text"], "dtype": "int64"}    # one question per call
    assert head["outputs"]["frame_tokens"]["shape"] == ["frames", 2, 64]
    assert m["stages"]["llm"]["inputs"]["past_key_values.1.value"]["shape"] == ["batch", 2, "max_seq", 16]
    # fp16 on a CPU-only machine: the fp32 graphs for ort-openvino (bf16) and ort-cpu, fp16 graphs for ort-cuda,
    # the plugin graph for TensorRT; the LLM decodes on ort-cpu and may prefill on ort-openvino (plain graph)
    by_backend = [(v["backend"], v["precision"], v["file"]) for v in m["stages"]["vision"]["variants"]]
    assert by_backend == [("ort-openvino", "bf16", "vision.onnx"), ("ort-cpu", "fp32", "vision.onnx"),
                          ("ort-cuda", "fp16", "vision.fp16.onnx")]
    llm = [(v["backend"], v["precision"], v["file"], v.get("role")) for v in m["stages"]["llm"]["variants"]]
    assert llm == [("ort-cpu", "fp32", "llm/decoder.onnx", None), ("ort-cuda", "fp16", "llm/decoder.fp16.onnx", None),
                   ("ort-openvino", "bf16", "llm/prefill.onnx", "prefill")]
    trt = [v for v in head["variants"] if v["backend"] == "tensorrt"]
    assert trt[0]["file"] == "head_trt.onnx" and trt[0]["plugin"]["op_type"] == "ContextAttention"
    for name in ("vision.onnx", "vision.fp16.onnx", "head.onnx", "head_trt.onnx", "llm/decoder.onnx",
                 "llm/decoder.fp16.onnx", "llm/embed_tokens.npy", "tokenizer/tokenizer.json"):
        assert len(m["files"][name]) == 64
    assert set(m["versions"]) == {"package", "onnx", "onnxruntime", "torch"}
    open_onnx_variants(art)


def test_rerun_skips_unchanged_stages_and_redoes_changed_ones(built, tmp_path):
    ckpt, art = built
    lines = []
    build(ckpt, "fp16", art, "auto", log=lines.append)
    assert sum("unchanged, skipped" in line for line in lines) == 4
    # a damaged file makes only its stage run again
    (art / "head.onnx").write_bytes(b"broken")
    lines.clear()
    build(ckpt, "fp16", art, "auto", log=lines.append)
    assert [line.split()[2] for line in lines if "exporting" in line] == ["head:"]
    read_manifest(art)
    # another precision changes the build key: every stage runs
    out = tmp_path / "int8"
    shutil.copytree(art, out)
    lines.clear()
    build(ckpt, "int8", out, "auto", log=lines.append)
    assert sum("exporting" in line for line in lines) == 4
    assert read_manifest(out)["stages"]["vision"]["variants"][0]["precision"] == "int8"
    open_onnx_variants(out)


def test_build_key_follows_the_traced_reference_sources(built, tmp_path, monkeypatch):
    ckpt, _ = built
    dirs = [tmp_path / d.name for d in build_mod.SOURCE_DIRS]
    for src, dst in zip(build_mod.SOURCE_DIRS, dirs):                 # the .py files build_key reads
        dst.mkdir()
        for p in src.glob("*.py"):
            shutil.copy(p, dst)
    assert [d.name for d in build_mod.SOURCE_DIRS] == ["export", "llamavid_ref", "calib"]
    monkeypatch.setattr(build_mod, "SOURCE_DIRS", tuple(dirs))
    key = build_mod.build_key(ckpt, {"precision": "fp16"})
    assert build_mod.build_key(ckpt, {"precision": "fp16"}) == key
    llm = dirs[1] / "llm.py"
    llm.write_text(llm.read_text() + "\n# an edit to a module the exporters trace\n")
    assert build_mod.build_key(ckpt, {"precision": "fp16"}) != key


def test_plan_table_says_what_runs_where(built):
    _, art = built
    table = build_mod.plan_table(read_manifest(art), ["ort-cpu"])
    assert "| vision | vision.onnx | fp32 | ort-cpu | yes |" in table
    assert "| vision | vision.fp16.onnx | fp16 | ort-cuda | no: backend not on this machine |" in table
    table = build_mod.plan_table(read_manifest(art), ["ort-openvino", "ort-cpu"])
    assert "| vision | vision.onnx | bf16 | ort-openvino | yes |" in table
    assert "| llm | llm/decoder.onnx | fp32 | ort-cpu | yes |" in table
    assert "| llm (prefill) | llm/prefill.onnx | bf16 | ort-openvino | yes |" in table
    table = build_mod.plan_table(read_manifest(art), ["tensorrt", "ort-cpu"])
    assert "| head | head_trt.onnx | fp16 | tensorrt | no: an engine's ONNX source |" in table
    assert "| head | head.onnx | fp32 | ort-cpu | yes |" in table


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)          # import tensorrt -> ModuleNotFoundError


def test_tensorrt_target_without_tensorrt_writes_the_onnx_stages_and_says_so(built, tmp_path, no_tensorrt, monkeypatch):
    """What TensorRT needs is prepared here, the engines are built where TensorRT is (tests/test_trtllm.py: the
    TensorRT-LLM checkpoints in the same build)."""
    ckpt, art = built
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)
    out, lines = copy_art(art, tmp_path), []
    build(ckpt, "fp16", out, "tensorrt", log=lines.append)
    assert lines[0].startswith("[build] --target tensorrt: no TensorRT engines here (TensorRT: expected the Python "
                               "package `tensorrt`, found none; get TensorRT") and "(python -m export.trt)" in lines[0]
    assert sum("unchanged, skipped" in line for line in lines) == 4          # the same ONNX stages as --target auto
    m = read_manifest(out)
    assert m["build"]["resolved_target"] == "ort" and m["stages"]["llm"]["variants"][0]["backend"] == "trtllm"
    assert [v["file"] for v in m["stages"]["head"]["variants"] if v["backend"] == "tensorrt"] == ["head_trt.onnx"]


def test_auto_target_is_tensorrt_only_with_tensorrt_and_a_cuda_device(monkeypatch, no_tensorrt):
    from kernels import cuda_available
    lines = []
    assert build_mod.resolve_target("auto", lines.append) == "ort"
    assert lines[-1].startswith("[build] --target auto: ort, no TensorRT engines (TensorRT: expected the Python "
                                "package `tensorrt`, found none") and "pip install tensorrt" in lines[-1]
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0.26"))
    monkeypatch.setattr(cuda_available, "cuda_available", lambda: (False, "cudaErrorNoDevice (100): no device"))
    assert build_mod.resolve_target("auto", lines.append) == "ort"
    assert lines[-1] == ("[build] --target auto: ort, no TensorRT engines (a TensorRT engine build needs a CUDA "
                         "device: cudaErrorNoDevice (100): no device)")
    assert build_mod.resolve_target("tensorrt", lines.append) == "ort"
    assert lines[-1].startswith("[build] --target tensorrt: no TensorRT engines here (a TensorRT engine build needs a "
                                "CUDA device: cudaErrorNoDevice (100): no device); writing the ONNX stages")
    monkeypatch.setattr(cuda_available, "cuda_available", lambda: (True, "1 CUDA device(s)"))
    assert build_mod.resolve_target("auto", lines.append) == "tensorrt"
    assert lines[-1] == "[build] --target auto: tensorrt (TensorRT and a CUDA device are here)"
    assert build_mod.resolve_target("ort", lines.append) == "ort" and len(lines) == 4


def copy_art(art, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(art, out)
    return out


def test_modified_file_names_the_file_and_both_hashes(built, tmp_path):
    out = copy_art(built[1], tmp_path)
    want = read_manifest(out)["files"]["head.onnx"]
    with open(out / "head.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ManifestError, match=f"file head.onnx was modified: expected sha256 {want}, found [0-9a-f]{{64}}"):
        read_manifest(out)


def test_missing_file_version_and_unknown_stage(built, tmp_path):
    out = copy_art(built[1], tmp_path)
    (out / "llm/embed_tokens.npy").unlink()
    with pytest.raises(ManifestError, match=r"expected file llm/embed_tokens.npy \(sha256 [0-9a-f]{64}\), found no file"):
        read_manifest(out)
    m = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**m, "manifest_version": 99}))
    with pytest.raises(ManifestError, match=f"expected format 'llamavid-artifacts' version {MANIFEST_VERSION}, found 'llamavid-artifacts' version 99"):
        read_manifest(out)
    m["stages"]["audio"] = m["stages"]["vision"]
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match=r"expected the stages this runtime knows \['vision', 'head', 'llm'\], found unknown stage\(s\) \['audio'\]"):
        read_manifest(out)
    with pytest.raises(ManifestError, match="expected manifest.json .* found nothing"):
        read_manifest(tmp_path / "nowhere")


@pytest.mark.parametrize("stage, index, change, message", [
    ("head", 0, {"role": "prefill"}, "stage head variant head.onnx: expected no role or role 'prefill' .llm only., "
                                      "found role 'prefill'"),
    ("llm", 0, {"role": "decode"}, r"stages.llm.variants\[0\].role: expected one of \['prefill'\], found the string 'decode'"),
    ("vision", 0, {"precision": "fp16"}, "stage vision variant vision.onnx: expected precision 'bf16' .what ort-openvino runs., found 'fp16'"),
])
def test_variant_roles_and_openvino_precision_are_checked(built, tmp_path, stage, index, change, message):
    out = copy_art(built[1], tmp_path)
    m = json.loads((out / "manifest.json").read_text())
    m["stages"][stage]["variants"][index].update(change)
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match=message):
        read_manifest(out, verify_hashes=False)
