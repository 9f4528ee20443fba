"""Training: examples match the inference prompt, stages freeze the right parts, loss goes down,
resume continues, and evaluation scores known answers correctly."""
import pytest
import torch

from llamavid_ref import train as T
from llamavid_ref.evaluate import normalise, score
from llamavid_ref.templates import question_prompt
from llamavid_ref.tiny import tiny_model


@pytest.fixture()
def model(tmp_path):
    return tiny_model(tmp_path, seed=4)


def examples(model, n=4):
    g = torch.Generator().manual_seed(0)
    qa = [("what color is the square ?", "red"), ("how many shapes are there ?", "blue"),
          ("which circle moves left ?", "green"), ("what color is the triangle ?", "right")]
    return [T.build_example(model, [("human", "<image>\n" + q), ("gpt", a)], torch.randn(3, 3, 28, 28, generator=g))
            for q, a in qa[:n]]


def test_example_prompt_equals_inference_prompt_and_labels_only_the_answer(model):
    q = "what color is the square ?"
    e = T.build_example(model, [("human", "<image>\n" + q), ("gpt", "red")], torch.zeros(1, 3, 28, 28))
    prompt_ids = model.tokenizer.encode_prompt(question_prompt(q))
    answer = model.tokenizer.encode(" red") + [model.config.llm.eos_id]
    assert e.input_ids == prompt_ids + answer
    assert e.labels == [T.IGNORE] * len(prompt_ids) + answer
    assert e.prompt == q


def test_multi_turn_labels_cover_every_answer(model):
    turns = [("human", "<image>\nwhat color ?"), ("gpt", "red"), ("human", "how many ?"), ("gpt", "blue")]
    e = T.build_example(model, turns, torch.zeros(1, 3, 28, 28))
    supervised = [t for t in e.labels if t != T.IGNORE]
    eos = model.config.llm.eos_id
    assert supervised == model.tokenizer.encode(" red") + [eos] + model.tokenizer.encode(" blue") + [eos]


@pytest.mark.parametrize("stage,trainable,frozen", [
    (0, ["vision.blocks.0.mlp.fc1.weight", "llm.norm.weight", "head.query"], []),
    (1, ["head.mm_projector.0.weight", "head.key_projector.weight", "head.att_projector.bias"],
     ["head.query", "head.ln.weight", "head.qformer.word_embeddings.weight", "llm.norm.weight", "vision.pos_embed"]),
    (2, ["head.query", "head.qformer.layers.0.ffn.up.weight", "llm.lm_head.weight"], ["vision.pos_embed", "vision.blocks.1.norm1.weight"]),
    (3, ["llm.layers.0.self_attn.q_proj.weight", "head.mm_projector.2.bias"],
     ["head.key_projector.weight", "head.val_projector.weight", "head.qformer.LayerNorm.weight", "vision.cls_token"]),
])
def test_stage_freezing(model, stage, trainable, frozen):
    T.stage_parameters(model, stage)
    params = dict(model.named_parameters())
    assert all(params[n].requires_grad for n in trainable)
    assert not any(params[n].requires_grad for n in frozen)


def test_trainable_prefixes_override_the_stage(model):
    T.stage_parameters(model, 2, ("llm.",))
    params = dict(model.named_parameters())
    assert params["llm.lm_head.weight"].requires_grad
    assert not params["head.query"].requires_grad and not params["vision.pos_embed"].requires_grad


def test_frozen_vision_runs_once_per_clip_and_gives_the_same_loss(model, tmp_path):
    ex = examples(model) * 3                   # 4 clips, each seen 3 times per epoch
    calls = []
    model.vision.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    with torch.no_grad():
        plain = float(T.batch_loss(model, ex))
    model.vision_cache = {}
    with torch.no_grad():
        cached = [float(T.batch_loss(model, ex)) for _ in range(2)]
    assert cached == [pytest.approx(plain, rel=1e-6)] * 2
    assert len(calls) == 4 + 4                 # uncached: 4 distinct tensors; cached: once each, then never
    model.vision_cache, calls[:] = None, []
    T.train(model, ex, 2, tmp_path / "run", lr=1e-3, batch_size=4, epochs=2)
    assert len(calls) == 4 and model.vision_cache is None


def test_warmup_then_cosine():
    assert T.lr_at(0, 100, 1.0, 0.03) == pytest.approx(1 / 3)
    assert T.lr_at(2, 100, 1.0, 0.03) == pytest.approx(1.0)
    assert T.lr_at(51, 100, 1.0, 0.03) == pytest.approx(0.5, abs=0.02)
    assert T.lr_at(99, 100, 1.0, 0.03) < 0.01


def test_a_few_steps_reduce_the_loss_and_resume_continues(model, tmp_path, capsys):
    ex = examples(model)
    with torch.no_grad():
        before = float(T.batch_loss(model, ex))
    T.train(model, ex, 0, tmp_path / "run", lr=3e-3, batch_size=4, epochs=12, warmup=0.1, save_every=6)
    with torch.no_grad():
        after = float(T.batch_loss(model, ex))
    assert after < 0.5 * before, (before, after)
    state = torch.load(tmp_path / "run/checkpoint-last/trainer_state.pt", weights_only=True)
    assert state["step"] == 12
    T.train(model, ex, 0, tmp_path / "run", lr=3e-3, batch_size=4, epochs=16, warmup=0.1, resume=True)
    out = capsys.readouterr().out
    assert "resumed stage 0 at step 12/16" in out and "step 16/16" in out


def test_bf16_autocast_step_runs(model, tmp_path):
    T.train(model, examples(model, 2), 2, tmp_path / "bf", lr=1e-3, batch_size=2, epochs=1, bf16=True)


def test_too_long_example_is_an_error(model, tmp_path):
    with pytest.raises(ValueError, match="exceed max_tokens=10 text tokens"):
        T.train(model, examples(model, 1), 0, tmp_path, lr=1e-3, batch_size=1, max_tokens=10)


def test_evaluation_normalises_and_scores_known_answers():
    assert normalise(" Two.") == "2" and normalise("The Red") == "red" and normalise("left!") == "left"
    r = score([("color", "Red.", "red"), ("color", "blue", "red"), ("count", "three", "3"), ("count", "3", "4")])
    assert r["per_type"] == {"color": 0.5, "count": 0.5} and r["overall"] == 0.5 and r["n"] == 4


def test_cli_stage3_on_llava_json_with_rope_scaling(model, tmp_path, capsys):
    """python -m llamavid_ref.train on a synthetic-world JSON: stage 3 with linear RoPE scaling."""
    import llamavid_ref
    from llamavid_ref.data import world
    world.generate(tmp_path / "w", {"train": 4}, seed=1, workers=1, log=lambda *_: None)
    llamavid_ref.save(model, tmp_path / "init")
    T.main(["--stage", "3", "--init", str(tmp_path / "init"), "--data", str(tmp_path / "w/train.json"),
            "--out", str(tmp_path / "out"), "--batch-size", "2", "--lr", "1e-3", "--rope-scaling", "4"])
    assert "step 2/2" in capsys.readouterr().out
    trained = llamavid_ref.load(tmp_path / "out/final")
    assert trained.config.llm.rope_scaling == 4.0 and trained.config.llm.max_positions == 4 * 512
    # stage 3 leaves the vision encoder and the vlm_att modules untouched
    assert torch.equal(trained.vision.pos_embed, model.vision.pos_embed)
    assert torch.equal(trained.head.key_projector.weight, model.head.key_projector.weight)
    assert not torch.equal(trained.llm.norm.weight, model.llm.norm.weight)
