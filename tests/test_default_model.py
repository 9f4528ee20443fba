"""The shipped default model: it loads, stays within its size budget, answers its sample clip (the
answer is the synthetic world's ground truth), and its exported pipeline gives the same answer; the
TensorRT build plan for its artifacts passes every CPU check."""
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


def test_exported_default_model_answers_the_same(artifacts):
    from runtime.pipeline import Pipeline
    pipeline = Pipeline.open(artifacts)
    assert pipeline.ask(DEFAULT_MODEL_DIR / SAMPLE["video"], SAMPLE["question"], max_new_tokens=8) == SAMPLE["answer"]


def test_tensorrt_plan_checks_pass_for_the_default_model(artifacts):
    from export import trt
    plan = trt.make_plan(artifacts)
    failed = {(c.stage, c.name): c.message for c in trt.check_plan(plan) if not c.ok}
    assert failed == {}
