"""python -m kernels.bench on CPU, and the TensorRT head's plugin-or-standard-ops choice it feeds.

Here (no GPU) the bench says so and exits 0; its standard-op ONNX graph (what a TensorRT engine of
the standard ops runs) computes the op, checked with ONNX Runtime against the float64 reference;
export/trt.py picks the plugin or the standard-op head from the bench's figures at the model's shape
and precision, and records why.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from export import trt
from kernels import bench
from llamavid_ref.config import from_name
from test_context_attention_kernel import FP32_TOL, frame_error, random_inputs, reference
from test_trt_plan import RELEASED, head_plan, manifest_for

REPO = Path(__file__).resolve().parent.parent


def test_without_a_gpu_it_says_so_and_exits_0():
    result = subprocess.run([sys.executable, "-m", "kernels.bench"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "no GPU to measure on" in result.stdout and "nothing measured" in result.stdout


def test_unknown_dtype_is_refused():
    assert bench.main(["--dtypes", "fp8"]) == 2


def test_standard_op_graph_computes_the_op():
    import onnxruntime as ort
    frames, patches = 2, 40
    model = bench.standard_op_graph(frames, patches, "fp32", bench.CHANNELS ** -0.5)
    queries, feats = random_inputs(np.random.default_rng(0), frames, bench.QUERIES, patches, bench.CHANNELS)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"queries": queries, "patches": feats})
    assert out.shape == (frames, 1, bench.CHANNELS)
    assert frame_error(out, reference(queries, feats, bench.CHANNELS ** -0.5), feats) <= FP32_TOL


def bench_rows(kernel_ms: float, eager_ms: float, dtype="fp16", patches=256, frames=(64, 3600)) -> dict:
    return {"device": "NVIDIA H200", "date": "2026-01-01",
            "rows": [{"frames": f, "patches": patches, "dtype": dtype, "queries": 32, "channels": 1408,
                      "algorithm": "tensor cores", "kernel_ms": kernel_ms * f / 64, "eager_ms": eager_ms * f / 64,
                      "sdpa_ms": 10 * eager_ms * f / 64} for f in frames]}


@pytest.mark.parametrize("kernel_ms,form", [(0.05, "plugin"), (0.5, "standard")])
def test_choice_follows_the_measurement(kernel_ms, form):
    choice = trt.choose_context_attention(bench_rows(kernel_ms, 0.17), "fp16", 64, 32, 256, 1408)
    assert choice["form"] == form and choice["standard"] == "eager" and choice["frames"] == 64
    assert "NVIDIA H200" in choice["reason"] and f"kernel {kernel_ms:.3f} ms vs eager 0.170 ms" in choice["reason"]


def test_choice_takes_the_nearest_frame_count_the_precisions_type_and_the_fastest_standard_op():
    rows = bench_rows(0.05, 0.17)
    rows["rows"][1].update(kernel_ms=5.0, eager_ms=3.0)               # at 3600 frames the kernel loses
    assert trt.choose_context_attention(rows, "fp16", 64, 32, 256, 1408)["form"] == "plugin"
    assert trt.choose_context_attention(rows, "fp16", 3000, 32, 256, 1408)["form"] == "standard"
    assert trt.choose_context_attention(rows, "int8", 64, 32, 256, 1408)["form"] == "plugin"   # attention in fp16
    rows["rows"][0]["trt_standard_ms"] = 0.01                         # a TensorRT engine of the standard ops wins
    choice = trt.choose_context_attention(rows, "fp16", 64, 32, 256, 1408)
    assert (choice["form"], choice["standard"]) == ("standard", "trt_standard")


def test_no_figures_at_the_shape_keep_the_plugin_and_say_so():
    choice = trt.choose_context_attention(bench_rows(0.5, 0.17), "fp32", 64, 32, 256, 1408)
    assert choice["form"] == "plugin" and "no kernels.bench figures at Q=32 N=256 C=1408 fp32" in choice["reason"]
    assert trt.choose_context_attention(None, "fp16", 64, 32, 576, 1408)["form"] == "plugin"


def test_plan_builds_the_head_from_the_chosen_form_and_records_it(tmp_path):
    """The released 224 px shapes (N = 256): slower kernel -> head.onnx without the plugin; faster
    -> head_trt.onnx with it; either way the engine's manifest entry says what was chosen and why."""
    manifest = manifest_for(from_name(RELEASED))
    path = tmp_path / "bench.json"
    for kernel_ms, onnx, plugins in [(0.5, "head.onnx", ()), (0.05, "head_trt.onnx", ("ContextAttention",))]:
        path.write_text(json.dumps(bench_rows(kernel_ms, 0.17)))
        sp = head_plan(trt.make_plan(tmp_path, manifest, kernel_bench=path))
        assert sp.onnx == onnx and tuple(p.name for p in sp.plugins) == plugins
        recorded = trt.engine_variants(trt.EnginePlan(str(tmp_path), [sp], {}), {})["head"]["context_attention"]
        assert recorded["form"] == ("plugin" if plugins else "standard") and "NVIDIA H200" in recorded["reason"]
    forced = head_plan(trt.make_plan(tmp_path, manifest, kernel_bench=path, context_attention="standard"))
    assert forced.onnx == "head.onnx" and forced.context_attention["reason"] == "--context-attention standard"
    with pytest.raises(trt.PlanError, match="expected one of"):
        trt.make_plan(tmp_path, manifest, context_attention="fastest")


@pytest.mark.parametrize("precision,onnx", [("fp16", "head_trt.onnx"), ("int8", "head_trt.onnx"),
                                            ("fp32", "head.onnx")])
def test_the_shipped_h200_figures_pick_the_plugin_in_16_bit_and_standard_ops_in_fp32(tmp_path, precision, onnx):
    """kernels/context_attention/measured.json (the run in docs/BENCHMARKS.md), the released 224 px
    head: the tensor-core kernel beats the fastest standard op at 64 frames; the fp32 CUDA-core
    kernel does not (0.11x), so fp32 engines build the head from standard ops."""
    manifest = manifest_for(from_name(RELEASED), precision)
    sp = head_plan(trt.make_plan(tmp_path, manifest))
    assert sp.onnx == onnx and sp.context_attention["device"] == "NVIDIA H200"
