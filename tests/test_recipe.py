"""The default-model recipe's targets: what a frame shows, from the world's geometry."""
import pytest
import torch

from llamavid_ref.data.world import Sprite
from llamavid_ref.recipe import N_OBJECTS, frame_truth, object_class


def test_frame_truth_from_geometry():
    square = Sprite("square", "green", x=32, y=32)                 # covers x, y in 27..37
    circle = Sprite("circle", "red", x=12, y=52, motion="right", t_on=2.5)
    early, late = (frame_truth([square, circle], t, image=64, patch=8) for t in (0.0, 3.0))

    # the square covers at least a quarter of the 4 patches around the frame centre (8 px patches)
    assert early.labels.nonzero().flatten().tolist() == [27, 28, 35, 36]
    assert set(early.labels.tolist()) == {0, object_class(square)}
    assert early.centres[27].tolist() == [0.5, 0.5] and early.centres[0].tolist() == [0.0, 0.0]
    assert early.count == 1 and early.visible.nonzero().flatten().tolist() == [object_class(square) - 1]

    # at t = 3 s the circle is in view, centred at (12 + 3 * 3, 52) = (21, 52)
    assert late.count == 2 and late.visible.sum() == 2 and late.visible.shape == (N_OBJECTS,)
    on_circle = late.labels == object_class(circle)
    assert on_circle.any()
    assert late.centres[on_circle] == pytest.approx(torch.tensor([[21 / 64, 52 / 64]]).expand(int(on_circle.sum()), 2))


@pytest.mark.parametrize("tokens, compress, steps", [("both", "mean", 60), ("content", "grid:2", 2), ("context", "mean", 2)])
def test_grounding_runs_for_every_head_ablation(tokens, compress, steps, capsys):
    """Stage 1 on 4 clips (random vision): ablations without a token skip its targets; with the scene
    and the named-object targets together the loss falls within 60 steps."""
    from llamavid_ref.config import from_name
    from llamavid_ref.data import world
    from llamavid_ref.model import LlamaVid
    from llamavid_ref.recipe import ground_tokens
    from llamavid_ref.tiny import random_init, write_tokenizers
    from llamavid_ref.tokenizer import QFormerTokenizer
    import tempfile
    from pathlib import Path
    cfg = from_name("default")
    cfg.head.tokens, cfg.head.compress_type = tokens, compress
    model = random_init(LlamaVid(cfg), 0, std=0.02)
    with tempfile.TemporaryDirectory() as d:
        _, vocab = write_tokenizers(Path(d), cfg.llm.vocab_size, cfg.qformer.vocab_size)
        model.qformer_tokenizer = QFormerTokenizer(vocab, cfg.qformer.max_text_len)
    clips = world.make_split("train", 4, seed=0)
    frames = {c.video: model.load_media(world.render(c.sprites)[::world.SOURCE_FPS]) for c in clips}
    accuracy = ground_tokens(model, frames, clips, steps=steps, lr=3e-3, batch=8, seed=0)
    losses = [float(line.split("loss ")[1].split()[0]) for line in capsys.readouterr().out.splitlines()]
    assert 0 <= accuracy <= 1 and all(x == x for x in losses)
    if steps > 2:
        assert losses[-1] < 0.8 * losses[0], losses


def test_recipe_end_to_end_on_a_few_clips(tmp_path):
    """The whole command on 12 training clips with a few steps per stage: it writes a loadable model,
    scores each evaluation split on its own clips, records the minutes of every step and stage 1's
    readouts on val."""
    import json

    import llamavid_ref
    from llamavid_ref import recipe
    out = tmp_path / "model"
    recipe.main(["--work", str(tmp_path / "work"), "--out", str(out), "--train-clips", "12", "--eval-clips", "6",
                 "--stage0-steps", "2", "--stage0-batch", "4", "--stage1-steps", "2", "--stage1-batch", "4",
                 "--stage2-epochs", "0.5", "--motion-warmup", "2", "--batch-size", "4"])
    record = json.loads((out / "recipe.json").read_text())
    assert [record["results"][s]["n"] for s in ("val", "test")] == [6, 6]
    assert list(record["minutes_per_step"]) == ["data", "stage 0", "stage 1", "stage 2", "evaluation"]
    assert record["args"]["train_clips"] == 12
    found = record["stage1_readouts_val"]          # 6 val clips: one question of each type
    assert sorted(found) == ["named object: colour", "named object: direction, per question", "named object: in view",
                             "scene: how many", "scene: objects in view"]
    assert all(0 <= v <= 1 for v in found.values())
    model = llamavid_ref.load(out)
    assert model.config.llm.hidden == 128 and model.tokenizer.encode("red") != []


def test_recipe_rejects_a_vocabulary_smaller_than_the_bpe_alphabet(tmp_path):
    from llamavid_ref.recipe import build_tokenizers
    with pytest.raises(ValueError, match=r"LLM's vocabulary \(128\) must hold .* found 2\d\d tokens"):
        build_tokenizers(["a red square moves left."], tmp_path, llm_vocab=128, qformer_vocab=64)
