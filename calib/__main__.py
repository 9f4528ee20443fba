"""python -m calib --artifacts DIR [--data DATA] [--method M] [--top N]: per-stage ranges and int8 errors.

    DIR's fp32 vision and head graphs --ranges on DATA (method M; default: what DIR was calibrated with)-->
        per quantized tensor: min, max, the amax on DATA, and the amax DIR recorded (checked to belong to
        these graphs: a ranges file made for another model is refused)
    the int8 graph (DIR's own where it is an int8 build, else a temporary one from DATA's ranges; DIR is not
    touched) and the fp32 graph run on DATA:
        cosine and max |int8 - fp32| / max |fp32| of the stage output and of every quantized MatMul's output
        (the worst N printed): where int8 loses accuracy, layer by layer

The head is fed the fp32 vision graph's features of DATA's clips and each clip's question.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

from . import data, qdq, ranges

STAGES = {"vision": "vision.onnx", "head": "head.onnx"}


class _Errors:
    """Running cosine and max error of tensors: int8 against fp32."""

    def __init__(self):
        self.dot, self.aa, self.bb, self.err, self.top = {}, {}, {}, {}, {}

    def add(self, name: str, ref: np.ndarray, out: np.ndarray):
        r, o = ref.astype(np.float64).ravel(), out.astype(np.float64).ravel()
        for d, v in ((self.dot, r @ o), (self.aa, r @ r), (self.bb, o @ o)):
            d[name] = d.get(name, 0.0) + float(v)
        self.err[name] = max(self.err.get(name, 0.0), float(np.abs(r - o).max()))
        self.top[name] = max(self.top.get(name, 0.0), float(np.abs(r).max()))

    def rows(self, names):
        for n in names:
            cos = self.dot[n] / max(np.sqrt(self.aa[n] * self.bb[n]), 1e-30)
            yield n, cos, self.err[n] / max(self.top[n], 1e-30)


def compare(fp32: Path, int8: Path, batches: list, names: list[str]) -> _Errors:
    """Run both graphs on every batch; compare `names` (tensors present in both)."""
    import onnxruntime as ort

    def session(path):
        m = onnx.load(str(path))
        have = {o.name for o in m.graph.output}
        m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in have)
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])

    a, b, errors = session(fp32), session(int8), _Errors()
    for batch in batches:
        for n, x, y in zip(names, a.run(names, batch), b.run(names, batch)):
            errors.add(n, x, y)
    return errors


def inspect(root: Path, data_path, method: str | None, top: int, log=print) -> dict:
    from runtime.manifest import read_manifest
    m = read_manifest(root)
    cal = m["build"].get("calibration", {})
    method = method or cal.get("method", "percentile").split()[0]
    clips = data.clips(data_path)
    pre, chunk = data.Preprocess.of(m), m["runtime"]["frame_chunk"]
    log(f"[calib] {root}: {len(clips)} clips of {data_path or data.DEFAULT_DATA} (sha256 {data.data_sha256(clips)[:12]}), "
        f"method {method}; recorded: {cal.get('method', 'none')} on data sha256 "
        f"{cal.get('data', {}).get('sha256', 'none')[:12]}")
    vision_batches = list(data.vision_batches(clips, pre, chunk))
    batches = {"vision": vision_batches, "head": _head_batches(root, m, clips, pre, chunk)}
    summary = {}
    with tempfile.TemporaryDirectory() as tmp:
        for stage, graph in STAGES.items():
            src = root / graph
            names = qdq.quantized_inputs(onnx.load(str(src), load_external_data=False))
            got = ranges.collect({stage: (src, names)}, batches[stage], method)[stage]
            recorded = _recorded(root, m, stage, graph)
            log(f"\n[{stage}] {graph}: {len(batches[stage])} batches, {len(names)} quantized inputs")
            log("| tensor | min | max | amax (this data) | amax (recorded) |\n|---|---|---|---|---|")
            for n in names:
                rec = f"{recorded.amax[n]:.4g}" if recorded and n in recorded.amax else "-"
                log(f"| {n} | {got.seen[n][0]:.4g} | {got.seen[n][1]:.4g} | {got.amax[n]:.4g} | {rec} |")
            own = _int8_file(m, stage)
            int8 = root / own if own else qdq.insert_qdq(src, Path(tmp) / f"{stage}.int8.onnx", got)
            model = onnx.load(str(src), load_external_data=False)
            outputs = [o.name for o in model.graph.output]
            matmuls = [n.output[0] for n in qdq.weight_matmuls(model)]
            errors = compare(src, int8, batches[stage], outputs + matmuls)
            rows = list(errors.rows(outputs))
            worst = sorted(errors.rows(matmuls), key=lambda r: r[1])[:top]
            log(f"\n{own or 'int8 from these ranges'} vs {graph} on this data (cosine, max |err| / max |fp32|):\n"
                f"| tensor | cosine | max rel err |\n|---|---|---|")
            for n, cos, rel in rows + worst:
                log(f"| {n}{' (stage output)' if n in outputs else ''} | {cos:.6f} | {rel:.2e} |")
            summary[stage] = {"cosine": rows[0][1], "max_rel_err": rows[0][2]}
    return summary


def _int8_file(m: dict, stage: str) -> str | None:
    """The stage's ort-cpu int8 graph in the manifest, if any."""
    return next((v["file"] for v in m["stages"][stage]["variants"]
                 if v["precision"] == "int8" and v["backend"] == "ort-cpu"), None)


def _recorded(root: Path, m: dict, stage: str, graph: str):
    """The ranges DIR recorded for `graph` (refused when made for another graph), or None."""
    rec = next((v["calibration"] for v in m["stages"][stage]["variants"] if "calibration" in v), None)
    if rec is None:
        return None
    return ranges.load(root / rec["ranges"], {stage: m["files"][graph]}).get(stage)


def _head_batches(root: Path, m: dict, clips, pre, chunk) -> list:
    import onnxruntime as ort

    from runtime.text import QFormerTokenizer
    vision = ort.InferenceSession(str(root / STAGES["vision"]), providers=["CPUExecutionProvider"])
    tok = QFormerTokenizer(root / m["tokenizers"]["qformer"], m["tokenizers"]["qformer_max_length"])
    return list(data.head_batches(clips, pre, chunk, lambda px: vision.run(None, {"pixel_values": px})[0], tok))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m calib", description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", required=True, help="directory written by python -m export.build")
    ap.add_argument("--data", default=None, help="calibration clips (default: the clips shipped with the default model)")
    ap.add_argument("--method", choices=ranges.METHODS, default=None, help="default: the artifacts' own")
    ap.add_argument("--top", type=int, default=8, help="worst quantized MatMul outputs to print per stage")
    a = ap.parse_args(argv)
    from runtime.manifest import ManifestError
    try:
        inspect(Path(a.artifacts), a.data, a.method, a.top)
    except (data.CalibrationError, ManifestError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
