"""manifest.json: the one contract between export and every runtime, bench and test (torch-free).

export/build.py writes it through write_manifest; the runtime (Python and the C core, which parses the
same file) reads it through read_manifest. Layout, version 3:

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
                     int8 builds (calib/): quantization ("explicit" Q/DQ | "weight-only"), calibration {method,
                     data_sha256, ranges}, trt_cache {file, source fp32 graph, source_sha256}; precision "int4" (LLM)
      "build":       requested precision and target, build key, checkpoint; int8: calibration {method, data
                     {source, clips, sha256}, llm_weights}
      "versions":    package, onnx, onnxruntime, torch
      "files":       {relative path: sha256} for every file the directory holds
    }

read_manifest(dir, verify_hashes, manifest_sha256) checks, in this order, and raises ManifestError
naming what was expected and what was found (every problem found, on one line):
    1. dir is a directory holding manifest.json; with manifest_sha256, the file's bytes hash to it
    2. UTF-8 JSON whose top level is an object; format and manifest_version; the stage names
    3. SCHEMA below: every required key, each value's type and range
    4. RELATIONS (relations()): what ties values together (special ids inside the vocabulary, KV names
       and shapes from layers/kv_heads/head_dim, every file the runtime reads listed in "files", ...)
    5. every path in "files" resolves, symlinks included, inside dir (safe_path); with verify_hashes,
       every file exists and has its sha256; a graph's external weights (<file>.onnx.data), where present,
       are listed too; the embedding table's .npy header is [vocab_size, hidden]
A runtime may rely on all of this having passed (the C core checks only what it needs to stay safe).
write_manifest runs 2-5 (without hashes) before it writes, so export cannot write what read refuses.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

FORMAT, MANIFEST_VERSION = "llamavid-artifacts", 3    # 2: one Q-Former question per head call; 3: runtime section,
#                                                      llm kv names, hidden and rope
STAGES = ("vision", "head", "llm")
BACKENDS = ("ort-cpu", "ort-cuda", "ort-openvino", "tensorrt", "trtllm")
OPENVINO_PRECISION = "bf16"       # ort-openvino runs the fp32 graphs at this inference precision
FRAME_CHUNK = 64                  # frames per vision/head call that export writes (as the release chunks)
MAX_MANIFEST_BYTES = 64 << 20     # as the C core reads it


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
    return {n: sha256(safe_path(root, n)) for n in sorted(names)}


# ---- paths ----------------------------------------------------------------------------------------
def relative_path_problem(rel) -> str | None:
    """Why `rel` is not a plain relative path (a string, not absolute, no '..', no backslash), or None."""
    if not isinstance(rel, str) or not rel:
        return f"expected a relative path, found {_found(rel)}"
    if rel.startswith(("/", "~")) or re.match(r"^[A-Za-z]:", rel) or "\\" in rel or "\0" in rel:
        return f"expected a relative path inside the artifact directory, found {rel!r}"
    if ".." in PurePosixPath(rel).parts:
        return f"expected a path inside the artifact directory, found {rel!r}, which climbs out with '..'"
    return None


def safe_path(root, rel) -> Path:
    """root/rel resolved, symlinks included; ManifestError unless it is a relative path without '..' that
    stays inside root (export writes, and the runtime reads, nothing else)."""
    problem = relative_path_problem(rel)
    if problem:
        raise ManifestError(f"artifacts {root}: {problem}")
    base = Path(root).resolve()
    try:
        path = (base / rel).resolve()
    except (RuntimeError, OSError) as e:                 # a symbolic link loop
        raise ManifestError(f"artifacts {root}: {rel}: expected a file, found a path that does not resolve ({e})") from e
    if not path.is_relative_to(base):
        raise ManifestError(f"artifacts {root}: {rel} resolves to {path}, outside the artifact directory "
                            f"(a symbolic link?); expected a file inside it")
    return path


# ---- the schema -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Kind:
    """What a value must be: `what` names it in errors (and for the C core's mirror), `ok` tests it."""
    what: str
    ok: Callable[[object], bool]


def integer(lo: int, hi: int) -> Kind:
    return Kind(f"an integer in [{lo}, {hi}]", lambda v: type(v) is int and lo <= v <= hi)


def number(lo: float, hi: float, above: bool = False) -> Kind:
    """A finite number in [lo, hi], or in (lo, hi] with above=True."""
    return Kind(f"a number in {'(' if above else '['}{lo:g}, {hi:g}]",
                lambda v: type(v) in (int, float) and math.isfinite(v) and (v > lo if above else v >= lo) and v <= hi)


def one_of(*choices: str) -> Kind:
    return Kind(f"one of {list(choices)}", lambda v: isinstance(v, str) and v in choices)


def list_of(kind: Kind, n: int | None = None, at_least: int = 0) -> Kind:
    size = f"{n} " if n is not None else f"{at_least}+ " if at_least else ""
    return Kind(f"a list of {size}items, each {kind.what}",
                lambda v: isinstance(v, list) and (n is None or len(v) == n) and len(v) >= at_least
                and all(kind.ok(x) for x in v))


def nullable(kind: Kind) -> Kind:
    return Kind(f"{kind.what} or null", lambda v: v is None or kind.ok(v))


OBJECT = Kind("an object", lambda v: isinstance(v, dict))
STRING = Kind("a string", lambda v: isinstance(v, str))
NAME = Kind("a non-empty string", lambda v: isinstance(v, str) and v != "")
PATH = Kind("a relative path inside the artifact directory (not absolute, no '..')",
            lambda v: relative_path_problem(v) is None)
SHA256 = Kind("a sha256 digest (64 lowercase hex digits)", lambda v: isinstance(v, str) and re.fullmatch("[0-9a-f]{64}", v) is not None)
DIM = Kind("a dim (an integer in [0, 2^31) or a symbol)",
           lambda v: (type(v) is int and 0 <= v < 1 << 31) or (isinstance(v, str) and v != ""))
DTYPES = ("float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool")   # numpy's names
ID_MAX = (1 << 22) - 1            # largest token id (vocabularies above 4M entries are refused)

# The schema: (path, kind, required). A path's parts are keys; "*" is every key of an object and "[]" every
# item of a list. Keys not listed are allowed and ignored (notes, provenance, later additions); the bounds
# sit far above every released LLaMA-VID (13B, 336 px, 64K positions) and below what exhausts a machine.
# The C core (runtime/csrc/config.c) checks the fields it reads against the same ranges.
SCHEMA = [
    ("model",                                  OBJECT,                        True),
    ("model.name",                             STRING,                        True),
    ("model.config",                           OBJECT,                        True),
    ("model.tokens_per_frame",                 integer(1, 1 << 16),           True),
    ("model.vision_width",                     integer(1, 1 << 16),           True),
    ("model.llm_hidden",                       integer(1, 1 << 17),           True),
    ("preprocess",                             OBJECT,                        True),
    ("preprocess.image_size",                  integer(1, 4096),              True),
    ("preprocess.mean",                        list_of(number(-1e3, 1e3), 3), True),
    ("preprocess.std",                         list_of(number(0, 1e3, above=True), 3), True),
    ("preprocess.image_aspect_ratio",          STRING,                        True),
    ("preprocess.video_fps",                   number(0, 1000, above=True),   True),
    ("prompt",                                 OBJECT,                        True),
    ("prompt.template",                        STRING,                        True),
    ("prompt.system",                          STRING,                        True),
    ("prompt.roles",                           list_of(NAME, 2),              True),
    ("prompt.sep",                             STRING,                        True),
    ("prompt.sep2",                            STRING,                        True),
    ("prompt.image_placeholder",               NAME,                          True),
    ("prompt.image_token_id",                  integer(-(1 << 31), -1),       True),
    ("prompt.media_prefix",                    NAME,                          True),
    ("special_ids",                            OBJECT,                        True),
    ("special_ids.bos",                        integer(0, ID_MAX),            True),
    ("special_ids.eos",                        integer(0, ID_MAX),            True),
    ("special_ids.pad",                        integer(0, ID_MAX),            True),
    ("special_ids.image",                      integer(-(1 << 31), -1),       True),
    ("tokenizers",                             OBJECT,                        True),
    ("tokenizers.llm",                         PATH,                          True),
    ("tokenizers.qformer",                     PATH,                          True),
    ("tokenizers.qformer_max_length",          integer(1, 1 << 16),           True),
    ("runtime",                                OBJECT,                        True),
    ("runtime.frame_chunk",                    integer(1, 4096),              True),
    ("llm",                                    OBJECT,                        True),
    ("llm.context",                            integer(1, 1 << 22),           True),
    ("llm.max_token",                          integer(1, 1 << 22),           True),
    ("llm.layers",                             integer(1, 1024),              True),
    ("llm.kv_heads",                           integer(1, 1024),              True),
    ("llm.head_dim",                           integer(1, 4096),              True),
    ("llm.hidden",                             integer(1, 1 << 17),           True),
    ("llm.vocab_size",                         integer(1, ID_MAX + 1),        True),
    ("llm.rope_theta",                         number(1, 1e12),               True),
    ("llm.rope_scaling",                       number(1e-6, 1e6),             True),
    ("llm.kv_layout",                          one_of("shared", "concat"),    True),
    ("llm.past_names",                         list_of(NAME, at_least=2),     True),
    ("llm.present_names",                      list_of(NAME, at_least=2),     True),
    ("llm.embeddings",                         PATH,                          True),
    ("stages",                                 OBJECT,                        True),
    ("stages.*",                               OBJECT,                        True),
    ("stages.*.inputs",                        OBJECT,                        True),
    ("stages.*.inputs.*",                      OBJECT,                        True),
    ("stages.*.inputs.*.shape",                list_of(DIM, at_least=1),      True),
    ("stages.*.inputs.*.dtype",                one_of(*DTYPES),               True),
    ("stages.*.outputs",                       OBJECT,                        True),
    ("stages.*.outputs.*",                     OBJECT,                        True),
    ("stages.*.outputs.*.shape",               list_of(DIM, at_least=1),      True),
    ("stages.*.outputs.*.dtype",               one_of(*DTYPES),               True),
    ("stages.*.variants",                      list_of(OBJECT, at_least=1),   True),
    ("stages.*.variants[].file",               PATH,                          True),
    ("stages.*.variants[].precision",          NAME,                          True),
    ("stages.*.variants[].backend",            one_of(*BACKENDS),             True),
    ("stages.*.variants[].extra_files",        list_of(PATH),                 False),
    ("stages.*.variants[].role",               one_of("prefill"),             False),
    ("stages.*.variants[].form",               STRING,                        False),
    ("stages.*.variants[].built_with",         nullable(OBJECT),              False),
    ("stages.*.variants[].engine",             nullable(PATH),                False),   # trtllm: folders it reads
    ("stages.*.variants[].checkpoint",         PATH,                          False),
    ("stages.*.variants[].hf",                 PATH,                          False),
    ("stages.*.variants[].build_dir",          PATH,                          False),
    ("stages.*.variants[].profile",            OBJECT,                        False),
    ("stages.*.variants[].profile.*",          OBJECT,                        True),
    ("stages.*.variants[].profile.*.min",      list_of(DIM),                  True),
    ("stages.*.variants[].profile.*.opt",      list_of(DIM),                  True),
    ("stages.*.variants[].profile.*.max",      list_of(DIM),                  True),
    ("build",                                  OBJECT,                        True),
    ("build.precision",                        NAME,                          True),
    ("versions",                               OBJECT,                        True),
    ("files",                                  OBJECT,                        True),
    ("files.*",                                SHA256,                        True),
]
_MISSING = object()


def _found(v) -> str:
    """A short description of a JSON value for error messages."""
    if v is _MISSING:
        return "no such key"
    if v is None or isinstance(v, bool):
        return json.dumps(v)
    if isinstance(v, (int, float)):
        text = repr(v)
        return f"the number {text if len(text) < 24 else text[:20] + '...'}"
    if isinstance(v, str):
        return f"the string {v[:40]!r}{'...' if len(v) > 40 else ''}"
    if isinstance(v, list):
        return f"a list of {len(v)} item(s)" + (f" [{', '.join(_found(x) for x in v[:3])}{', ...' if len(v) > 3 else ''}]"
                                                  if v and not isinstance(v[0], (list, dict)) else "")
    return f"an object with keys {sorted(v)[:6]}"


def _select(node, parts: list[str], where: str = ""):
    """(path, value) for every value at `parts` below node; a missing last key gives (path, _MISSING).
    Where an earlier part is missing or of the wrong type, nothing: that part's own row reports it."""
    if not parts:
        yield where, node
        return
    head, rest = parts[0], parts[1:]
    if not isinstance(node, dict):
        return
    if head == "*":
        for key, value in node.items():
            yield from _select(value, rest, f"{where}.{key}" if where else key)
        return
    many = head.endswith("[]")
    key = head[:-2] if many else head
    path = f"{where}.{key}" if where else key
    if key not in node:
        if not rest and not many:
            yield path, _MISSING
        return
    if not many:
        yield from _select(node[key], rest, path)
    elif isinstance(node[key], list):
        for i, item in enumerate(node[key]):
            yield from _select(item, rest, f"{path}[{i}]")


def schema_problems(m: dict) -> list[str]:
    """One line per SCHEMA row a value breaks: its path, what was expected, what was found."""
    problems = []
    for path, kind, required in SCHEMA:
        for where, value in _select(m, path.split(".")):
            if value is _MISSING and not required:
                continue
            if value is _MISSING or not kind.ok(value):
                problems.append(f"{where}: expected {kind.what}, found {_found(value)}")
    return problems


def runtime_files(m: dict) -> list[tuple[str, str]]:
    """(where, path) of every file the runtime reads: stage files and their extra files, the embedding
    table, the tokenizers. Each must be listed in 'files' (with its hash)."""
    out = [("llm.embeddings", m["llm"]["embeddings"]), ("tokenizers.llm", m["tokenizers"]["llm"]),
           ("tokenizers.qformer", m["tokenizers"]["qformer"])]
    for stage, entry in m["stages"].items():
        for i, v in enumerate(entry["variants"]):
            out += [(f"stages.{stage}.variants[{i}].file", v["file"])]
            out += [(f"stages.{stage}.variants[{i}].extra_files", f) for f in v.get("extra_files", [])]
    return out


def relations(m: dict) -> list[str]:
    """What ties the manifest's values together (run once SCHEMA holds); one line per broken relation."""
    p, ids, llm = m["prompt"], m["special_ids"], m["llm"]
    problems = [f"{where}: expected {path}, which the runtime reads, listed in 'files' with its hash, found no entry"
                for where, path in runtime_files(m) if path not in m["files"]]
    problems += [f"files: {problem}" for name in m["files"] if (problem := relative_path_problem(name))]
    for key in ("bos", "eos", "pad"):
        if ids[key] >= llm["vocab_size"]:
            problems.append(f"special_ids.{key}: expected an id below llm.vocab_size ({llm['vocab_size']}), "
                            f"found {ids[key]}")
    if ids["image"] != p["image_token_id"]:
        problems.append(f"special_ids.image: expected prompt.image_token_id ({p['image_token_id']}), found {ids['image']}")
    place = p["image_placeholder"]
    if p["media_prefix"].count(place) != 1:
        problems.append(f"prompt.media_prefix: expected the image placeholder {place!r} once, found {p['media_prefix']!r}")
    for key in ("system", "sep", "sep2"):
        if place in p[key]:
            problems.append(f"prompt.{key}: expected text without the image placeholder {place!r}, found {p[key][:40]!r}")
    if llm["hidden"] != m["model"]["llm_hidden"]:
        problems.append(f"llm.hidden: expected model.llm_hidden ({m['model']['llm_hidden']}), found {llm['hidden']}")
    if llm["kv_heads"] * llm["head_dim"] > llm["hidden"]:
        problems.append(f"llm.kv_heads x llm.head_dim: expected at most llm.hidden ({llm['hidden']}), found "
                        f"{llm['kv_heads']} x {llm['head_dim']}")
    past, present = kv_names(llm["layers"])
    for key, want in (("past_names", past), ("present_names", present)):
        if llm[key] != want:
            problems.append(f"llm.{key}: expected the {len(want)} names of {llm['layers']} layers "
                            f"({want[0]}, ...), found {_found(llm[key])}")
    kv = ["batch", llm["kv_heads"], None, llm["head_dim"]]
    io = m["stages"].get("llm", {})
    for side, prefix, names in (("inputs", "past_key_values.", past), ("outputs", "present.", present)):
        have = sorted(n for n in io.get(side, {}) if n.startswith(prefix))
        if have != sorted(names):
            problems.append(f"stages.llm.{side}: expected KV tensors {names[0]} ... {names[-1]} ({len(names)}), "
                            f"found {len(have)}")
        problems += _shape_problems(f"stages.llm.{side}", {n: kv for n in have}, io.get(side, {}))
    expect = {"vision": {"inputs": {"pixel_values": [None, 3, m["preprocess"]["image_size"], m["preprocess"]["image_size"]]},
                         "outputs": {"vision_feats": [None, None, m["model"]["vision_width"]]}},
              "head": {"outputs": {"frame_tokens": [None, m["model"]["tokens_per_frame"], llm["hidden"]]}},
              "llm": {"inputs": {"inputs_embeds": [None, None, llm["hidden"]]},
                      "outputs": {"logits": [None, None, llm["vocab_size"]]}}}
    for stage, sides in expect.items():
        for side, shapes in sides.items():
            problems += _shape_problems(f"stages.{stage}.{side}", shapes, m["stages"].get(stage, {}).get(side, {}))
    for stage, entry in m["stages"].items():
        for i, v in enumerate(entry["variants"]):
            where = f"stage {stage} variant {v['file']}"
            if v.get("role") and stage != "llm":
                problems.append(f"{where}: expected no role or role 'prefill' (llm only), found role {v['role']!r}")
            if v["backend"] == "ort-openvino" and v["precision"] != OPENVINO_PRECISION:
                problems.append(f"{where}: expected precision {OPENVINO_PRECISION!r} (what ort-openvino runs), found "
                                f"{v['precision']!r}")
            for name, dims in v.get("profile", {}).items():
                shape = entry["inputs"].get(name, {}).get("shape")
                if shape is None or any(len(dims[k]) != len(shape) for k in ("min", "opt", "max")):
                    problems.append(f"{where}: profile {name}: expected min/opt/max of an input's rank, found "
                                    f"{'no such input' if shape is None else [len(dims[k]) for k in ('min', 'opt', 'max')]}")
    return problems


def _shape_problems(where: str, want: dict, io: dict) -> list[str]:
    """Each tensor of `want` present in io whose shape differs where `want` has a value (None: any dim)."""
    out = []
    for name, dims in want.items():
        shape = io.get(name, {}).get("shape")
        if shape is not None and (len(shape) != len(dims) or any(w is not None and s != w for s, w in zip(shape, dims))):
            out.append(f"{where}.{name}.shape: expected {['*' if w is None else w for w in dims]}, found {shape}")
    return out


def validate(m, where: str = "manifest.json") -> dict:
    """Steps 2-4 of the module docstring on a parsed manifest; ManifestError listing every problem."""
    if not isinstance(m, dict):
        raise ManifestError(f"{where}: expected a JSON object, found {_found(m) if m is not None else 'null'}")
    if m.get("format") != FORMAT or m.get("manifest_version") != MANIFEST_VERSION:
        built = m.get("versions", {}).get("package", "unknown") if isinstance(m.get("versions"), dict) else "unknown"
        raise ManifestError(f"{where}: expected format {FORMAT!r} version {MANIFEST_VERSION}, found "
                            f"{m.get('format')!r} version {m.get('manifest_version')!r} (built by llamavid-deploy "
                            f"{built}); rebuild the directory with python -m export.build")
    stages = m.get("stages")
    if isinstance(stages, dict):
        unknown = sorted(set(stages) - set(STAGES))
        if unknown:
            raise ManifestError(f"{where}: expected the stages this runtime knows {list(STAGES)}, found unknown "
                                f"stage(s) {unknown}")
        missing = [s for s in STAGES if s not in stages]
        if missing:
            raise ManifestError(f"{where}: expected stages {list(STAGES)}, found no {missing}")
    problems = schema_problems(m)
    if not problems:
        problems = relations(m)
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise ManifestError(f"{where}: {len(problems)} problem(s): " + "; ".join(problems[:8]) + more)
    return m


def check_embeddings(root: Path, m: dict) -> None:
    """The embedding table's .npy header: float32 or float16, [llm.vocab_size, llm.hidden]."""
    import numpy as np
    rel = m["llm"]["embeddings"]
    try:
        with open(safe_path(root, rel), "rb") as f:
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"npy format version {version}")
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
    except (ValueError, OSError, SyntaxError, TypeError) as e:
        raise ManifestError(f"artifacts {root}: {rel}: expected a .npy array, found unreadable data ({e})") from e
    want = (m["llm"]["vocab_size"], m["llm"]["hidden"])
    if shape != want or dtype not in (np.float32, np.float16):
        raise ManifestError(f"artifacts {root}: {rel}: expected a float32 [vocab_size, hidden] = {list(want)} table, "
                            f"found {dtype} {list(shape)}")


def write_manifest(root: Path, manifest: dict) -> Path:
    """Validate (schema, relations, every path inside root and present), then write manifest.json
    atomically: last, so a directory with a manifest is complete."""
    root = Path(root)
    text = json.dumps(manifest, indent=2) + "\n"
    validate(json.loads(text), f"{root / 'manifest.json'} (being written)")        # what a reader will see
    for name in manifest["files"]:
        if not safe_path(root, name).is_file():
            raise ManifestError(f"artifacts {root}: 'files' lists {name}, which is not there")
    tmp = root / f".manifest.json.tmp-{os.getpid()}"
    tmp.write_text(text)
    tmp.replace(root / "manifest.json")
    return root / "manifest.json"


def read_manifest(root: Path, verify_hashes: bool = True, manifest_sha256: str | None = None) -> dict:
    """The validated manifest of artifact directory `root` (the module docstring lists the checks).
    manifest_sha256: the expected sha256 of manifest.json itself, for deployments that pin it."""
    root = Path(root)
    path = root / "manifest.json"
    if not root.is_dir():
        found = "nothing" if not root.exists() else "a file"
        raise ManifestError(f"artifacts {root}: expected manifest.json (written by python -m export.build) in a "
                            f"directory, found {found}")
    if not path.is_file():
        raise ManifestError(f"artifacts {root}: expected manifest.json (written by python -m export.build), "
                            f"found {sorted(p.name for p in root.iterdir())[:8]}")
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{path}: expected at most {MAX_MANIFEST_BYTES >> 20} MiB, found {size:,} bytes")
    data = path.read_bytes()
    if manifest_sha256 is not None:
        if not SHA256.ok(str(manifest_sha256).lower()):
            raise ManifestError(f"manifest_sha256: expected 64 hex digits, found {_found(manifest_sha256)}")
        got = hashlib.sha256(data).hexdigest()
        if got != manifest_sha256.lower():
            raise ManifestError(f"{path}: expected sha256 {manifest_sha256.lower()} (pinned), found {got}: the "
                                f"manifest was changed; rebuild, or pin the new manifest's hash")
    try:
        m = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: expected UTF-8 JSON, found bytes that are not UTF-8 ({e.reason} at byte {e.start})") from e
    except (ValueError, RecursionError) as e:      # JSONDecodeError, too many digits, nesting too deep
        raise ManifestError(f"{path}: expected JSON, found a parse error ({str(e)[:200]})") from e
    validate(m, str(path))
    for name, want in m["files"].items():
        p = safe_path(root, name)
        if verify_hashes:
            if not p.is_file():
                raise ManifestError(f"artifacts {root}: expected file {name} (sha256 {want}), found no file")
            got = sha256(p)
            if got != want:
                raise ManifestError(f"artifacts {root}: file {name} was modified: expected sha256 {want}, "
                                    f"found {got}; rebuild with python -m export.build")
    for where, rel in runtime_files(m):                # ONNX Runtime also reads a graph's external weights
        if rel.endswith(".onnx") and rel + ".data" not in m["files"] and safe_path(root, rel + ".data").exists():
            raise ManifestError(f"artifacts {root}: {where}: expected {rel}.data (its external weights) listed in "
                                f"'files' with its hash, found no entry")
    if safe_path(root, m["llm"]["embeddings"]).is_file():
        check_embeddings(root, m)
    return m
