"""Loader round trips (released layout -> project format -> identical outputs) and a clear error for
each kind of bad checkpoint."""
import json
import pickle
import shutil

import pytest
import torch

import llamavid_ref
from llamavid_ref import CheckpointError
from llamavid_ref.config import VisionConfig, from_name
from llamavid_ref.convert import main as convert_main
from llamavid_ref.tiny import tiny_model, write_released


def load(path, **kw):
    """The tiny preset's head counts (4 and 3) are not the released defaults (16 and 12)."""
    return llamavid_ref.load(path, **{"vision_heads": 4, "qformer_heads": 3, **kw})


def outputs(model):
    """encode_frames and full forward logits on fixed inputs."""
    g = torch.Generator().manual_seed(7)
    px = torch.randn(3, 3, 28, 28, generator=g)
    ids = torch.tensor([[1, 5, 6, -200, 7, 8]])
    with torch.no_grad():
        return model.encode_frames(px, torch.tensor([[2, 9, 10, 3]])), model(ids, [px], ["what color is the square"])


def assert_same(a, b, rtol=1e-5):
    for x, y in zip(outputs(a), outputs(b)):
        assert x.shape == y.shape
        err = float((x - y).abs().max() / y.abs().max())
        assert err < rtol


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("src"), seed=11)


@pytest.fixture()
def released(source, tmp_path):
    return write_released(source, tmp_path / "llama-vid-tiny")


def test_released_layout_loads_and_reproduces(source, released):
    assert len(list(released.glob("pytorch_model-*.bin"))) == 2
    model = load(released)
    assert model.config.vision.depth == source.config.vision.depth      # 40th-block rule: file has depth+1
    assert_same(model, source)


def test_vision_copy_inside_checkpoint_is_used_when_file_absent(source, tmp_path):
    root = write_released(source, tmp_path / "copy", with_vision_copy=True)
    assert not (root / "model_zoo").exists()
    assert_same(load(root), source)


def test_fp16_release_loads_into_fp32(source, tmp_path):
    root = write_released(source, tmp_path / "half", fp16=True)
    model = load(root)
    assert model.llm.embed_tokens.weight.dtype == torch.float32
    assert_same(model, source, rtol=2e-2)


def test_convert_cli_round_trip(source, released, tmp_path, capsys):
    convert_main([str(released), str(tmp_path / "proj"), "--vision-heads", "4", "--qformer-heads", "3"])
    assert "2 tokens per frame" in capsys.readouterr().out
    meta = json.loads((tmp_path / "proj/config.json").read_text())
    assert meta["format"] == "llamavid-deploy" and meta["format_version"] == 1
    assert sorted(p.name for p in (tmp_path / "proj").iterdir()) == [
        "config.json", "model.safetensors", "qformer_vocab.txt", "tokenizer.json"]
    assert_same(load(tmp_path / "proj"), source)


def test_sizes_read_from_shapes_and_heads_overridable(tmp_path):
    cfg = from_name("tiny")
    cfg.vision = VisionConfig(image_size=28, patch_size=7, width=40, depth=3, heads=5, mlp_dim=72)
    cfg.qformer.layers, cfg.qformer.ffn, cfg.qformer.heads = 4, 36, 4
    src = tiny_model(tmp_path / "a", seed=2, cfg=cfg)
    root = write_released(src, tmp_path / "b")
    model = llamavid_ref.load(root, vision_heads=5, qformer_heads=4)
    v, q = model.config.vision, model.config.qformer
    assert (v.width, v.depth, v.mlp_dim, v.patch_size, v.heads) == (40, 3, 72, 7, 5)
    assert (q.layers, q.ffn, q.hidden, q.num_query, q.vocab_size, q.heads) == (4, 36, 24, 4, 64, 4)
    assert_same(model, src)


def test_vision_tower_override_and_missing(source, released, tmp_path):
    moved = tmp_path / "eva.pth"
    shutil.move(released / "model_zoo/LAVIS/eva_vit_g.pth", moved)
    with pytest.raises(CheckpointError, match=r"vision tower: config.json names mm_vision_tower=.*pass vision_tower=PATH"):
        load(released)
    assert_same(load(released, vision_tower=moved), source)
    with pytest.raises(CheckpointError, match="expected the EVA-ViT-g file at .*nope.pth, found no file"):
        load(released, vision_tower=tmp_path / "nope.pth")


def _edit_shard(root, fn):
    shard = root / "pytorch_model-00001-of-00002.bin"
    sd = torch.load(shard, weights_only=True)
    fn(sd)
    torch.save(sd, shard)


def test_missing_tensor_is_named(released):
    _edit_shard(released, lambda sd: sd.pop(sorted(sd)[0]))
    with pytest.raises(CheckpointError, match=r"missing tensors \['"):
        load(released)


def test_unexpected_tensor_is_named(released):
    _edit_shard(released, lambda sd: sd.__setitem__("model.surprise.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.surprise.weight'"):
        load(released)


def test_misshaped_tensor_names_expected_and_found(released):
    _edit_shard(released, lambda sd: sd.__setitem__("model.vlm_att_key_projector.weight", torch.zeros(32, 31)))
    with pytest.raises(CheckpointError, match=r"'head.key_projector.weight': expected shape \[32, 32\], found \[32, 31\]"):
        load(released)


def test_pickle_that_runs_code_is_refused(released, tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    with open(released / "pytorch_model-00001-of-00002.bin", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(CheckpointError, match="expected a tensor-only torch file"):
        load(released)


def test_corrupt_and_missing_shards(released):
    (released / "pytorch_model-00002-of-00002.bin").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="pytorch_model-00002-of-00002.bin: expected a tensor-only"):
        load(released)
    (released / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(CheckpointError, match="expected the file .*00002-of-00002.bin, found nothing"):
        load(released)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="expected a directory with config.json, found nothing"):
        load(tmp_path / "absent")
    (tmp_path / "f.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="found a file"):
        load(tmp_path / "f.bin")
    (tmp_path / "d").mkdir()
    (tmp_path / "d/config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="expected model.safetensors, pytorch_model.bin or"):
        load(tmp_path / "d")


def test_missing_tokenizers(released):
    (released / "qformer_vocab.txt").unlink()
    with pytest.raises(FileNotFoundError, match="Q-Former vocab: expected the bert-base-uncased WordPiece"):
        load(released)


def test_project_format_version_mismatch(source, tmp_path):
    llamavid_ref.save(source, tmp_path / "p")
    meta = json.loads((tmp_path / "p/config.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "p/config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="expected project format version 1, found 99"):
        load(tmp_path / "p")
