"""TensorRT engines for the vision and head stages: a build plan that is pure data and checked on
CPU, and a short engine build with the TensorRT Python API.

    manifest.json + user limits --make_plan--> EnginePlan: per stage the ONNX file, one optimisation
        profile (min/opt/max of every input), precision + the layer types kept in fp32, plugins
        (library + the creator's fields), workspace, engine file
    check_plan(plan) -> [Check]     on CPU, no TensorRT:
        io        ONNX graph inputs/outputs = the manifest's names, dtypes and static dims
        profiles  every shape the runtime will ask for (frames per call, Q-Former text lengths) is
                  inside the profile
        ops       every op is one TensorRT's ONNX parser imports (ONNX_PARSER_OPS), or a plan plugin
        plugin    each plugin node's attributes = the creator's name / version / namespace / fields
        library   the plugin library exists, or nvcc + TensorRT headers are here to build it
        precision the layers kept in fp32; int8: explicit (the graph's Q/DQ nodes, written by calib/) or
                  implicit (an fp32 graph + a calibration cache with a scale for every MatMul input, made
                  for that graph: the manifest records the graph's hash next to the cache calib/ writes)
    context attention  the head's ContextAttention as the plugin (head_trt.onnx) or as standard ops (the
              fp32 head.onnx): --context-attention auto follows python -m kernels.bench's figures
              (--kernel-bench JSON, default the H200 run kept in kernels/context_attention/measured.json)
              at the model's shape and the precision's type: the plugin where it beat the fastest
              standard op; recorded in the head engine's manifest entry
    build_engines(plan) -> engine files (TensorRT + a CUDA device; temp names, renamed at the end)
    record_engines(plan) -> manifest.json lists the engines as "tensorrt" variants

    python -m export.trt --artifacts DIR [--plan-only] [--max-frames N] [--max-text N] [--precision P]
                         [--int8 explicit|implicit] [--calibration-cache FILE]

The LLM stage is not planned here: export/trtllm.py converts it for TensorRT-LLM and plans its engine.

Precision in TensorRT 10 (weakly typed network): fp16/int8 are builder flags, and every layer of a
type in FP32_LAYER_TYPES (normalization, softmax, reduce: LayerNorm statistics, attention
probabilities, the content pooling mean) gets layer.precision = float32 and float32 outputs under
OBEY_PRECISION_CONSTRAINTS. int8 adds the INT8 flag: an explicitly quantized graph (Q/DQ) says itself
which tensors are int8; an fp32 graph gets a calibrator that replays the calibration cache. TensorRT 10.12 deprecated weak typing and 11 removes it; there the way
is a strongly typed network from an ONNX graph with those ops kept fp32 by Casts. build_engine
refuses fp16/int8 on TensorRT >= 11 rather than build something else.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import struct
import sys
from dataclasses import asdict, dataclass, field
from itertools import product
from pathlib import Path

PRECISIONS = ("fp32", "fp16", "int8")
PLANNED_STAGES = ("vision", "head")
FP32_LAYER_TYPES = ("NORMALIZATION", "SOFTMAX", "REDUCE")          # trt.LayerType names
FP32_ONNX_OPS = {"LayerNormalization": "NORMALIZATION", "GroupNormalization": "NORMALIZATION",
                 "InstanceNormalization": "NORMALIZATION", "Softmax": "SOFTMAX", "LogSoftmax": "SOFTMAX",
                 **{f"Reduce{r}": "REDUCE" for r in ("Mean", "Sum", "Max", "Min", "Prod", "L1", "L2",
                                                     "LogSum", "LogSumExp", "SumSquare")}}
DEFAULT_TENSORRT = "10.3"        # the oldest TensorRT the engines are meant for: JetPack 6
INT8_MODES = ("explicit", "implicit")
OPT_TEXT = 32                    # profile opt of the Q-Former text length: a typical question
WORKSPACE_MIB = 1024
CONTEXT_ATTENTION = ("auto", "plugin", "standard")
KERNEL_BENCH = Path(__file__).resolve().parent.parent / "kernels" / "context_attention" / "measured.json"
BENCH_DTYPE = {"fp32": "fp32", "fp16": "fp16", "int8": "fp16"}   # int8 engines keep attention in fp16

# ---- what TensorRT's ONNX parser imports ----------------------------------------------------------
# From onnx-tensorrt docs/operators.md as shipped with TensorRT 10.15 ("supports operators in the
# inclusive range of opset 9 to opset 24"): the rows marked Y, and the rows marked N. ADDED_IN: the
# ops onnx-tensorrt's CHANGELOG says were added during 10.x (every other Y row is older than 10.0).
# OPSET_RANGE: the opset range each documented version states (10.0: 9..20, 10.15: 9..24).
ONNX_PARSER_OPS = frozenset("""
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization
    BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh
    CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike
    Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool
    Greater GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish
    Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less
    LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
    MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
    ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike
    Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd
    ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RMSNormalization RNN RoiAlign
    RotaryEmbedding Round STFT ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid
    Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh
    TensorScatter ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())
ONNX_PARSER_REJECTS = frozenset("""
    AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor Col2Im CenterCropPad Compress
    ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear ImageDecoder MatMulInteger MaxRoiPool
    MaxUnpool MelWeightMatrix Multinomial NegativeLogLikelihoodLoss Optional OptionalGetElement
    OptionalHasElement QLinearConv QLinearMatMul RegexFullMatch SequenceAt SequenceConstruct SequenceEmpty
    SequenceErase SequenceInsert SequenceLength SequenceMap SoftmaxCrossEntropyLoss SplitToSequence
    StringConcat StringNormalizer StringSplit TfIdfVectorizer Unique
""".split())
ADDED_IN = {"DeformConv": (10, 1), "BlackmanWindow": (10, 4), "HammingWindow": (10, 4), "HannWindow": (10, 4),
            "STFT": (10, 5), "Attention": (10, 14), "RMSNormalization": (10, 15), "RotaryEmbedding": (10, 15),
            "TensorScatter": (10, 15)}
OPSET_RANGE = {(10, 0): (9, 20), (10, 15): (9, 24)}

# ONNX attribute type -> the PluginFieldType it becomes (shared/FACTS.md section 2: attributes other
# than plugin_version / plugin_namespace become the plugin's fields)
FIELD_ATTRIBUTE = {"kFLOAT32": ("FLOAT", "FLOATS"), "kINT32": ("INT", "INTS"), "kCHAR": ("STRING",)}
PLUGIN_ATTRIBUTES = ("plugin_version", "plugin_namespace")


class PlanError(ValueError):
    """The manifest or the limits do not allow a plan; the message says which field and why."""


# ---- the plan --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dims:
    """min / opt / max shape of one input in the optimisation profile."""
    min: tuple
    opt: tuple
    max: tuple


@dataclass(frozen=True)
class Plugin:
    """A creator the engine needs: what the ONNX node must say, and the library that registers it."""
    name: str
    version: str
    namespace: str
    fields: dict                 # field name -> PluginFieldType name, e.g. {"scale": "kFLOAT32"}
    library: str


@dataclass
class StagePlan:
    stage: str
    onnx: str                    # relative to the artifact directory
    engine: str                  # relative to the artifact directory
    io: dict                     # the manifest's {"inputs": ..., "outputs": ...} of the stage
    profile: dict                # input name -> Dims (one optimisation profile)
    precision: str
    fp32_layers: tuple           # trt.LayerType names kept in fp32 when precision is not fp32
    plugins: tuple = ()
    plugin_node: dict | None = None     # the manifest's record of the plugin node (attributes, scale)
    workspace_bytes: int = WORKSPACE_MIB << 20
    calibration_cache: str | None = None        # implicit int8: the cache TensorRT reads
    calibrated_sha256: str | None = None        # the graph the manifest says the cache was made for
    context_attention: dict | None = None   # head: plugin or standard ops, and the measurement behind it


@dataclass
class EnginePlan:
    root: str
    stages: list
    runtime: dict                # dim symbol -> (min, max) the runtime will ask for
    tensorrt: str = DEFAULT_TENSORRT
    notes: list = field(default_factory=list)


def creator_from_source(src: Path | None = None, library: Path | None = None) -> Plugin:
    """The ContextAttention creator's name, version, namespace and fields, read from the plugin's
    C++ source (the constants in the header, the field list the creator's constructor builds)."""
    from kernels.build import DEFAULT_OUT, PLUGIN_LIBRARY, SRC
    src = Path(src or SRC)
    consts = dict(re.findall(r'constexpr char const\* (k\w+) = "([^"]*)";', (src / "contextAttentionPlugin.h").read_text()))
    cpp = (src / "contextAttentionPlugin.cpp").read_text()
    ctor = re.search(r"ContextAttentionPluginCreator::ContextAttentionPluginCreator\(\) noexcept(.*?)\{", cpp, re.S)
    if ctor is None:
        raise PlanError(f"{src / 'contextAttentionPlugin.cpp'}: expected the creator's constructor, found none")
    fields = {consts[n]: t for n, t in re.findall(r"\((k\w+), nullptr, PluginFieldType::(k\w+), \d+\)", ctor.group(1))}
    return Plugin(consts["kCONTEXT_ATTENTION_NAME"], consts["kCONTEXT_ATTENTION_VERSION"],
                  consts["kCONTEXT_ATTENTION_NAMESPACE"], fields, str(library or DEFAULT_OUT / PLUGIN_LIBRARY))


def runtime_dims(manifest: dict) -> dict:
    """Dim symbol -> (min, max) of what runtime/pipeline.py asks the vision and head stages for:
    frames in chunks of 1..the manifest's frame_chunk, Q-Former prompts of 1..qformer_max_length tokens."""
    return {"frames": (1, manifest["runtime"]["frame_chunk"]), "text": (1, manifest["tokenizers"]["qformer_max_length"])}


def choose_context_attention(bench: dict | None, precision: str, frames: int, queries: int, patches: int,
                             channels: int) -> dict:
    """The head's context attention: "plugin" where kernels.bench measured the kernel faster than the
    fastest standard op at this shape and the precision's type (the row with the frame count nearest
    `frames`), "standard" where slower; the plugin (the default form) where nothing was measured."""
    dtype = BENCH_DTYPE[precision]
    rows = [r for r in (bench or {}).get("rows", []) if (r["dtype"], r["queries"], r["patches"], r["channels"])
            == (dtype, queries, patches, channels)]
    shape = f"Q={queries} N={patches} C={channels} {dtype}"
    if not rows:
        return {"form": "plugin", "reason": f"no kernels.bench figures at {shape}: the plugin (default)"}
    row = min(rows, key=lambda r: abs(r["frames"] - frames))
    standard = {k: row[f"{k}_ms"] for k in ("trt_standard", "eager", "sdpa") if f"{k}_ms" in row}
    best = min(standard, key=standard.get)
    form = "plugin" if row["kernel_ms"] < standard[best] else "standard"
    return {"form": form, "device": bench.get("device"), "date": bench.get("date"), "frames": row["frames"],
            "kernel_ms": row["kernel_ms"], "kernel": row.get("algorithm"), "standard": best,
            "standard_ms": standard[best],
            "reason": f"kernels.bench on {bench.get('device')} ({bench.get('date')}), {row['frames']} frames at {shape}: "
                      f"kernel {row['kernel_ms']:.3f} ms vs {best} {standard[best]:.3f} ms"}


def _trt_source(stage: str, entry: dict, plugin: bool = True, int8: bool = False) -> dict:
    """The variant TensorRT builds from: the stage's own tensorrt variant (unless plugin=False: the
    head with standard ops), else (int8) its explicitly quantized graph, else its fp32 ONNX graph
    (TensorRT lowers precision itself)."""
    for wanted in (lambda v: plugin and v["backend"] == "tensorrt" and v["file"].endswith(".onnx"),
                   lambda v: int8 and v.get("quantization") == "explicit" and v["file"].endswith(".onnx"),
                   lambda v: v["precision"] == "fp32" and v["file"].endswith(".onnx")):
        for v in entry["variants"]:
            if wanted(v):
                return v
    raise PlanError(f"manifest stage {stage}: expected a tensorrt or fp32 ONNX variant, found "
                    f"{[v['file'] for v in entry['variants']]}")


def _profile(io: dict, dims: dict) -> dict:
    """Input name -> Dims, symbolic dims taking (min, opt, max) from `dims`."""
    out = {}
    for name, t in io["inputs"].items():
        unknown = [d for d in t["shape"] if isinstance(d, str) and d not in dims]
        if unknown:
            raise PlanError(f"input {name}: dims {unknown} have no profile range (known: {sorted(dims)})")
        rng = [dims[d] if isinstance(d, str) else (d, d, d) for d in t["shape"]]
        out[name] = Dims(*(tuple(r[i] for r in rng) for i in range(3)))
    return out


def make_plan(root, manifest: dict | None = None, max_frames: int | None = None, max_text: int | None = None,
              precision: str | None = None, plugin_library=None, workspace_mib: int = WORKSPACE_MIB,
              tensorrt: str = DEFAULT_TENSORRT, calibration_cache=None, context_attention: str = "auto",
              kernel_bench=KERNEL_BENCH, int8: str = "explicit") -> EnginePlan:
    """The engine plan of an artifact directory. manifest=None reads root/manifest.json (hashes checked).
    Profiles: frames 1..max_frames (opt = max: full chunks dominate a video), text 1..max_text (opt
    OPT_TEXT); the defaults are what the runtime asks for (runtime_dims). context_attention: auto
    (choose_context_attention on the kernel_bench JSON), plugin or standard.
    int8 "explicit" builds from the stage's Q/DQ graph where the manifest has one; "implicit" (or a stage
    without one) from its fp32 graph with `calibration_cache`, or the cache the manifest records for it."""
    if int8 not in INT8_MODES:
        raise PlanError(f"int8: expected one of {INT8_MODES}, found {int8!r}")
    if manifest is None:
        from runtime.manifest import read_manifest
        manifest = read_manifest(Path(root))
    runtime = runtime_dims(manifest)
    max_frames = max_frames or runtime["frames"][1]
    max_text = max_text or runtime["text"][1]
    dims = {"frames": (1, max_frames, max_frames), "text": (1, min(OPT_TEXT, max_text), max_text)}
    if context_attention not in CONTEXT_ATTENTION:
        raise PlanError(f"context attention: expected one of {CONTEXT_ATTENTION}, found {context_attention!r}")
    creator = creator_from_source(library=plugin_library)
    stages = []
    for stage in PLANNED_STAGES:
        entry = manifest["stages"][stage]
        src = _trt_source(stage, entry)
        p = precision or (src["precision"] if src["backend"] == "tensorrt" else manifest["build"]["precision"])
        if p not in PRECISIONS:
            raise PlanError(f"stage {stage}: expected a precision in {PRECISIONS}, found {p!r}")
        choice = None
        if src.get("plugin"):
            choice = _context_attention_choice(manifest, entry, p, max_frames, context_attention, kernel_bench)
            src = _trt_source(stage, entry, plugin=choice["form"] == "plugin", int8=p == "int8")
        io = {k: entry[k] for k in ("inputs", "outputs")}
        node = src.get("plugin")
        cache, calibrated = None, None
        if p == "int8" and (int8 == "implicit" or src.get("quantization") != "explicit"):
            rec = src.get("trt_cache") or {}                 # {file, source, source_sha256}, written by calib/
            src = {**src, "file": rec.get("source", src["file"])}
            cache = calibration_cache or (Path(root) / rec["file"] if rec else None)
            calibrated = None if calibration_cache else rec.get("source_sha256")
        stages.append(StagePlan(
            stage=stage, onnx=src["file"], engine=f"{stage}.{p}.engine", io=io, profile=_profile(io, dims),
            precision=p, fp32_layers=() if p == "fp32" else FP32_LAYER_TYPES,
            plugins=(creator,) if node else (), plugin_node=node, workspace_bytes=workspace_mib << 20,
            calibration_cache=str(cache) if cache else None, calibrated_sha256=calibrated,
            context_attention=choice))
    notes = ["llm: not planned here (TensorRT-LLM: export/trtllm.py plans and builds its engine)"]
    positions = manifest.get("model", {}).get("config", {}).get("qformer", {}).get("max_positions")
    if positions is not None and positions < runtime["text"][1]:
        notes.append(f"the Q-Former has {positions} text positions but its tokenizer passes up to {runtime['text'][1]} "
                     f"tokens: longer prompts fail on every backend, not only TensorRT")
    return EnginePlan(str(root), stages, runtime, tensorrt, notes)


def _context_attention_choice(manifest: dict, head: dict, precision: str, frames: int, mode: str, bench_path) -> dict:
    """choose_context_attention at the model's head shape, or the form the user forced."""
    if mode != "auto":
        return {"form": mode, "reason": f"--context-attention {mode}"}
    bench = None
    if bench_path is not None and Path(bench_path).is_file():
        bench = json.loads(Path(bench_path).read_text())
    _, tokens, channels = head["inputs"]["vision_feats"]["shape"]                  # [F, N+1, Cv]
    queries = manifest["model"]["config"]["qformer"]["num_query"]
    return choose_context_attention(bench, precision, frames, queries, tokens - 1, channels)


# ---- checks (CPU, no TensorRT) -----------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    name: str          # io | profiles | ops | plugin | library | precision
    stage: str
    ok: bool
    message: str


def runtime_shapes(plan: EnginePlan, sp: StagePlan):
    """Every {input: shape} the runtime will call the stage with."""
    symbols = sorted({d for t in sp.io["inputs"].values() for d in t["shape"] if isinstance(d, str)})
    ranges = [range(plan.runtime[s][0], plan.runtime[s][1] + 1) for s in symbols]
    for values in product(*ranges):
        env = dict(zip(symbols, values))
        yield {n: tuple(env.get(d, d) for d in t["shape"]) for n, t in sp.io["inputs"].items()}


def _inside(shape: tuple, d: Dims) -> bool:
    return len(shape) == len(d.min) and all(lo <= s <= hi for s, lo, hi in zip(shape, d.min, d.max))


def check_profiles(plan: EnginePlan) -> list[Check]:
    """(a) every input has a profile and every runtime call's shapes lie inside it."""
    out = []
    for sp in plan.stages:
        names, have = set(sp.io["inputs"]), set(sp.profile)
        if names != have:
            out.append(Check("profiles", sp.stage, False, f"expected a profile for exactly the inputs {sorted(names)}, "
                                                          f"found {sorted(have)}"))
            continue
        bad = next(((n, s) for call in runtime_shapes(plan, sp) for n, s in call.items()
                    if not _inside(s, sp.profile[n])), None)
        if bad:
            n, s = bad
            d = sp.profile[n]
            why = ", ".join(f"{sym} up to {plan.runtime[sym][1]}" for sym in plan.runtime
                            if sym in sp.io["inputs"][n]["shape"])
            out.append(Check("profiles", sp.stage, False,
                             f"{n} {list(s)} is outside the profile min {list(d.min)} max {list(d.max)}; the runtime "
                             f"asks for {why} (frames: manifest runtime.frame_chunk, text: manifest "
                             f"tokenizers.qformer_max_length): raise --max-frames / --max-text"))
            continue
        ranges = "; ".join(f"{n} {list(d.min)}..{list(d.max)} opt {list(d.opt)}" for n, d in sp.profile.items())
        out.append(Check("profiles", sp.stage, True, f"covers every runtime call ({ranges})"))
    return out


def load_graph(path: Path):
    """The ONNX graph without its external weights (structure is all the checks read)."""
    import onnx
    return onnx.load(str(path), load_external_data=False)


def _nodes(graph):
    """Every node, subgraphs (If/Loop/Scan bodies) included."""
    for node in graph.node:
        yield node
        for a in node.attribute:
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from _nodes(g)


def _version(text: str) -> tuple:
    return tuple(int(x) for x in text.split(".")[:2])


def _tensor_info(value_info) -> tuple[list, str]:
    import onnx
    t = value_info.type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return shape, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name


def _dim_matches(graph_dim, manifest_dim, kind: str) -> bool:
    if isinstance(manifest_dim, str):                  # symbolic: must be dynamic in the graph
        return graph_dim is None
    return graph_dim == manifest_dim or (kind == "outputs" and graph_dim is None)    # exporters leave some
                                                                                      # output dims symbolic


def check_io(sp: StagePlan, model) -> list[Check]:
    """Graph inputs/outputs against the manifest: names, dtypes, rank, static dims (a symbolic
    manifest dim must be dynamic in the graph, or TensorRT cannot vary it)."""
    problems = []
    for kind, values in (("inputs", model.graph.input), ("outputs", model.graph.output)):
        graph = {v.name: _tensor_info(v) for v in values}
        want = sp.io[kind]
        if sorted(graph) != sorted(want):
            problems.append(f"{kind}: manifest names {sorted(want)}, graph has {sorted(graph)}")
            continue
        for name, t in want.items():
            shape, dtype = graph[name]
            if dtype != t["dtype"] or len(shape) != len(t["shape"]) or not all(
                    _dim_matches(g, m, kind) for g, m in zip(shape, t["shape"])):
                problems.append(f"{name}: manifest {t['shape']} {t['dtype']}, graph "
                                f"{['?' if g is None else g for g in shape]} {dtype}")
    ok = not problems
    return [Check("io", sp.stage, ok, f"{sp.onnx}: " + ("tensor names, dtypes and dims match the manifest" if ok
                                                         else "; ".join(problems)))]


def check_ops(sp: StagePlan, model, tensorrt: str = DEFAULT_TENSORRT) -> list[Check]:
    """(b) each node is an op TensorRT's ONNX parser imports (in the target version), or a plugin of the plan."""
    want = _version(tensorrt)
    if want < min(OPSET_RANGE):
        raise PlanError(f"TensorRT {tensorrt}: the op table starts at 10.0 (IPluginV3 needs TensorRT >= 10)")
    lo, hi = OPSET_RANGE[max(v for v in OPSET_RANGE if v <= want)]
    problems = []
    opset = {o.domain or "ai.onnx": o.version for o in model.opset_import}.get("ai.onnx")
    if opset is None or not lo <= opset <= hi:
        problems.append(f"opset {opset}: TensorRT {tensorrt} parses opsets {lo}..{hi}")
    plugins = {p.name: p for p in sp.plugins}
    counts: dict = {}
    for node in _nodes(model.graph):
        key = (node.domain or "ai.onnx", node.op_type)
        counts[key] = counts.get(key, 0) + 1
        if counts[key] > 1:
            continue
        where = f"{node.op_type} (domain {key[0]!r}, node {node.name!r})"
        if node.op_type in plugins:
            continue                                   # its attributes: check_plugin_nodes
        if key[0] != "ai.onnx":
            problems.append(f"{where}: not an ONNX op and no plugin of the plan provides it "
                            f"(plugins: {sorted(plugins) or 'none'})")
        elif node.op_type in ONNX_PARSER_REJECTS:
            problems.append(f"{where}: TensorRT's ONNX parser lists it as unsupported")
        elif node.op_type not in ONNX_PARSER_OPS:
            problems.append(f"{where}: not in TensorRT's ONNX operator table and no plugin of the plan provides it")
        elif ADDED_IN.get(node.op_type, (10, 0)) > want:
            since = ".".join(map(str, ADDED_IN[node.op_type]))
            problems.append(f"{where}: parsed since TensorRT {since}, the plan targets {tensorrt}")
    if problems:
        return [Check("ops", sp.stage, False, f"{sp.onnx}: " + "; ".join(problems))]
    summary = ", ".join(f"{op}" + (f"@{d}" if d != "ai.onnx" else "") for d, op in sorted(counts))
    return [Check("ops", sp.stage, True, f"{sp.onnx}: opset {opset}, {len(counts)} op types all parsed by TensorRT "
                                         f">= {tensorrt} or a plugin: {summary}")]


def check_plugin_nodes(sp: StagePlan, model, tensorrt: str = DEFAULT_TENSORRT) -> list[Check]:
    """(c) each plugin node's name / plugin_version / plugin_namespace and fields match the creator,
    and its float fields hold the value the manifest recorded (e.g. scale = 1/sqrt(C))."""
    import onnx
    out = []
    for p in sp.plugins:
        nodes = [n for n in _nodes(model.graph) if n.op_type == p.name]
        if len(nodes) != 1:
            out.append(Check("plugin", sp.stage, False, f"{sp.onnx}: expected one {p.name} node, found {len(nodes)}"))
            continue
        node, problems = nodes[0], []
        attrs = {a.name: a for a in node.attribute}
        version = attrs["plugin_version"].s.decode() if "plugin_version" in attrs else "1"   # the parser's default
        if version != p.version:
            problems.append(f"plugin_version {version!r}, the creator registers version {p.version!r}")
        namespace = attrs["plugin_namespace"].s.decode() if "plugin_namespace" in attrs else None
        if namespace is None and node.domain == p.namespace and _version(tensorrt) >= (10, 10):
            namespace = node.domain                     # 10.10+ also take the namespace from the domain
        if namespace != p.namespace:
            problems.append(f"plugin_namespace {namespace!r} (domain {node.domain!r}), the creator registers "
                            f"namespace {p.namespace!r}; TensorRT < 10.10 reads only the attribute")
        for name, ftype in p.fields.items():
            if name not in attrs:
                problems.append(f"field {name!r} ({ftype}) missing")
                continue
            kind = onnx.AttributeProto.AttributeType.Name(attrs[name].type)
            if kind not in FIELD_ATTRIBUTE.get(ftype, ()):
                problems.append(f"field {name!r}: the creator takes {ftype} (attribute type "
                                f"{' or '.join(FIELD_ATTRIBUTE.get(ftype, ('?',)))}), the node has {kind}")
            elif kind == "FLOAT":
                value, recorded = attrs[name].f, (sp.plugin_node or {}).get(name)
                if not math.isfinite(value) or (recorded is not None and not math.isclose(value, recorded, rel_tol=1e-6)):
                    problems.append(f"field {name!r} = {value!r}, the manifest records {recorded!r}")
        extra = sorted(set(attrs) - set(p.fields) - set(PLUGIN_ATTRIBUTES))
        if extra:
            problems.append(f"attributes {extra} are not fields of the creator (its fields: {sorted(p.fields)})")
        rec = sp.plugin_node or {}
        said = tuple(rec.get(k) for k in ("op_type", "plugin_version", "plugin_namespace"))
        if rec and said != (p.name, p.version, p.namespace):
            problems.append(f"the manifest records {said}, the creator registers {(p.name, p.version, p.namespace)}")
        if rec and (len(node.input), len(node.output)) != (len(rec.get("inputs", [])), len(rec.get("outputs", []))):
            problems.append(f"{len(node.input)} inputs / {len(node.output)} outputs, the manifest records "
                            f"{rec.get('inputs')} -> {rec.get('outputs')}")
        ident = f"{p.namespace}::{p.name} v{p.version} fields {p.fields}"
        out.append(Check("plugin", sp.stage, not problems, f"node {node.name!r} vs creator {ident}: "
                                                           + ("; ".join(problems) or "match")))
    return out


def check_library(sp: StagePlan) -> list[Check]:
    """(d) the plugin library exists, or this machine can build it (python -m kernels.build)."""
    from kernels.build import BuildError, find_tensorrt_include, find_tool
    out = []
    for p in sp.plugins:
        if Path(p.library).is_file():
            out.append(Check("library", sp.stage, True, f"{p.library} present"))
            continue
        try:
            tools = f"nvcc {find_tool('nvcc')}, headers {find_tensorrt_include()}"
        except BuildError as e:
            out.append(Check("library", sp.stage, False, f"{p.library} missing and cannot be built here: {e}"))
        else:
            out.append(Check("library", sp.stage, True, f"{p.library} missing; build_engines builds it first "
                                                        f"(python -m kernels.build: {tools})"))
    return out


def check_precision(sp: StagePlan, model, root: Path | None = None) -> list[Check]:
    """What stays fp32 (counted from the graph), and how int8 gets its scales: the graph's Q/DQ nodes, or a
    calibration cache made for this graph."""
    if sp.precision == "fp32":
        return [Check("precision", sp.stage, True, "fp32 everywhere (TF32 off)")]
    kept: dict = {}
    for node in _nodes(model.graph):
        if FP32_ONNX_OPS.get(node.op_type) in sp.fp32_layers:
            kept[node.op_type] = kept.get(node.op_type, 0) + 1
    what = ", ".join(f"{n} {op}" for op, n in sorted(kept.items())) or "no such layer"
    msg = f"{sp.precision}; kept fp32 (layer types {', '.join(sp.fp32_layers)}): {what}"
    if sp.precision != "int8":
        return [Check("precision", sp.stage, True, msg)]
    qdq = sum(n.op_type == "QuantizeLinear" for n in _nodes(model.graph))
    if qdq:
        ok = not sp.calibration_cache
        return [Check("precision", sp.stage, ok, f"{msg}; explicit quantization: {qdq} QuantizeLinear nodes" if ok else
                      f"{sp.onnx} is explicitly quantized ({qdq} QuantizeLinear nodes): expected no calibration "
                      f"cache, found {sp.calibration_cache}; give the fp32 graph for implicit int8")]
    problem = _cache_problem(sp, model, root)
    if problem:
        return [Check("precision", sp.stage, False, f"{msg}; implicit int8: {problem}")]
    return [Check("precision", sp.stage, True, f"{msg}; implicit int8, calibration cache {sp.calibration_cache}")]


def _cache_problem(sp: StagePlan, model, root: Path | None) -> str | None:
    """Why the stage's calibration cache cannot serve its fp32 graph, or None."""
    cache = sp.calibration_cache
    if not cache or not Path(cache).is_file():
        return f"int8 needs a calibration cache: expected --calibration-cache FILE, found {cache or 'none'}"
    if sp.calibrated_sha256 and root is not None:
        from runtime.manifest import sha256
        have = sha256(Path(root) / sp.onnx)
        if have != sp.calibrated_sha256:
            return (f"{cache} was made for another model: calibrated on sha256 {sp.calibrated_sha256}, {sp.onnx} is "
                    f"sha256 {have}; calibrate again (python -m export.build --precision int8)")
    try:
        _, scales = read_calibration_cache(cache)
    except PlanError as e:
        return str(e)
    inits = {t.name for t in model.graph.initializer}
    wanted = sorted({n.input[0] for n in _nodes(model.graph) if n.op_type == "MatMul" and n.input[1] in inits})
    missing = [t for t in wanted if t not in scales]
    if missing:
        return (f"{cache}: expected a scale for every MatMul input of {sp.onnx}, found none for {len(missing)} of "
                f"{len(wanted)} (e.g. {missing[0]!r}): a cache made for another model?")
    return None


# ---- int8 calibration caches (TensorRT's implicit-int8 flow) -----------------------------------------
# A first line "TRT-<version>-EntropyCalibration2" (version = major * 10000 + minor * 100 + patch, e.g. 100300
# for 10.3.0; TensorRT ignores a cache whose version or algorithm is not its own and calibrates again),
# then "<tensor name>: <scale>" per tensor, the scale (amax / 127) as the big-endian hex of its float32.
CACHE_ALGORITHM = "EntropyCalibration2"          # what _cache_calibrator, an IInt8EntropyCalibrator2, reads


def cache_header(tensorrt: str) -> str:
    major, minor, patch = (int(x) for x in (tensorrt.split(".") + ["0", "0"])[:3])
    return f"TRT-{major * 10000 + minor * 100 + patch}-{CACHE_ALGORITHM}"


def write_calibration_cache(path: Path, scales: dict, tensorrt: str = DEFAULT_TENSORRT) -> Path:
    lines = [cache_header(tensorrt)] + [f"{name}: {struct.pack('>f', s).hex()}" for name, s in scales.items()]
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


def read_calibration_cache(path: Path) -> tuple[str, dict]:
    """-> (header, {tensor name: scale}); PlanError naming the line that is not in the format."""
    lines = Path(path).read_text().splitlines()
    if not lines or not re.fullmatch(r"TRT-\d+-\w+", lines[0]):
        raise PlanError(f"{path}: expected a first line like {cache_header(DEFAULT_TENSORRT)!r}, found "
                        f"{lines[0][:60] if lines else 'an empty file'!r}")
    scales = {}
    for i, line in enumerate(lines[1:], 2):
        name, _, value = line.rpartition(": ")
        if not name or not re.fullmatch(r"[0-9a-fA-F]{8}", value):
            raise PlanError(f"{path}:{i}: expected '<tensor>: <8 hex digits>', found {line[:60]!r}")
        scales[name] = struct.unpack(">f", bytes.fromhex(value))[0]
    return lines[0], scales


def check_plan(plan: EnginePlan) -> list[Check]:
    out = check_profiles(plan)
    for sp in plan.stages:
        model = load_graph(Path(plan.root) / sp.onnx)
        out += (check_io(sp, model) + check_ops(sp, model, plan.tensorrt) + check_plugin_nodes(sp, model, plan.tensorrt)
                + check_library(sp) + check_precision(sp, model, Path(plan.root)))
    return out


def describe(plan: EnginePlan, checks: list[Check] | None = None) -> str:
    lines = [f"TensorRT engine plan for {plan.root} (op table: TensorRT >= {plan.tensorrt})",
             "runtime asks for: " + ", ".join(f"{k} {lo}..{hi}" for k, (lo, hi) in plan.runtime.items())]
    for sp in plan.stages:
        lines.append(f"[{sp.stage}] {sp.onnx} -> {sp.engine}  precision {sp.precision}"
                     + (f" (fp32 layers: {', '.join(sp.fp32_layers)})" if sp.fp32_layers else "")
                     + f", workspace {sp.workspace_bytes >> 20} MiB")
        for name, d in sp.profile.items():
            lines.append(f"    profile {name}: min {list(d.min)} opt {list(d.opt)} max {list(d.max)}")
        for p in sp.plugins:
            lines.append(f"    plugin {p.namespace}::{p.name} v{p.version} fields {p.fields} from {p.library}")
        if sp.context_attention:
            lines.append(f"    context attention: {sp.context_attention['form']} ({sp.context_attention['reason']})")
    lines += [f"note: {n}" for n in plan.notes]
    for c in checks or []:
        lines.append(f"{'ok  ' if c.ok else 'FAIL'} {c.stage:<6} {c.name:<9} {c.message}")
    return "\n".join(lines)


# ---- the build (TensorRT + a CUDA device) ----------------------------------------------------------
def require_tensorrt_and_gpu():
    """The tensorrt module, or TensorrtUnavailable saying what is missing and how to get it."""
    from runtime.backends.tensorrt import require_tensorrt_and_gpu
    return require_tensorrt_and_gpu("a TensorRT engine build")


def build_engine(sp: StagePlan, root: Path, dest: Path, log=print) -> Path:
    """ONNX -> serialized engine at `dest` (the caller renames it into place)."""
    trt = require_tensorrt_and_gpu()
    if _version(trt.__version__) >= (11, 0) and sp.precision != "fp32":
        raise RuntimeError(f"TensorRT {trt.__version__} removed the weak-typing precision flags this plan uses for "
                           f"{sp.precision}; build fp32, or use TensorRT 10.x")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    for p in sp.plugins:
        builder.get_plugin_registry().load_library(str(p.library))
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(Path(root) / sp.onnx)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        for i, e in enumerate(errors, 1):
            log(f"[trt] {sp.onnx}: parser error {i}/{len(errors)}: {e}")
        raise RuntimeError(f"{sp.onnx}: TensorRT's ONNX parser failed with {len(errors)} error(s): " + " | ".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, sp.workspace_bytes)
    profile = builder.create_optimization_profile()
    for name, d in sp.profile.items():
        profile.set_shape(name, d.min, d.opt, d.max)
    config.add_optimization_profile(profile)
    if sp.precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)
    else:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        keep = {getattr(trt.LayerType, t) for t in sp.fp32_layers}
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type in keep and layer.get_output(0).dtype in (trt.float32, trt.float16):
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)
    if sp.precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        if sp.calibration_cache:                     # implicit int8; a Q/DQ graph carries its own scales
            cache = Path(sp.calibration_cache).read_text().split("\n", 1)[1]
            config.int8_calibrator = _cache_calibrator(trt, (cache_header(trt.__version__) + "\n" + cache).encode())
    log(f"[trt] building {sp.engine} from {sp.onnx} ({sp.precision}, {network.num_layers} layers)")
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError(f"{sp.engine}: TensorRT's builder returned no engine (its log above says why)")
    with open(dest, "wb") as f:
        f.write(engine)
    return dest


def _cache_calibrator(trt, cache: bytes):
    """An int8 calibrator that only replays a calibration cache (calib/ writes it)."""
    class CacheCalibrator(trt.IInt8EntropyCalibrator2):
        def get_batch_size(self):
            return 1

        def get_batch(self, names):
            return None

        def read_calibration_cache(self):
            return cache

        def write_calibration_cache(self, data):
            return None
    return CacheCalibrator()


def build_engines(plan: EnginePlan, log=print) -> dict:
    """Every stage's engine, written under temporary names and renamed into place only when all
    are built: a failure leaves no engine file and no temporary behind. Returns what built them."""
    from kernels.build import build_plugin
    from runtime.backends.tensorrt import built_with_here
    require_tensorrt_and_gpu()
    root = Path(plan.root)
    for lib in {p.library for sp in plan.stages for p in sp.plugins}:
        if not Path(lib).is_file():
            log(f"[trt] plugin library {lib} missing: building it")
            build_plugin(Path(lib).parent)
    tmps = {sp.engine: root / f".{sp.engine}.tmp-{os.getpid()}" for sp in plan.stages}
    try:
        for sp in plan.stages:
            build_engine(sp, root, tmps[sp.engine], log)
    except BaseException:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
        raise
    for engine, tmp in tmps.items():
        tmp.replace(root / engine)
        log(f"[trt] wrote {root / engine}")
    return built_with_here()


def engine_variants(plan: EnginePlan, built_with: dict) -> dict:
    """Stage -> the manifest variant of its engine; built_with: what build_engines returned."""
    return {sp.stage: {"file": sp.engine, "precision": sp.precision, "backend": "tensorrt", "source": sp.onnx,
                       "profile": {n: asdict(d) for n, d in sp.profile.items()}, "fp32_layers": list(sp.fp32_layers),
                       "plugins": [{**asdict(p), "library": Path(p.library).name} for p in sp.plugins],
                       "built_with": built_with,
                       **({"context_attention": sp.context_attention} if sp.context_attention else {})}
            for sp in plan.stages}


def record_engines(plan: EnginePlan, built_with: dict) -> Path:
    """Put the engines first in their stages' variants and in 'files' of manifest.json (rewritten atomically).
    The manifest's hashes were verified when the plan was made (or it was just written): not read again."""
    from runtime.manifest import hash_files, read_manifest, write_manifest
    root = Path(plan.root)
    m = read_manifest(root, verify_hashes=False)
    for stage, v in engine_variants(plan, built_with).items():
        rest = [x for x in m["stages"][stage]["variants"] if x["file"] != v["file"]]
        m["stages"][stage]["variants"] = [v] + rest
    m["files"] = dict(sorted({**m["files"], **hash_files(root, [sp.engine for sp in plan.stages])}.items()))
    return write_manifest(root, m)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.trt", description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", required=True, help="artifact directory written by python -m export.build")
    ap.add_argument("--plan-only", action="store_true", help="print the plan and the checks; build nothing")
    ap.add_argument("--max-frames", type=int, default=None, help="profile max frames per call (default: the runtime's chunk)")
    ap.add_argument("--max-text", type=int, default=None, help="profile max Q-Former tokens (default: the tokenizer's max)")
    ap.add_argument("--precision", choices=PRECISIONS, default=None, help="default: the manifest's")
    ap.add_argument("--plugin-library", default=None, help="default: build/kernels/libllamavid_trt_plugins.so")
    ap.add_argument("--workspace-mib", type=int, default=WORKSPACE_MIB)
    ap.add_argument("--tensorrt", default=DEFAULT_TENSORRT, help="oldest TensorRT the engines target (op table)")
    ap.add_argument("--calibration-cache", default=None, help="implicit int8: the TensorRT calibration cache "
                    "(default: the one the manifest records)")
    ap.add_argument("--int8", choices=INT8_MODES, default="explicit", help="int8 from the Q/DQ graphs (explicit) or "
                    "from the fp32 graphs and a calibration cache (implicit, TensorRT's calibration flow)")
    ap.add_argument("--context-attention", choices=CONTEXT_ATTENTION, default="auto",
                    help="the head's context attention: the plugin, standard ops, or auto (the faster in --kernel-bench)")
    ap.add_argument("--kernel-bench", default=str(KERNEL_BENCH), help="python -m kernels.bench --json output")
    a = ap.parse_args(argv)
    from runtime.backends.tensorrt import TensorrtUnavailable
    try:
        plan = make_plan(a.artifacts, max_frames=a.max_frames, max_text=a.max_text, precision=a.precision,
                         plugin_library=a.plugin_library, workspace_mib=a.workspace_mib, tensorrt=a.tensorrt,
                         calibration_cache=a.calibration_cache, context_attention=a.context_attention,
                         kernel_bench=a.kernel_bench, int8=a.int8)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    checks = check_plan(plan)
    print(describe(plan, checks))
    failed = [c for c in checks if not c.ok]
    if failed:
        print(f"error: {len(failed)} plan check(s) failed; no engine built", file=sys.stderr)
        return 1
    if a.plan_only:
        return 0
    try:
        print(f"wrote {record_engines(plan, build_engines(plan))}")
    except TensorrtUnavailable as e:
        print(f"error: {e}; nothing was written", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
