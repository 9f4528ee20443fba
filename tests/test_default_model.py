"""The shipped default model: it loads, stays within its size budget, answers its sample clip and
fresh test-split clips of every question type (answers are the synthetic world's ground truth), and
its exported pipeline gives the same answer; the TensorRT build plan for its artifacts passes every
CPU check."""
import json

import pytest

import llamavid_ref
from llamavid_ref.checkpoint import DEFAULT_MODEL_DIR

SAMPLE = json.loads((DEFAULT_MODEL_DIR / "sample.json").read_text())


@pytest.fixture(scope="module")
def model():
    return llamavid_ref.load()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    from export.build import main as build
    out = tmp_path_factory.mktemp("default-art")
    build(["--precision", "fp32", "--out", str(out)])
    return out


def test_default_model_is_the_default_preset_and_small(model):
    size = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.iterdir())
    assert size < 20 * 2 ** 20
    assert model.config.tokens_per_frame == 2 and model.config.vision.image_size == 64
    assert sum(p.numel() for p in model.parameters()) < 5e6


def test_default_model_answers_its_sample_clip(model):
    answer = model.ask(DEFAULT_MODEL_DIR / SAMPLE["video"], SAMPLE["question"], max_new_tokens=8)
    assert answer == SAMPLE["answer"]


def test_default_model_answers_fresh_test_clips(model, tmp_path):
    """24 test-split clips (4 per question type, never in training) written as H.264 and read back:
    at least 20 right (the full 300-clip test split scores are in docs/BENCHMARKS.md)."""
    from llamavid_ref.data import world
    from llamavid_ref.evaluate import greedy, predict, score
    world.generate(tmp_path, {"test": 24}, seed=0, log=lambda *_: None)
    entries = json.loads((tmp_path / "test.json").read_text())
    result = score(predict(greedy(model), entries, tmp_path))
    assert result["n_per_type"] == {q: 4 for q in world.QTYPES}
    assert result["overall"] * 24 >= 20, result


def test_exported_default_model_answers_the_same(artifacts):
    from runtime.pipeline import Pipeline
    pipeline = Pipeline.open(artifacts)
    assert pipeline.ask(DEFAULT_MODEL_DIR / SAMPLE["video"], SAMPLE["question"], max_new_tokens=8) == SAMPLE["answer"]


def test_tensorrt_plan_checks_pass_for_the_default_model(artifacts):
    from export import trt
    plan = trt.make_plan(artifacts)
    failed = {(c.stage, c.name): c.message for c in trt.check_plan(plan) if not c.ok}
    assert failed == {}
