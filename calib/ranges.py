"""Activation ranges: run graphs over calibration batches and keep, per tensor, what a method needs.

    graphs {key: (ONNX file, tensor names)} --names become graph outputs--> one ORT CPU session per graph
    for each batch {input_name: array} (checked against the graph's inputs) -> every graph runs -> per tensor:
        minmax      amax = max |x| over all batches
        percentile  histogram of |x| (BINS bins, widened by whole factors as larger values arrive)
                    -> amax = its PERCENTILE-th percentile
        entropy     the same histogram -> amax minimising KL(P || Q), P the distribution clipped at amax and
                    Q its 128-level quantisation (TensorRT's entropy calibration)
    -> {key: Ranges}: amax per tensor (symmetric int8: scale = amax / 127), min and max kept for inspection

One pass over the batches serves every graph, so a one-shot iterator is enough. NaN or infinite values
and an empty or mis-shaped batch are errors that name the batch, the tensor and what was expected.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .data import CalibrationError

METHODS = ("minmax", "entropy", "percentile")
PERCENTILE = 99.99
BINS = 2048
LEVELS = 128                  # int8 levels on one side of zero: what the entropy method quantises P to


@dataclass
class Ranges:
    """Per-tensor calibrated ranges of one graph."""
    method: str
    graph: str                    # file name of the graph the ranges belong to
    graph_sha256: str
    amax: dict = field(default_factory=dict)          # tensor -> the calibrated |x| range (> 0)
    seen: dict = field(default_factory=dict)          # tensor -> [min, max] seen
    batches: int = 0

    def scale(self, name: str) -> float:
        return self.amax[name] / 127.0

    def to_dict(self) -> dict:
        return {"method": self.method, "graph": self.graph, "graph_sha256": self.graph_sha256, "batches": self.batches,
                "amax": self.amax, "seen": self.seen}


def save(path: Path, results: dict) -> Path:
    """{key: Ranges} -> a JSON file."""
    Path(path).write_text(json.dumps({k: r.to_dict() for k, r in results.items()}, indent=1) + "\n")
    return Path(path)


def load(path: Path, graph_sha256: dict) -> dict:
    """A file written by save() -> {key: Ranges}; each key's ranges must have been collected on the graph whose
    sha256 graph_sha256[key] gives, else the ranges were made for another model."""
    out = {}
    for key, d in json.loads(Path(path).read_text()).items():
        want = graph_sha256.get(key)
        if want and d["graph_sha256"] != want:
            raise CalibrationError(f"{path}: {key}: ranges collected on {d['graph']} sha256 {d['graph_sha256']}, "
                                   f"expected sha256 {want}: made for another model; calibrate again")
        out[key] = Ranges(d["method"], d["graph"], d["graph_sha256"], d["amax"], d["seen"], d["batches"])
    return out


class _Stat:
    """Running min, max and (histogram methods) a histogram of |x| over [0, width * BINS)."""

    def __init__(self, histogram: bool):
        self.lo, self.hi, self.amax = math.inf, -math.inf, 0.0
        self.hist = np.zeros(BINS, np.int64) if histogram else None
        self.width = 0.0

    def add(self, x: np.ndarray):
        a = np.abs(x.ravel())
        top = float(a.max()) if a.size else 0.0
        self.lo, self.hi, self.amax = min(self.lo, float(x.min())), max(self.hi, float(x.max())), max(self.amax, top)
        if self.hist is None or top == 0.0:
            return
        if self.width == 0.0:
            self.width = top / BINS
        elif top >= self.width * BINS:                      # widen by a whole factor: old edges stay edges
            k = math.ceil(top / (self.width * BINS) + 1e-9)
            merged = np.add.reduceat(self.hist, np.arange(0, BINS, k))
            self.hist = np.zeros(BINS, np.int64)
            self.hist[:len(merged)] = merged
            self.width *= k
        idx = np.minimum((a / self.width).astype(np.int64), BINS - 1)
        self.hist += np.bincount(idx, minlength=BINS)

    def result(self, method: str) -> float:
        if method == "minmax" or self.hist is None or self.width == 0.0:
            return self.amax
        if method == "percentile":
            cdf = np.cumsum(self.hist) / self.hist.sum()
            return min(self.amax, float(np.searchsorted(cdf, PERCENTILE / 100.0) + 1) * self.width)
        return min(self.amax, entropy_threshold(self.hist) * self.width)


def entropy_threshold(hist: np.ndarray, levels: int = LEVELS, stride: int = 4) -> int:
    """The bin count i (levels <= i <= len(hist)) that loses least information, KL(P || Q): P is the histogram
    clipped at i bins (the bins beyond folded into the last one), Q the first i bins quantised to `levels` levels
    (each level's mass spread evenly over the bins where P is not empty). Q leaves the clipped mass out, so a
    threshold that clips much is penalised."""
    hist = hist.astype(np.float64)
    best, best_kl = len(hist), math.inf
    for i in range(levels, len(hist) + 1, stride):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        nonzero = p > 0
        edges = (np.arange(levels + 1) * i) // levels
        mass = np.add.reduceat(hist[:i], edges[:-1])
        count = np.add.reduceat(nonzero.astype(np.float64), edges[:-1])
        q = np.repeat(np.divide(mass, count, out=np.zeros_like(mass), where=count > 0), np.diff(edges)) * nonzero
        if (q[nonzero] == 0).any():                      # P has mass where Q has none: infinite divergence
            continue
        ps, qs = p[nonzero] / p.sum(), q[nonzero] / q.sum()
        kl = float(np.sum(ps * np.log(ps / qs)))
        if kl < best_kl:
            best, best_kl = i, kl
    return best


# ---- the graphs' inputs and the batches ----------------------------------------------------------------
def graph_inputs(model: onnx.ModelProto) -> dict:
    """input name -> (numpy dtype, dims with None for symbolic ones)."""
    inits = {t.name for t in model.graph.initializer}
    out = {}
    for v in model.graph.input:
        if v.name in inits:
            continue
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        out[v.name] = (np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)), dims)
    return out


def check_batch(k: int, batch, inputs: dict):
    """A batch must be {input name: array} with exactly the graph's inputs, their dtypes and static dims."""
    if not isinstance(batch, dict):
        raise CalibrationError(f"calibration batch {k}: expected a dict {{input name: array}}, found "
                               f"{type(batch).__name__}")
    if set(batch) != set(inputs):
        raise CalibrationError(f"calibration batch {k}: expected inputs {sorted(inputs)}, found {sorted(batch)}")
    for name, (dtype, dims) in inputs.items():
        a = batch[name]
        shape = list(getattr(a, "shape", []))
        ok = (isinstance(a, np.ndarray) and a.dtype == dtype and len(shape) == len(dims)
              and all(d is None or d == s for d, s in zip(dims, shape)))
        if not ok:
            want = "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
            found = f"{a.dtype} {shape}" if isinstance(a, np.ndarray) else type(a).__name__
            raise CalibrationError(f"calibration batch {k}: {name}: expected {dtype} {want}, found {found}")


def float_activations(model: onnx.ModelProto) -> list[str]:
    """Every float32 tensor a node computes from the inputs (not Constant outputs), and the float inputs: what
    a TensorRT calibration cache covers."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    consts = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    names = [n for node in model.graph.node for n in node.output if n not in consts]
    names += [n for n in graph_inputs(model)]
    return sorted({n for n in names if n and types.get(n) == onnx.TensorProto.FLOAT})


# ---- collection -------------------------------------------------------------------------------------------
def collect(graphs: dict, batches, method: str, session_options=None) -> dict:
    """graphs: {key: (ONNX path, [tensor names])}; batches: any iterable of {input name: array}, fed to every
    graph. -> {key: Ranges}."""
    import onnxruntime as ort

    from runtime.manifest import sha256
    if method not in METHODS:
        raise CalibrationError(f"calibration method: expected one of {list(METHODS)}, found {method!r}")
    sessions, stats, inputs = {}, {}, {}
    for key, (path, names) in graphs.items():
        path = Path(path)
        model = onnx.load(str(path), load_external_data=False)
        inputs[key] = graph_inputs(model)
        have = {o.name for o in model.graph.output}
        model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in have)
        # saved next to the original so that external weights resolve, then read by ORT once
        aug = path.with_name(f".{path.stem}.calib-{os.getpid()}.onnx")
        try:
            onnx.save(model, str(aug))
            so = session_options() if session_options else ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL   # tensors as named
            sessions[key] = (ort.InferenceSession(str(aug), so, providers=["CPUExecutionProvider"]), list(names))
        finally:
            aug.unlink(missing_ok=True)
        stats[key] = {n: _Stat(method != "minmax") for n in names}
    count = 0
    for k, batch in enumerate(batches):
        for key, (session, names) in sessions.items():
            check_batch(k, batch, inputs[key])
            for name, x in zip(names, session.run(names, batch)):
                if not np.isfinite(x).all():
                    raise CalibrationError(f"calibration batch {k}: tensor {name} of {Path(graphs[key][0]).name} "
                                           f"holds NaN or infinite values: expected finite activations")
                stats[key][name].add(x)
        count += 1
    if count == 0:
        want = {Path(p).name: sorted(inputs[k]) for k, (p, _) in graphs.items()}
        raise CalibrationError(f"calibration data: expected at least one batch with the inputs {want}, found none "
                               f"(an empty calibration set)")
    out = {}
    for key, (path, names) in graphs.items():
        r = Ranges(method, Path(path).name, sha256(Path(path)), batches=count)
        for n in names:
            s, amax = stats[key][n], stats[key][n].result(method)
            if not math.isfinite(amax):
                raise CalibrationError(f"{Path(path).name}: tensor {n}: the {method} range came out {amax}: "
                                       f"expected a finite range")
            r.amax[n], r.seen[n] = max(amax, 1e-8), [s.lo, s.hi]        # an all-zero tensor keeps a tiny scale
        out[key] = r
    return out
