"""TensorRT engines on a GPU: the plan's engines build (plugin library loaded), run through the
TensorRT backend, match ONNX Runtime per stage (fp32 tight, fp16 loose), and drive the pipeline end to
end to the same greedy answers. Marked gpu; skipped with the reason where there is no CUDA device or
no TensorRT (the development and CI machines have neither)."""
import numpy as np
import pytest

import llamavid_ref
from export import build as build_mod
from export import trt
from runtime.manifest import read_manifest
from kernels.cuda_available import cuda_available
from llamavid_ref.tiny import tiny_model
from runtime.backends.ort import OrtBackend


def _missing() -> str | None:
    ok, reason = cuda_available()
    if not ok:
        return reason
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "tensorrt not installed"
    return None


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_missing() is not None, reason=str(_missing()))]

QUESTIONS = ["what color is the square ?", "how many shapes are there ?"]


@pytest.fixture(scope="module", params=["fp32", "fp16"])
def built(request, tmp_path_factory):
    """(artifacts, plan) of a tiny model with both engines built and recorded in the manifest."""
    root = tmp_path_factory.mktemp(f"trt_{request.param}")
    ckpt = llamavid_ref.save(tiny_model(root / "src", seed=5), root / "ckpt")
    art = build_mod.build(ckpt, "fp32", root / "art", "ort", log=lambda *_: None)
    plan = trt.make_plan(art, precision=request.param)
    assert all(c.ok for c in trt.check_plan(plan)), trt.describe(plan, trt.check_plan(plan))
    trt.record_engines(plan, trt.build_engines(plan))
    return art, plan


@pytest.fixture(scope="module")
def backend():
    from runtime.backends.tensorrt import TensorrtBackend
    return TensorrtBackend()


def stage_inputs(manifest, stage, frames, text, rng):
    """Random inputs of the manifest's shapes (ids inside the tiny Q-Former vocab and positions)."""
    out = {}
    for name, t in manifest["stages"][stage]["inputs"].items():
        shape = [{"frames": frames, "text": text}.get(d, d) for d in t["shape"]]
        out[name] = (rng.integers(0, 30, shape) if name == "qformer_ids" else np.ones(shape, np.int64)
                     if name == "qformer_mask" else rng.standard_normal(shape).astype(np.float32))
    return out


def relative_error(got, want):
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-6))


def test_engines_match_onnxruntime_per_stage(built, backend):
    art, plan = built
    m = read_manifest(art)
    ort = {"vision": "vision.onnx", "head": "head.onnx"}
    bound = 1e-4 if plan.stages[0].precision == "fp32" else 3e-2      # fp16 bound: a first guess, unmeasured
    rng = np.random.default_rng(0)
    for sp in plan.stages:
        engine = backend.open_stage(art / sp.engine, io=m["stages"][sp.stage])
        reference = OrtBackend("ort-cpu").open_stage(art / ort[sp.stage])
        for frames, text in ((1, 2), (3, 9), (64, 32)):            # profile min side, typical, profile max frames
            feeds = stage_inputs(m, sp.stage, frames, text, rng)
            name = next(iter(m["stages"][sp.stage]["outputs"]))
            got, want = engine.infer(feeds)[name], reference.infer(feeds)[name]
            assert got.shape == want.shape
            assert relative_error(got, want) < bound, (sp.stage, frames, text)


def test_outside_the_profile_is_a_clear_error(built, backend):
    art, plan = built
    m = read_manifest(art)
    stage = backend.open_stage(art / plan.stages[0].engine, io=m["stages"]["vision"])
    with pytest.raises(ValueError, match=r"pixel_values \[65, 3, 28, 28\] is outside the engine's optimisation profile"):
        stage.infer(stage_inputs(m, "vision", 65, 1, np.random.default_rng(1)))


def test_engine_checked_against_the_manifest(built, backend):
    art, plan = built
    m = read_manifest(art)
    with pytest.raises(ValueError, match="the engine does not match the manifest: inputs"):
        backend.open_stage(art / plan.stages[1].engine, io=m["stages"]["vision"])
    with pytest.raises(ValueError, match="runs serialized engines, this is an ONNX graph"):
        backend.open_stage(art / "head_trt.onnx")


def test_pipeline_end_to_end_on_tensorrt_stages(built, backend):
    """The ORT pipeline with its vision and head stages swapped for the engines gives the same answers."""
    from runtime.pipeline import Pipeline
    art, plan = built
    if plan.stages[0].precision != "fp32":
        pytest.skip("greedy answers are compared at fp32 only")
    ort_pipe = Pipeline.open(art, backend="ort-cpu")
    trt_pipe = Pipeline.open(art, backend="ort-cpu")
    for sp in plan.stages:
        trt_pipe.stages[sp.stage] = backend.open_stage(art / sp.engine, io=trt_pipe.manifest["stages"][sp.stage])
    video = np.random.default_rng(2).standard_normal((5, 3, 28, 28)).astype(np.float32)
    for q in QUESTIONS:
        assert trt_pipe.ask(video, q, max_new_tokens=12) == ort_pipe.ask(video, q, max_new_tokens=12)
