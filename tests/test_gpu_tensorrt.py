"""TensorRT engines on a GPU: the plan's engines build (plugin library loaded) and run on the core's C++ TensorRT
backend (runtime/csrc/backends/tensorrt.cpp) in place of the vision and head ONNX stages; the logits after a video
prompt match ONNX Runtime's (fp32 tight, fp16 loose), greedy answers are the same at fp32, and a question longer
than the engine's profile is a clear error naming the tensor. Marked gpu; skipped with the reason where there is
no CUDA device, no TensorRT Python bindings (to build the engines) or no built backend library (the development
and CI machines, and the lent H200, have no TensorRT). The backend's logic runs on fake TensorRT in
tests/test_c_backends.py."""
import numpy as np
import pytest

import llamavid_ref
from export import build as build_mod
from export import trt
from kernels.cuda_available import cuda_available
from llamavid_ref.tiny import tiny_model
from runtime.backends.tensorrt import backend_missing
from runtime.pipeline import Pipeline


def _missing() -> str | None:
    ok, reason = cuda_available()
    if not ok:
        return reason
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "tensorrt (the Python bindings, to build the engines) not installed"
    return backend_missing()


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


def prompt_logits(pipe, video, question, qformer=None):
    """The logits after the first question about `video` (qformer: other Q-Former ids [1,L])."""
    m = pipe.manifest["prompt"]
    ids = np.asarray(pipe.encode_prompt(pipe.prompt_text([(0, m["media_prefix"] + question), (1, None)])), np.int32)
    q_ids, q_mask = pipe.qformer_tokenizer([question]) if qformer is None else (qformer, np.ones_like(qformer))
    with pipe.session(len(ids) + len(video) * pipe.info["tokens_per_frame"] + 1) as s:
        s.prompt(ids, video, q_ids, q_mask)
        return np.frombuffer(s.logits(), np.float32).copy()


def test_engines_match_onnxruntime_on_the_prompt_logits(built):
    art, plan = built
    precision = plan.stages[0].precision
    engines, ort = Pipeline.open(art), Pipeline.open(art, backend="ort-cpu")
    for stage in ("vision", "head"):
        assert engines.core.stage(stage) == f"{stage}.{precision}.engine {precision} on tensorrt"
    bound = 1e-4 if precision == "fp32" else 3e-2      # fp16 bound: a first guess, unmeasured
    rng = np.random.default_rng(0)
    for frames in (1, 3, 64, 65):                       # profile min, typical, profile max, two chunks
        video = rng.standard_normal((frames, 3, 28, 28)).astype(np.float32)
        got, want = prompt_logits(engines, video, QUESTIONS[0]), prompt_logits(ort, video, QUESTIONS[0])
        assert float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-6)) < bound, frames


def test_a_question_outside_the_profile_is_a_clear_error(built):
    art, plan = built
    engines = Pipeline.open(art)
    video = np.zeros((2, 3, 28, 28), np.float32)
    with pytest.raises(RuntimeError, match=r"stage head \(head\..*engine .* on tensorrt\): input qformer_ids \[1,300\] "
                                           r"is outside the engine's optimisation profile \(min \[1,1\], opt .*\)"):
        prompt_logits(engines, video, QUESTIONS[0], qformer=np.full((1, 300), 5, np.int64))
    assert prompt_logits(engines, video, QUESTIONS[0]).shape == (engines.info["vocab_size"],)   # the session is reused


def test_pipeline_end_to_end_on_tensorrt_stages(built):
    """The pipeline with its vision and head stages on the engines gives the ONNX Runtime pipeline's answers."""
    art, plan = built
    if plan.stages[0].precision != "fp32":
        pytest.skip("greedy answers are compared at fp32 only")
    engines, ort = Pipeline.open(art), Pipeline.open(art, backend="ort-cpu")
    video = np.random.default_rng(2).standard_normal((5, 3, 28, 28)).astype(np.float32)
    for q in QUESTIONS:
        assert engines.ask(video, q, max_new_tokens=12) == ort.ask(video, q, max_new_tokens=12)
