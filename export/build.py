"""python -m export.build: checkpoint -> artifacts/<model-name>/ (ONNX stages + manifest.json).

    load(checkpoint) -> [tokenizers] -> [vision] -> [head] -> [llm] -> manifest.json
        --target tensorrt (or auto, with TensorRT and a CUDA device here) -> [engines] -> manifest.json again
        --target tensorrt (or auto, with TensorRT-LLM and a GPU here) -> [trtllm: llm/trtllm, llm/hf, plan, engine]
    each stage: build key = sha256(checkpoint files, options, exporter and reference sources, versions);
                unchanged key + intact files -> skipped; else written in .staging/ and moved in place.
    engines:    export/trt.py's plan (checked on CPU first) -> vision/head engines, listed first in their
                stages' variants; key = sha256(source ONNX files, plan, TensorRT version, GPU SM), so a
                re-run with the same key keeps the engines. Until then manifest.json lists the ONNX stages.

What "precision" means per backend (the manifest records it per variant; the table printed at the
end says what runs here):
    fp32  every stage fp32 on ort-cpu and ort-cuda
    fp16  fp16 graphs for ort-cuda (and the TensorRT head graph); ORT's CPU provider runs fp16 graphs
          as fp32 behind Casts (no speed-up, shared/FACTS.md section 7), so ort-cpu keeps the fp32 graphs;
          vision and head also get the 16-bit CPU path: their fp32 graphs on ort-openvino at bf16; the LLM's
          prefill too (a variant with role "prefill": the plain decoder graph, whose KV cache the runtime
          copies into the decoding variant's), while decoding stays on ort-cpu (OpenVINO re-plans every
          call whose shapes change: 6x slower per token)
    int8  ORT dynamic quantisation (int8 per-channel weights, u8 activations) for ort-cpu; ort-cuda
          keeps fp32 (ORT's dynamic-quantisation ops are CPU kernels)
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import llamavid_ref
from runtime.manifest import (FRAME_CHUNK, FORMAT, MANIFEST_VERSION, OPENVINO_PRECISION, hash_files, kv_names, sha256,
                              stage_io, write_manifest)

from . import common, trt, trtllm
from .head import PLUGIN, export_head
from .llm import export_llm, save_embeddings
from .vision import export_vision

PRECISIONS, TARGETS = ("fp16", "fp32", "int8"), ("auto", "ort", "tensorrt")
HEAD_FORM = "keys"        # the reference form; "folded" measured no faster at 7B shapes (docs/BENCHMARKS.md)
STATE = ".build"          # per-stage build records
SOURCE_DIRS = (Path(__file__).parent, Path(llamavid_ref.__file__).parent)   # the exporters and the modules they trace


class BuildError(RuntimeError):
    """The build cannot go on; nothing of the failing stage is left in the output directory."""


def tensorrt_missing() -> str | None:
    """Why TensorRT engines cannot be built here (TensorRT or a CUDA device missing, and how to get
    them), or None."""
    from runtime.backends.tensorrt import TensorrtUnavailable
    try:
        trt.require_tensorrt_and_gpu()
    except TensorrtUnavailable as e:
        return str(e)
    return None


def versions() -> dict:
    def v(pkg):
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None
    return {"package": v("llamavid-deploy") or "0.1.0", "onnx": v("onnx"), "onnxruntime": v("onnxruntime"),
            "torch": v("torch")}


def checkpoint_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def build_key(ckpt_root: Path, options: dict) -> str:
    h = hashlib.sha256()
    for p in checkpoint_files(ckpt_root):
        h.update(f"{p.relative_to(ckpt_root)}:{sha256(p)}\n".encode())
    for src in SOURCE_DIRS:
        for p in sorted(src.glob("*.py")):
            h.update(p.read_bytes())
    h.update(json.dumps([options, versions()], sort_keys=True).encode())
    return h.hexdigest()


def llm_form(cfg) -> str:
    """GroupQueryAttention needs head_dim % 16 == 0; other sizes get the plain export."""
    return "fused" if cfg.llm.head_dim % 16 == 0 else "plain"


# ---- stages: each writes files into `d` and returns its manifest variants --------------------------
def _variants(stem: str, fp32_file: str, d: Path, precision: str, convert_src: Path, extra=(),
              cpu16: bool = False) -> list[dict]:
    """fp32 file -> the variants the precision asks for (see the module docstring); cpu16: fp16 also lists
    the fp32 graph for ort-openvino at bf16."""
    extra = list(extra)
    fp32 = [{"file": fp32_file, "precision": "fp32", "backend": b, "extra_files": extra} for b in ("ort-cpu", "ort-cuda")]
    if precision == "fp32":
        return fp32
    if precision == "fp16":
        f = f"{stem}.fp16.onnx"
        common.to_fp16(convert_src, d / f)
        bf16 = [{"file": fp32_file, "precision": OPENVINO_PRECISION, "backend": "ort-openvino", "extra_files": extra,
                 "note": "the fp32 graph run by OpenVINO at bf16 (AMX / AVX512-BF16 CPUs)"}] if cpu16 else []
        return bf16 + [{**fp32[0], "note": "fp16 requested: ORT's CPU provider would run fp16 as fp32 behind Casts"},
                       {"file": f, "precision": "fp16", "backend": "ort-cuda", "extra_files": extra}]
    f = f"{stem}.int8.onnx"
    common.to_int8(convert_src, d / f)
    return [{"file": f, "precision": "int8", "backend": "ort-cpu", "extra_files": extra,
             "note": "ORT dynamic quantisation, per-channel int8 weights"}, fp32[1]]


def stage_vision(model, d: Path, precision: str) -> list[dict]:
    export_vision(model, d / "vision.onnx")
    return _variants("vision", "vision.onnx", d, precision, d / "vision.onnx", cpu16=True)


def plugin_record(cfg) -> dict:
    """The manifest's record of head_trt.onnx's ContextAttention node (export/trt.py checks the node against it)."""
    return {**PLUGIN, "inputs": ["queries", "patches"], "outputs": ["context"], "scale": cfg.vision.width ** -0.5}


def stage_head(model, d: Path, precision: str) -> list[dict]:
    export_head(model, d / "head.onnx", HEAD_FORM)
    export_head(model, d / "head_trt.onnx", "plugin")
    out = _variants("head", "head.onnx", d, precision, d / "head.onnx", cpu16=True)
    for v in out:
        v["form"] = HEAD_FORM
    source = {"file": "head_trt.onnx", "precision": precision, "backend": "tensorrt", "form": "plugin",
              "plugin": plugin_record(model.config), "note": "engine built by export/trt.py where TensorRT exists"}
    return out + [source]


def stage_llm(model, d: Path, precision: str) -> list[dict]:
    (d / "llm").mkdir(parents=True, exist_ok=True)
    form = llm_form(model.config)
    export_llm(model, d / "llm/decoder.onnx", form)
    save_embeddings(model, d / "llm/embed_tokens.npy")
    out = _variants("llm/decoder", "llm/decoder.onnx", d, precision, d / "llm/decoder.onnx",
                    extra=["llm/embed_tokens.npy"])
    for v in out:
        v["form"] = form
    if precision == "fp16":                      # the 16-bit CPU path prefills on ort-openvino (plain graph)
        prefill = "llm/decoder.onnx" if form == "plain" else "llm/prefill.onnx"
        if form != "plain":
            export_llm(model, d / prefill, "plain")
        out.append({"file": prefill, "precision": OPENVINO_PRECISION, "backend": "ort-openvino", "form": "plain",
                    "role": "prefill", "extra_files": ["llm/embed_tokens.npy"],
                    "note": "first call of each answer; its KV cache is copied into the decoder's"})
    return out


def stage_tokenizers(model, d: Path, precision: str) -> list[dict]:
    (d / "tokenizer").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model.tokenizer.path, d / "tokenizer" / model.tokenizer.path.name)
    shutil.copyfile(model.qformer_tokenizer.vocab_file, d / "tokenizer/qformer_vocab.txt")
    return []


STEPS = [("tokenizers", stage_tokenizers), ("vision", stage_vision), ("head", stage_head), ("llm", stage_llm)]


# ---- the build ------------------------------------------------------------------------------------
def resolve_target(target: str, log=print) -> str:
    """ort, or tensorrt (ONNX stages + engines) where TensorRT and a CUDA device are; auto says which and why.
    --target tensorrt without them resolves to ort and says so (build() still writes the TensorRT-LLM checkpoints)."""
    if target not in TARGETS:
        raise BuildError(f"--target: expected one of {TARGETS}, found {target!r}")
    if target == "ort":
        return target
    missing = tensorrt_missing()
    if target == "tensorrt" and missing:
        log(f"[build] --target tensorrt: no TensorRT engines here ({missing}); writing the ONNX stages and the "
            f"TensorRT-LLM checkpoints: build the engines where TensorRT and a GPU are (python -m export.trt)")
    if target == "auto":
        log("[build] --target auto: " + (f"ort, no TensorRT engines ({missing})" if missing
                                         else "tensorrt (TensorRT and a CUDA device are here)"))
    return "ort" if missing else "tensorrt"


def build(checkpoint=None, precision: str = "fp16", out=None, target: str = "auto", log=print) -> Path:
    from llamavid_ref.checkpoint import DEFAULT_MODEL_DIR
    if precision not in PRECISIONS:
        raise BuildError(f"--precision: expected one of {PRECISIONS}, found {precision!r}")
    resolved = resolve_target(target, log)
    ckpt_root = Path(checkpoint) if checkpoint is not None else DEFAULT_MODEL_DIR
    name = ckpt_root.resolve().name if checkpoint is not None else "llamavid-default"
    out = Path(out) if out is not None else Path("artifacts") / name
    log(f"[build] loading {ckpt_root}")
    model = llamavid_ref.load(checkpoint)
    key = build_key(ckpt_root, {"precision": precision, "target": resolved})
    out.mkdir(parents=True, exist_ok=True)
    (out / STATE).mkdir(exist_ok=True)
    variants, files = {}, {}
    for i, (stage, fn) in enumerate(STEPS, 1):
        prev = _unchanged(out, stage, key)
        if prev:
            log(f"[build] {i}/{len(STEPS)} {stage}: unchanged, skipped")
        else:
            log(f"[build] {i}/{len(STEPS)} {stage}: exporting ...")
            staging = out / ".staging"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            try:
                stage_variants = fn(model, staging, precision)
            except Exception:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            names = [str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file()]
            for n in names:
                (out / n).parent.mkdir(parents=True, exist_ok=True)
                (staging / n).replace(out / n)
            shutil.rmtree(staging)
            prev = _record(out, stage, {"key": key, "files": hash_files(out, names), "variants": stage_variants})
            log(f"[build] {i}/{len(STEPS)} {stage}: wrote {', '.join(sorted(names))}")
        files.update(prev["files"])
        if stage in ("vision", "head", "llm"):
            variants[stage] = prev["variants"]
    source = str(ckpt_root.resolve()) if checkpoint is not None else None
    manifest = make_manifest(model, name, precision, target, resolved, key, variants, files, source)
    write_manifest(out, manifest)
    if resolved == "tensorrt":
        manifest = step_engines(out, manifest, log)
    if target == "tensorrt" or trtllm.engine_missing() is None:
        manifest = step_trtllm(out, manifest, model, precision, log)
    log(f"[build] wrote {out / 'manifest.json'}")
    log(plan_table(manifest))
    return out


def step_engines(out: Path, manifest: dict, log=print) -> dict:
    """The vision and head engines (export/trt.py, default limits: what the runtime asks for), recorded in
    manifest.json; skipped, the recorded engines kept, while engines_key is unchanged. -> the new manifest."""
    plan = trt.make_plan(out, manifest)
    checks = trt.check_plan(plan)
    failed = [c for c in checks if not c.ok]
    if failed:
        raise BuildError(f"TensorRT engine plan: {len(failed)} check(s) failed, no engine built (manifest.json "
                         f"lists the ONNX stages):\n{trt.describe(plan, failed)}\nfor other profile limits or an int8 "
                         f"calibration cache: python -m export.trt --artifacts {out} --max-frames N --max-text N "
                         f"--calibration-cache FILE")
    key = engines_key(plan, manifest)
    prev = _unchanged(out, "engines", key)
    if prev:
        log("[build] engines: unchanged, skipped")
    else:
        log(f"[build] engines: building {', '.join(sp.engine for sp in plan.stages)} ...")
        try:
            built_with = trt.build_engines(plan, log=log)
        except RuntimeError as e:
            raise BuildError(f"TensorRT engine build: {e} (manifest.json lists the ONNX stages)") from e
        prev = _record(out, "engines", {"key": key, "files": hash_files(out, [sp.engine for sp in plan.stages]),
                                        "built_with": built_with})
    return json.loads(trt.record_engines(plan, prev["built_with"]).read_text())


def step_trtllm(out: Path, manifest: dict, model, precision: str, log=print) -> dict:
    """The LLM for TensorRT-LLM (export/trtllm.py) in llm/: the TensorRT-LLM and HF checkpoints, the trtllm-build
    plan and, where TensorRT-LLM and a GPU are, the engine; recorded first in the llm stage's variants (the runtime
    takes it only where the trtllm backend runs). Skipped while its key is unchanged. -> the new manifest."""
    dtype, quant = trtllm.BUILD_OPTIONS[precision]
    plan = trtllm.make_plan(model.config.llm, model.config.tokens_per_frame, dtype, quant=quant)
    failed = [c.message for c in trtllm.check_plan(plan, model.config.llm) if not c.ok]
    if failed:
        raise BuildError(f"TensorRT-LLM plan: {'; '.join(failed)} (manifest.json lists the ONNX stages)")
    missing = trtllm.engine_missing()
    key = hashlib.sha256(json.dumps([manifest["build"]["key"], asdict(plan), missing]).encode()).hexdigest()
    prev = _unchanged(out, "trtllm", key)
    if prev:
        log("[build] trtllm: unchanged, skipped")
    else:
        log(f"[build] trtllm: converting the LLM ({dtype}, quant {quant})"
            f"{'' if missing else ' and building its engine'} ...")
        try:
            files, built_with = trtllm.write_staged(model, out / "llm", plan, engine=missing is None, log=log)
        except trtllm.ConvertError as e:
            raise BuildError(f"TensorRT-LLM: {e} (manifest.json lists the ONNX stages)") from e
        names = ["llm/" + f for f in files]
        prev = _record(out, "trtllm", {"key": key, "files": hash_files(out, names),
                                       "variant": trtllm.manifest_variant(plan, "llm", files, built_with)})
    v, llm = prev["variant"], manifest["stages"]["llm"]
    llm["variants"] = [v] + [x for x in llm["variants"] if x["backend"] != "trtllm"]
    manifest["files"] = dict(sorted({**manifest["files"], **prev["files"]}.items()))
    write_manifest(out, manifest)
    if not v["engine"]:
        log(f"[build] llm: TensorRT-LLM engine not built here ({missing}); wrote {out}/llm/trtllm, {out}/llm/hf and "
            f"the plan: run `{' '.join(v['build_command'])}` in {out}/llm where TensorRT-LLM and a GPU are, or this "
            f"build there")
    return manifest


def engines_key(plan, manifest: dict) -> str:
    """What the engines depend on: their source ONNX files (with external weights), the plan without its
    directory, and what builds them (TensorRT version, GPU SM)."""
    from runtime.backends.tensorrt import built_with_here
    sources = {n: manifest["files"][n] for sp in plan.stages for n in (sp.onnx, sp.onnx + ".data")
               if n in manifest["files"]}
    plan_fields = {k: v for k, v in asdict(plan).items() if k != "root"}
    text = json.dumps([sources, plan_fields, built_with_here()], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _unchanged(out: Path, step: str, key: str) -> dict | None:
    """The step's build record when it was built with `key` and its files are intact, else None."""
    path = out / STATE / f"{step}.json"
    prev = json.loads(path.read_text()) if path.is_file() else None
    return prev if prev and prev["key"] == key and _intact(out, prev["files"]) else None


def _record(out: Path, step: str, record: dict) -> dict:
    (out / STATE / f"{step}.json").write_text(json.dumps(record, indent=1))
    return record


def _intact(out: Path, files: dict) -> bool:
    return all((out / n).is_file() and sha256(out / n) == h for n, h in files.items())


def prompt_section(cfg) -> dict:
    from llamavid_ref.config import IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX
    from llamavid_ref.model import LONG_VIDEO_INTRO, LONG_VIDEO_OUTRO
    from llamavid_ref.templates import TEMPLATES
    t = TEMPLATES[cfg.template]
    return {"template": t.name, "system": t.system, "roles": list(t.roles), "sep": t.sep, "sep2": t.sep2,
            "image_placeholder": IMAGE_PLACEHOLDER, "image_token_id": IMAGE_TOKEN_INDEX,
            "media_prefix": IMAGE_PLACEHOLDER + "\n", "long_video": {"intro": LONG_VIDEO_INTRO, "outro": LONG_VIDEO_OUTRO}}


def model_io(cfg, kv_layout: str) -> dict:
    """runtime.manifest.stage_io for a LlamaVidConfig."""
    v, c = cfg.vision, cfg.llm
    return stage_io(v.image_size, v.num_patches + 1, v.width, cfg.tokens_per_frame, c.hidden, c.layers, c.kv_heads,
                    c.head_dim, c.vocab_size, kv_layout)


def make_manifest(model, name, precision, target, resolved, key, variants, files, checkpoint) -> dict:
    cfg = model.config
    layout = "shared" if llm_form(cfg) == "fused" else "concat"
    io = model_io(cfg, layout)
    tok = "tokenizer/" + model.tokenizer.path.name
    prompt = prompt_section(cfg)
    past, present = kv_names(cfg.llm.layers)
    c = cfg.llm
    return {
        "format": FORMAT, "manifest_version": MANIFEST_VERSION,
        "model": {"name": name, "config": cfg.to_dict(), "tokens_per_frame": cfg.tokens_per_frame,
                  "vision_width": cfg.vision.width, "llm_hidden": c.hidden},
        "preprocess": {"image_size": cfg.vision.image_size, "mean": list(cfg.image_mean),
                       "std": list(cfg.image_std), "image_aspect_ratio": cfg.image_aspect_ratio, "video_fps": 1.0},
        "prompt": prompt,
        "special_ids": {"bos": c.bos_id, "eos": c.eos_id, "pad": c.pad_id, "image": prompt["image_token_id"]},
        "tokenizers": {"llm": tok, "qformer": "tokenizer/qformer_vocab.txt",
                       "qformer_max_length": cfg.qformer.max_text_len},
        "runtime": {"frame_chunk": FRAME_CHUNK},
        "llm": {"context": c.max_positions, "max_token": cfg.max_token, "layers": c.layers, "kv_heads": c.kv_heads,
                "head_dim": c.head_dim, "hidden": c.hidden, "vocab_size": c.vocab_size, "rope_theta": c.rope_theta,
                "rope_scaling": c.rope_scaling, "kv_layout": layout, "past_names": past, "present_names": present,
                "embeddings": "llm/embed_tokens.npy"},
        "stages": {s: {**io[s], "variants": variants[s]} for s in ("vision", "head", "llm")},
        "build": {"precision": precision, "target": target, "resolved_target": resolved, "key": key,
                  "checkpoint": checkpoint},
        "versions": versions(),
        "files": dict(sorted(files.items())),
    }


def plan_table(manifest: dict, available=None) -> str:
    """Markdown table: every variant, and which one runs here (first runnable backend in order)."""
    from runtime.backends import available_backends, choose_variant, runs
    available = available or available_backends()
    rows = ["| stage | file | precision | backend | runs here |", "|---|---|---|---|---|"]
    for stage, entry in manifest["stages"].items():
        chosen = [choose_variant(entry["variants"], available, role=r) for r in (None, "prefill")]
        for v in entry["variants"]:
            mark = ("yes" if v in chosen else "no: backend not on this machine" if v["backend"] not in available
                    else "no: an engine's ONNX source" if not runs(v["backend"], v) else "")
            role = f" ({v['role']})" if "role" in v else ""
            rows.append(f"| {stage}{role} | {v['file']} | {v['precision']} | {v['backend']} | {mark} |")
    return "\n".join(rows) + f"\n(backends on this machine: {', '.join(available)})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.build", description=__doc__.splitlines()[0])
    ap.add_argument("--precision", choices=PRECISIONS, default="fp16")
    ap.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the built-in default model)")
    ap.add_argument("--out", default=None, help="output directory (default: artifacts/<model-name>/)")
    ap.add_argument("--target", choices=TARGETS, default="auto")
    a = ap.parse_args(argv)
    try:
        build(a.checkpoint, a.precision, a.out, a.target)
    except (BuildError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
