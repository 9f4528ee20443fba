"""python -m export.build: checkpoint -> artifacts/<model-name>/ (ONNX stages + manifest.json).

    load(checkpoint) -> [tokenizers] -> [vision] -> [head] -> [llm] -> manifest.json
        --target tensorrt (or auto, with TensorRT and a CUDA device here) -> [engines] -> manifest.json again
        --target tensorrt (or auto, with TensorRT-LLM and a GPU here) -> [trtllm: llm/trtllm, llm/hf, plan, engine]
    each stage: build key = sha256(checkpoint files, options, exporter and reference sources, versions);
                unchanged key + intact files -> taken over (hard links); else exported into .staging/ and moved in.
    engines:    export/trt.py's plan (checked on CPU first) -> vision/head engines, listed first in their
                stages' variants; key = sha256(source ONNX files, plan, TensorRT version, GPU SM), so a
                re-run with the same key keeps the engines. Until then manifest.json lists the ONNX stages.

The output directory (--out DIR) is only ever complete: the old artifacts or the new ones, never a mix.
    .DIR.build/lock    flock held by the running build (a second build refuses at once; the OS drops the
                       lock when a build dies, however it dies)
    .DIR.build/next/   the new artifact directory being built: unchanged stages hard-linked from DIR, the
                       others exported; a killed build leaves it, and the next build resumes from it
    swap               next/ takes DIR's place in one step (renameat2 RENAME_EXCHANGE on Linux; elsewhere two
                       renames that the next build completes if it was killed between them); the old
                       artifacts are deleted, then .DIR.build/ when nothing is left in it.
    DIR must be absent, empty, or an artifact directory holding only what export.build wrote (manifest.json,
    .build/ records and the files they list): the build deletes or overwrites nothing of anyone else's.

What "precision" means per backend (the manifest records it per variant; the table printed at the
end says what runs here):
    fp32  every stage fp32 on ort-cpu and ort-cuda
    fp16  fp16 graphs for ort-cuda (and the TensorRT head graph); ORT's CPU provider runs fp16 graphs
          as fp32 behind Casts (no speed-up, shared/FACTS.md section 7), so ort-cpu keeps the fp32 graphs;
          vision and head also get the 16-bit CPU path: their fp32 graphs on ort-openvino at bf16; the LLM's
          prefill too (a variant with role "prefill": the plain decoder graph, whose KV cache the runtime
          copies into the decoding variant's), while decoding stays on ort-cpu (OpenVINO re-plans every
          call whose shapes change: 6x slower per token)
    int8  calib/ (--calib DATA, --calib-method): vision and head static int8 Q/DQ graphs calibrated on clips
          (ort-cpu, and TensorRT's explicit int8; plus a calibration cache for its implicit flow), the LLM
          weight-only int4 (--llm-weights; MatMulNBits) on ort-cpu; ort-cuda keeps the fp32 graphs
"""
from __future__ import annotations

import argparse
import ctypes
import errno
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import llamavid_ref
from runtime.manifest import (FRAME_CHUNK, FORMAT, MANIFEST_VERSION, OPENVINO_PRECISION, hash_files, kv_names,
                              safe_path, sha256, stage_io, write_manifest)

from . import common, trt, trtllm
from .head import PLUGIN, export_head
from .llm import export_llm, save_embeddings
from .vision import export_vision

PRECISIONS, TARGETS = ("fp16", "fp32", "int8"), ("auto", "ort", "tensorrt")
LLM_WEIGHTS = ("int4", "int8")     # the int8 build's LLM: weight-only MatMulNBits
HEAD_FORM = "keys"        # the reference form; "folded" measured no faster at 7B shapes (docs/BENCHMARKS.md)
STATE = ".build"          # per-stage build records, inside the artifact directory
# temporaries a killed writer leaves in an artifact directory (.staging of builds before the swap, .X.tmp-PID)
LEFTOVER = re.compile(r"\.staging|manifest\.json\.tmp|\..+\.tmp(-\d+)?")
SOURCE_DIRS = (Path(__file__).parent, Path(llamavid_ref.__file__).parent,   # the exporters and the modules they trace,
               Path(__file__).parent.parent / "calib")                     # and the int8 build's calibration


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
    """fp32 file -> the fp32 or fp16 variants (see the module docstring; int8: calib/); cpu16: fp16 also lists
    the fp32 graph for ort-openvino at bf16."""
    extra = list(extra)
    fp32 = [{"file": fp32_file, "precision": "fp32", "backend": b, "extra_files": extra} for b in ("ort-cpu", "ort-cuda")]
    if precision == "fp32":
        return fp32
    f = f"{stem}.fp16.onnx"
    common.to_fp16(convert_src, d / f)
    bf16 = [{"file": fp32_file, "precision": OPENVINO_PRECISION, "backend": "ort-openvino", "extra_files": extra,
             "note": "the fp32 graph run by OpenVINO at bf16 (AMX / AVX512-BF16 CPUs)"}] if cpu16 else []
    return bf16 + [{**fp32[0], "note": "fp16 requested: ORT's CPU provider would run fp16 as fp32 behind Casts"},
                   {"file": f, "precision": "fp16", "backend": "ort-cuda", "extra_files": extra}]


def stage_vision(model, d: Path, precision: str, calib=None) -> list[dict]:
    export_vision(model, d / "vision.onnx")
    if precision == "int8":
        from calib.stages import quantize_vision          # calib -> export: imported only for int8
        return quantize_vision(model, d, calib)
    return _variants("vision", "vision.onnx", d, precision, d / "vision.onnx", cpu16=True)


def plugin_record(cfg) -> dict:
    """The manifest's record of head_trt.onnx's ContextAttention node (export/trt.py checks the node against it)."""
    return {**PLUGIN, "inputs": ["queries", "patches"], "outputs": ["context"], "scale": cfg.vision.width ** -0.5}


def stage_head(model, d: Path, precision: str, calib=None) -> list[dict]:
    export_head(model, d / "head.onnx", HEAD_FORM)
    export_head(model, d / "head_trt.onnx", "plugin")
    if precision == "int8":
        from calib.stages import quantize_head
        out, trt_source = quantize_head(model, d, calib)
    else:
        out, trt_source = _variants("head", "head.onnx", d, precision, d / "head.onnx", cpu16=True), {}
    for v in out:
        v["form"] = HEAD_FORM
    source = {"file": "head_trt.onnx", "precision": precision, "backend": "tensorrt", "form": "plugin",
              "plugin": plugin_record(model.config), "note": "engine built by export/trt.py where TensorRT exists",
              **trt_source}
    return out + [source]


def stage_llm(model, d: Path, precision: str, calib=None) -> list[dict]:
    (d / "llm").mkdir(parents=True, exist_ok=True)
    form = llm_form(model.config)
    export_llm(model, d / "llm/decoder.onnx", form)
    save_embeddings(model, d / "llm/embed_tokens.npy")
    if precision == "int8":
        from calib.stages import quantize_llm
        out = quantize_llm(d, "llm/decoder.onnx", calib, extra=["llm/embed_tokens.npy"])
    else:
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


def stage_tokenizers(model, d: Path, precision: str, calib=None) -> list[dict]:
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


def build(checkpoint=None, precision: str = "fp16", out=None, target: str = "auto", log=print, calib=None,
          calib_method: str | None = None, llm_weights: str = "int4") -> Path:
    """calib, calib_method, llm_weights: the int8 build's calibration clips (None: the ones shipped with the
    default model), range method (calib.ranges.METHODS) and LLM weight precision (int4 | int8)."""
    from llamavid_ref.checkpoint import DEFAULT_MODEL_DIR
    if precision not in PRECISIONS:
        raise BuildError(f"--precision: expected one of {PRECISIONS}, found {precision!r}")
    calibration = calibration_for(precision, calib, calib_method, llm_weights)
    resolved = resolve_target(target, log)
    ckpt_root = Path(checkpoint) if checkpoint is not None else DEFAULT_MODEL_DIR
    name = ckpt_root.resolve().name if checkpoint is not None else "llamavid-default"
    out = (Path(out) if out is not None else Path("artifacts") / name).resolve()
    with BuildLock(out) as ws:
        check_out(out)
        _recover(out, ws)
        log(f"[build] loading {ckpt_root}")
        model = llamavid_ref.load(checkpoint)
        key = build_key(ckpt_root, {"precision": precision, "target": resolved,
                                    **({"calibration": calibration.record()} if calibration else {})})
        new = ws / "next"
        try:
            (new / STATE).mkdir(parents=True, exist_ok=True)
            variants, files = {}, {}
            for i, (stage, fn) in enumerate(STEPS, 1):
                prev = _reuse(new, out, stage, key)
                if prev:
                    log(f"[build] {i}/{len(STEPS)} {stage}: unchanged, skipped")
                else:
                    log(f"[build] {i}/{len(STEPS)} {stage}: exporting ...")
                    prev = _export(new, stage, fn, model, precision, key, calibration)
                    log(f"[build] {i}/{len(STEPS)} {stage}: wrote {', '.join(sorted(prev['files']))}")
                files.update(prev["files"])
                if stage in ("vision", "head", "llm"):
                    variants[stage] = prev["variants"]
            source = str(ckpt_root.resolve()) if checkpoint is not None else None
            manifest = make_manifest(model, name, precision, target, resolved, key, variants, files, source)
            if calibration:
                manifest["build"]["calibration"] = calibration.record()
            write_manifest(new, manifest)
            steps, failed = [s for s, _ in STEPS], None
            try:                                    # on failure the ONNX stages still go in place, as the message says
                if resolved == "tensorrt":
                    manifest, steps = step_engines(new, manifest, log, live=out), steps + ["engines"]
                if target == "tensorrt" or trtllm.engine_missing() is None:
                    manifest, steps = step_trtllm(new, manifest, model, precision, log, live=out), steps + ["trtllm"]
            except BuildError as e:
                failed = e
            _prune(new, {"manifest.json", *manifest["files"], *(f"{STATE}/{s}.json" for s in steps)})
            _swap(new, out, ws)
        except Exception:                           # a failed build leaves nothing; a killed one, next/ to resume
            shutil.rmtree(new, ignore_errors=True)
            raise
    if failed:
        raise failed
    log(f"[build] wrote {out / 'manifest.json'}")
    log(plan_table(manifest))
    return out


def _export(new: Path, stage: str, fn, model, precision: str, key: str, calibration=None) -> dict:
    """Run one stage into new/.staging, move its files into `new`, record them."""
    staging = new / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    stage_variants = fn(model, staging, precision, **({"calib": calibration} if calibration else {}))
    names = [p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file()]
    for n in names:
        (new / n).parent.mkdir(parents=True, exist_ok=True)
        (staging / n).replace(new / n)
    shutil.rmtree(staging)
    return _record(new, stage, {"key": key, "files": hash_files(new, names), "variants": stage_variants})


def calibration_for(precision: str, data, method: str | None, llm_weights: str):
    """calib.stages.Calibration for an int8 build (its clips found and hashed before anything is written), else
    None; calibration options without --precision int8 are an error."""
    if precision != "int8":
        if data is not None or method is not None:
            raise BuildError(f"--calib / --calib-method: expected --precision int8, found --precision {precision}")
        return None
    from calib.data import CalibrationError
    from calib.stages import DEFAULT_METHOD, Calibration
    if llm_weights not in LLM_WEIGHTS:
        raise BuildError(f"--llm-weights: expected one of {LLM_WEIGHTS}, found {llm_weights!r}")
    try:
        return Calibration.of(data, method or DEFAULT_METHOD, int(llm_weights[3:]))
    except CalibrationError as e:
        raise BuildError(f"{e}; nothing was written") from e


def step_engines(out: Path, manifest: dict, log=print, live: Path | None = None) -> dict:
    """The vision and head engines (export/trt.py, default limits: what the runtime asks for), recorded in
    manifest.json; skipped, the recorded engines kept (in `out`, or taken over from the `live` directory),
    while engines_key is unchanged. -> the new manifest."""
    plan = trt.make_plan(out, manifest)
    checks = trt.check_plan(plan)
    failed = [c for c in checks if not c.ok]
    if failed:
        raise BuildError(f"TensorRT engine plan: {len(failed)} check(s) failed, no engine built (manifest.json "
                         f"lists the ONNX stages):\n{trt.describe(plan, failed)}\nfor other profile limits or an int8 "
                         f"calibration cache: python -m export.trt --artifacts {out} --max-frames N --max-text N "
                         f"--calibration-cache FILE")
    key = engines_key(plan, manifest)
    prev = _reuse(out, live, "engines", key)
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


def step_trtllm(out: Path, manifest: dict, model, precision: str, log=print, live: Path | None = None) -> dict:
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
    prev = _reuse(out, live, "trtllm", key)
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


# ---- build records and the output directory -------------------------------------------------------
def _unchanged(out: Path, step: str, key: str) -> dict | None:
    """The step's build record when it was built with `key` and its files are intact, else None: a missing,
    unreadable or corrupt record counts as a step not done."""
    try:
        prev = json.loads((out / STATE / f"{step}.json").read_text())
        return prev if prev["key"] == key and _intact(out, prev["files"]) else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _reuse(new: Path, live: Path | None, step: str, key: str) -> dict | None:
    """The step's record in `new` (a resumed build), else the live directory's with its files hard-linked
    into `new` (hard links are safe: nothing is ever written in place, files are replaced by renames)."""
    prev = _unchanged(new, step, key)
    if prev or live is None:
        return prev
    prev = _unchanged(live, step, key)
    if prev:
        for n in prev["files"]:
            dst = new / n
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.unlink(missing_ok=True)
            try:
                os.link(live / n, dst)
            except OSError:                       # no hard links on this file system
                shutil.copy2(live / n, dst)
        _record(new, step, prev)
    return prev


def _record(out: Path, step: str, record: dict) -> dict:
    """Write a build record atomically (a temporary file renamed over it)."""
    path = out / STATE / f"{step}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)
    return record


def _intact(out: Path, files: dict) -> bool:
    return all(safe_path(out, n).is_file() and sha256(safe_path(out, n)) == h for n, h in files.items())


def _workspace(out: Path) -> Path:
    return out.parent / f".{out.name}.build"


class BuildLock:
    """Exclusive use of --out for one build: flock on .DIR.build/lock, released by the OS when the build
    ends however it ends. A second build refuses at once and names the first one's pid. -> the workspace."""

    def __init__(self, out: Path):
        self.out, self.ws, self.fd = out, _workspace(out), None

    def __enter__(self) -> Path:
        import fcntl
        if self.out.exists() and not self.out.is_dir():
            raise BuildError(f"--out {self.out}: expected a folder for the artifacts, found a file; nothing was written")
        while self.fd is None:
            self.ws.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.ws / "lock", os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:            # a build finishing just now removed the workspace
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise BuildError(f"--out {self.out}: another build (pid {holder}) is writing it; wait for it to "
                                 f"finish, or choose another --out") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.ws / "lock").st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
            else:                                # we locked a file that a finishing build had just removed
                os.close(fd)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())
        return self.ws

    def __exit__(self, *exc):
        if not any(p.name != "lock" for p in self.ws.iterdir()):    # nothing left to resume: remove it all
            (self.ws / "lock").unlink(missing_ok=True)
            self.ws.rmdir()
        os.close(self.fd)


def _written_by_build(out: Path) -> set[str] | None:
    """The paths in `out` that export.build wrote: manifest.json, the build records and the files they list;
    None when `out` holds neither a manifest of this format nor a build record (not an artifact directory)."""
    ours = set()
    try:
        m = json.loads((out / "manifest.json").read_text())
        if isinstance(m, dict) and m.get("format") == FORMAT:
            ours |= {"manifest.json", *(m.get("files") if isinstance(m.get("files"), dict) else {})}
    except (OSError, ValueError):
        pass
    records = sorted((out / STATE).glob("*.json")) if (out / STATE).is_dir() else []
    for path in records:
        try:
            ours |= {f"{STATE}/{path.name}", *json.loads(path.read_text())["files"]}
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return ours or None


def check_out(out: Path):
    """--out must be absent, empty, or an artifact directory holding nothing export.build did not write."""
    if not out.is_dir():
        return
    entries = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    ours = _written_by_build(out)
    if ours is not None:
        ours |= {str(parent) for n in ours for parent in Path(n).parents}
        entries = [e for e in entries if e not in ours and e.split("/")[0] != STATE
                   and not LEFTOVER.fullmatch(e.split("/")[0])]
    if entries:
        what = "an artifact directory with" if ours is not None else "a folder that is no artifact directory, with"
        raise BuildError(f"--out {out}: expected an empty folder or an artifact directory written by python -m "
                         f"export.build, found {what} {len(entries)} path(s) export.build did not write "
                         f"({', '.join(entries[:5])}{', ...' if len(entries) > 5 else ''}); nothing was changed: "
                         f"move them away or choose another --out")


def _prune(new: Path, keep: set[str]):
    """Delete what `new` (the build's own) holds beyond `keep`: files of earlier attempts or other precisions."""
    for p in sorted(new.rglob("*"), key=lambda p: -len(p.parts)):         # deepest first
        if p.is_dir() and not p.is_symlink():
            if not any(p.iterdir()):
                p.rmdir()
        elif p.relative_to(new).as_posix() not in keep:
            p.unlink()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux renameat2 with RENAME_EXCHANGE); False where the
    system or file system has no such call."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap(new: Path, out: Path, ws: Path):
    """Put the finished `new` at `out` in one step and delete the artifacts it replaces."""
    if not out.exists():
        new.rename(out)
    elif _exchange(new, out):
        shutil.rmtree(new)
    else:
        out.rename(ws / "old")                   # killed here: _recover puts it back
        new.rename(out)
        shutil.rmtree(ws / "old")


def _recover(out: Path, ws: Path):
    """After a build killed between the two renames of a swap without RENAME_EXCHANGE: the previous
    artifacts (ws/old) go back to `out` if nothing is there, else they are deleted."""
    old = ws / "old"
    if old.is_dir():
        if out.exists():
            shutil.rmtree(old)
        else:
            old.rename(out)


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
    ap.add_argument("--calib", default=None, metavar="DATA", help="int8: calibration clips (a LLaVA-style .json, a "
                    "folder with one, or a folder of videos [+ questions.txt]; default: the clips shipped with the "
                    "default model)")
    ap.add_argument("--calib-method", choices=("minmax", "entropy", "percentile"), default=None,
                    help="int8: activation range method (default: minmax)")
    ap.add_argument("--llm-weights", choices=LLM_WEIGHTS, default="int4", help="int8: the LLM's weight-only precision")
    a = ap.parse_args(argv)
    try:
        build(a.checkpoint, a.precision, a.out, a.target, calib=a.calib, calib_method=a.calib_method,
              llm_weights=a.llm_weights)
    except (BuildError, ValueError, OSError) as e:      # ValueError: CheckpointError, ManifestError
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: --out holds the artifacts it held before; the next build resumes", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
