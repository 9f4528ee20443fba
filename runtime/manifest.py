"""manifest.json: the one contract between export and every runtime, bench and test (torch-free).

export/build.py writes it through write_manifest; the runtime (Python and the C core, which parses the
same file) reads it. Layout, version 3:

    {
      "format": "llamavid-artifacts", "manifest_version": 3,
      "model":       name, config (the full LlamaVidConfig), tokens_per_frame, vision_width, llm_hidden
      "preprocess":  image_size, mean, std, image_aspect_ratio ("pad": images padded to square), video_fps
      "prompt":      template, system, roles, sep, sep2 (text pieces of the conversation template),
                     image_placeholder ("<image>"), image_token_id (-200), media_prefix ("<image>\\n"),
                     long_video {intro, outro}: the release's movie prompt around the frames and subtitles
      "special_ids": bos, eos, pad, image
      "tokenizers":  llm (tokenizer.json | tokenizer.model), qformer (WordPiece vocab), qformer_max_length
      "runtime":     frame_chunk (frames per vision/head call)
      "llm":         context, max_token, layers, kv_heads, head_dim, hidden, vocab_size,
                     rope_theta, rope_scaling (linear factor, 1 = none),
                     kv_layout ("shared": one [1,kv_heads,capacity,head_dim] buffer per name bound as past and
                     present; "concat": present = concat(past, new)), past_names, present_names,
                     embeddings (the text embedding table, .npy [vocab_size, hidden] float32)
      "stages":      {vision|head|llm: {inputs, outputs: {name: {shape (symbolic dims), dtype}},
                                        variants: [{file, precision, backend, form, role?, ...}]}}
                     role "prefill" (llm only): a graph the runtime may use for the first call of an answer,
                     next to the variant it decodes with (it copies the prefill's KV cache into that one's)
      "build":       requested precision and target, build key, checkpoint
      "versions":    package, onnx, onnxruntime, torch
      "files":       {relative path: sha256} for every file the directory holds
    }

read_manifest(dir) validates the version, every stage name and every file's hash, and raises
ManifestError naming what was expected and what was found.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

FORMAT, MANIFEST_VERSION = "llamavid-artifacts", 3    # 2: one Q-Former question per head call; 3: runtime section,
#                                                      llm kv names, hidden and rope
STAGES = ("vision", "head", "llm")
BACKENDS = ("ort-cpu", "ort-cuda", "ort-openvino", "tensorrt", "trtllm")
OPENVINO_PRECISION = "bf16"       # ort-openvino runs the fp32 graphs at this inference precision
FRAME_CHUNK = 64                  # frames per vision/head call that export writes (as the release chunks)


class ManifestError(ValueError):
    """An artifact directory the runtime must refuse; the message says which file or field and why."""


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tensor(shape, dtype: str = "float32") -> dict:
    return {"shape": list(shape), "dtype": dtype}


def kv_names(layers: int) -> tuple[list[str], list[str]]:
    """(past, present) KV tensor names, key then value for each layer."""
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    return past, [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def stage_io(image_size: int, vision_tokens: int, vision_width: int, tokens_per_frame: int, hidden: int,
             layers: int, kv_heads: int, head_dim: int, vocab_size: int, kv_layout: str) -> dict:
    """Tensor names, symbolic shapes and dtypes of each stage (the ONNX graphs use the same).
    vision_tokens: N+1 (patches and CLS)."""
    S, N1, Cv, H, n1 = image_size, vision_tokens, vision_width, hidden, tokens_per_frame
    kv_seq = ("max_seq", "max_seq") if kv_layout == "shared" else ("past_seq", "total")
    past_names, present_names = kv_names(layers)
    past = {n: tensor(["batch", kv_heads, kv_seq[0], head_dim]) for n in past_names}
    present = {n: tensor(["batch", kv_heads, kv_seq[1], head_dim]) for n in present_names}
    return {
        "vision": {"inputs": {"pixel_values": tensor(["frames", 3, S, S])},
                   "outputs": {"vision_feats": tensor(["frames", N1, Cv])}},
        "head": {"inputs": {"vision_feats": tensor(["frames", N1, Cv]),
                            "qformer_ids": tensor([1, "text"], "int64"),       # one question for all frames
                            "qformer_mask": tensor([1, "text"], "int64")},
                 "outputs": {"frame_tokens": tensor(["frames", n1, H])}},
        "llm": {"inputs": {"inputs_embeds": tensor(["batch", "seq", H]),
                           "attention_mask": tensor(["batch", "total"], "int64"), **past},
                "outputs": {"logits": tensor(["batch", 1, vocab_size]), **present}},
    }


def hash_files(root: Path, names) -> dict:
    return {n: sha256(Path(root) / n) for n in sorted(names)}


def write_manifest(root: Path, manifest: dict) -> Path:
    """Write manifest.json atomically (last, so a directory with a manifest is complete)."""
    root = Path(root)
    tmp = root / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(root / "manifest.json")
    return root / "manifest.json"


def read_manifest(root: Path, verify_hashes: bool = True) -> dict:
    root = Path(root)
    path = root / "manifest.json"
    if not path.is_file():
        found = "nothing" if not root.exists() else f"{sorted(p.name for p in root.iterdir())[:8]}"
        raise ManifestError(f"artifacts {root}: expected manifest.json (written by python -m export.build), "
                            f"found {found}")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: expected JSON, found a parse error ({e})") from e
    if m.get("format") != FORMAT or m.get("manifest_version") != MANIFEST_VERSION:
        built = m.get("versions", {}).get("package", "unknown")
        raise ManifestError(f"{path}: expected format {FORMAT!r} version {MANIFEST_VERSION}, found "
                            f"{m.get('format')!r} version {m.get('manifest_version')!r} (built by llamavid-deploy "
                            f"{built}); rebuild the directory with python -m export.build")
    unknown = sorted(set(m.get("stages", {})) - set(STAGES))
    if unknown:
        raise ManifestError(f"{path}: unknown stage(s) {unknown}; this runtime knows {list(STAGES)}")
    missing = [s for s in STAGES if s not in m.get("stages", {})]
    if missing:
        raise ManifestError(f"{path}: expected stages {list(STAGES)}, found no {missing}")
    for stage, entry in m["stages"].items():
        for v in entry["variants"]:
            if v["backend"] not in BACKENDS:
                raise ManifestError(f"{path}: stage {stage} variant {v['file']}: expected a backend in "
                                    f"{list(BACKENDS)}, found {v['backend']!r}")
            if v.get("role") not in (None, "prefill") or (v.get("role") and stage != "llm"):
                raise ManifestError(f"{path}: stage {stage} variant {v['file']}: expected no role or role 'prefill' "
                                    f"(llm only), found role {v.get('role')!r}")
            if v["backend"] == "ort-openvino" and v["precision"] != OPENVINO_PRECISION:
                raise ManifestError(f"{path}: stage {stage} variant {v['file']}: ort-openvino runs "
                                    f"{OPENVINO_PRECISION}, found precision {v['precision']!r}")
            for f in [v["file"], *v.get("extra_files", [])]:
                if f not in m["files"]:
                    raise ManifestError(f"{path}: stage {stage} names {f}, which has no entry in 'files'")
    if verify_hashes:
        for name, want in m["files"].items():
            p = root / name
            if not p.is_file():
                raise ManifestError(f"artifacts {root}: expected file {name} (sha256 {want}), found no file")
            got = sha256(p)
            if got != want:
                raise ManifestError(f"artifacts {root}: file {name} was modified: expected sha256 {want}, "
                                    f"found {got}; rebuild with python -m export.build")
    return m
