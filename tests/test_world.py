"""The synthetic video-QA world: determinism, disjoint splits, balance, JSON schema, and answers
recovered from the decoded 1 fps frames by a pixel check that shares no code with the renderer."""
import json
import re
from collections import Counter

import numpy as np
import pytest

from llamavid_ref.data import world
from llamavid_ref.video import load_video

COUNTS = {"train": 6, "val": 6, "test": 24}  # test: 4 clips per question type


def make(out):
    return world.generate(out, COUNTS, seed=7, captions=True, multiturn=True, workers=1, log=lambda _: None)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    return out, make(out)


# ---------------------------------------------------------------- an independent reading of pixels

NOMINAL = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}


def components(label):
    """Ids of the 4-connected regions of equal nonzero label (minimum-id propagation)."""
    height, width = label.shape
    ids = np.where(label > 0, np.arange(1, height * width + 1).reshape(height, width), 0)
    while True:
        new = ids.copy()
        for a, b in ((np.s_[1:, :], np.s_[:-1, :]), (np.s_[:, 1:], np.s_[:, :-1])):
            same = (label[a] == label[b]) & (label[a] > 0)
            new[a] = np.where(same, np.minimum(new[a], ids[b]), new[a])
            new[b] = np.where(same, np.minimum(new[b], ids[a]), new[b])
        if (new == ids).all():
            return ids
        ids = new


def blobs(frame):
    """[(colour, shape, cx, cy)] of the blobs of one pure colour in an RGB frame [H, W, 3]."""
    names = [None, *NOMINAL]
    palette = np.array([(0, 0, 0), *NOMINAL.values()], np.float32)
    label = ((frame[:, :, None, :].astype(np.float32) - palette) ** 2).sum(-1).argmin(-1)  # [H, W]
    ids = components(label)
    found = []
    for blob in np.unique(ids[ids > 0]):
        ys, xs = np.nonzero(ids == blob)
        if len(ys) < 20:  # codec fringe, not a sprite
            continue
        height, width = np.ptp(ys) + 1, np.ptp(xs) + 1
        fill = len(ys) / (height * width)                    # square ~1, circle ~0.7, triangle ~0.55
        low_mass = (ys.mean() - ys.min()) / (height - 1)     # triangle (apex up) ~0.65, circle ~0.5
        shape = "square" if fill > 0.9 else "triangle" if low_mass > 0.59 else "circle"
        found.append((names[label[ys[0], xs[0]]], shape, xs.mean(), ys.mean()))
    return found


def answer_from_pixels(frames, qtype, question):
    seen = [blobs(f) for f in frames]  # per sampled frame
    words = re.findall(r"[a-z]+", question.lower())
    color = next((w for w in words if w in NOMINAL), None)
    shape = next((w for w in words if w in world.SHAPES), None)
    named = [[b for b in frame if b[1] == shape and color in (None, b[0])] for frame in seen]
    if qtype == "color":
        (colour,) = {b[0] for frame in named for b in frame}
        return colour
    if qtype == "direction":
        track = [frame[0][2:] for frame in named if frame]
        dx, dy = np.subtract(track[-1], track[0])
        return ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
    if qtype == "appear":
        assert bool(named[0]) != bool(named[-1])
        return "appear" if named[-1] else "disappear"
    if qtype == "count":
        assert len({len(frame) for frame in seen}) == 1
        return str(len(seen[0]))
    if qtype == "first":
        (first,) = next(frame for frame in seen if frame)
        return first[1]
    return str(len(seen[-1]))  # last_count


# ---------------------------------------------------------------- tests

def test_answers_are_recoverable_from_decoded_frames(dataset):
    out, made = dataset
    for clip in made["test"]:
        frames = load_video(out / clip.video, fps=1).frames
        assert frames.shape == (8, 64, 64, 3)
        assert answer_from_pixels(frames, clip.qtype, clip.question) == clip.answer, clip


def test_same_seed_gives_identical_json_and_frames(dataset, tmp_path):
    out, _ = dataset
    make(tmp_path)
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    for name in files:
        if name.suffix == ".json":
            assert (out / name).read_bytes() == (tmp_path / name).read_bytes(), name
    for name in [f for f in files if f.suffix == ".mp4"][::5]:
        np.testing.assert_array_equal(load_video(out / name).frames, load_video(tmp_path / name).frames)
    assert world.make_split("test", 12, seed=8) != world.make_split("test", 12, seed=7)


def test_splits_never_share_a_clip():
    keys = {split: [tuple(c.sprites) for c in world.make_split(split, 200, seed=3)] for split in world.SPLITS}
    as_sets = {split: {tuple(sorted(k, key=repr)) for k in v} for split, v in keys.items()}
    for split, clips in keys.items():
        assert len(as_sets[split]) == len(clips)  # no repeats inside a split either
    assert not as_sets["train"] & as_sets["val"]
    assert not as_sets["train"] & as_sets["test"]
    assert not as_sets["val"] & as_sets["test"]


def test_types_and_answers_are_balanced():
    clips = world.make_split("train", 240, seed=0)
    per_type = Counter(c.qtype for c in clips)
    assert set(per_type) == set(world.QTYPES) and set(per_type.values()) == {40}
    for qtype in world.QTYPES:
        answers = Counter(c.answer for c in clips if c.qtype == qtype)
        assert set(answers) == set(world.ANSWERS[qtype])
        assert max(answers.values()) - min(answers.values()) <= 1, (qtype, answers)


def test_object_questions_need_the_named_object():
    for clip in world.make_split("val", 120, seed=1):
        if clip.qtype not in world.OBJECT_QTYPES:
            continue
        words = clip.question.lower().rstrip("?").split()
        target = next(s for s in clip.sprites if s.shape in words and (clip.qtype == "color" or s.color in words))
        others = [s for s in clip.sprites if s is not target]
        assert others
        if clip.qtype == "color":  # every other sprite has another colour
            assert all(s.color != clip.answer for s in others)
        else:  # a sprite sharing the colour or the shape does something else
            attribute = {"direction": "motion", "appear": "event"}[clip.qtype]
            assert any((s.color == target.color or s.shape == target.shape)
                       and getattr(s, attribute) != clip.answer for s in others)


def test_json_schema(dataset):
    out, made = dataset
    spec = json.loads((out / "world.json").read_text())
    assert spec["frame_size"] == 64 and spec["source_fps"] == 4 and spec["sampled_frames_at_1fps"] == 8
    for split, count in COUNTS.items():
        entries = json.loads((out / f"{split}.json").read_text())
        assert len(entries) == count and len({e["id"] for e in entries}) == count
        for e in entries:
            assert set(e) == {"id", "video", "qtype", "conversations"}
            assert re.fullmatch(rf"videos/{split}/\d{{6}}\.mp4", e["video"]) and (out / e["video"]).is_file()
            human, gpt = e["conversations"]
            assert human["from"] == "human" and human["value"].startswith("<image>\n")
            assert gpt["from"] == "gpt" and gpt["value"] in world.ANSWERS[e["qtype"]]
        captions = json.loads((out / f"{split}_captions.json").read_text())
        assert [c["video"] for c in captions] == [e["video"] for e in entries]
        for c in captions:
            assert re.fullmatch(r"(a (red|green|blue|yellow) (circle|square|triangle) [a-z ]+\. ?)+",
                                c["conversations"][1]["value"])
        for m in json.loads((out / f"{split}_multiturn.json").read_text()):
            roles = [t["from"] for t in m["conversations"]]
            assert roles == ["human", "gpt"] * (len(roles) // 2) and len(m["qtypes"]) == len(roles) // 2
            assert sum("<image>" in t["value"] for t in m["conversations"]) == 1
            assert m["qtypes"][0] == m["qtype"]


def test_cli(tmp_path, capsys):
    world.main(["--out", str(tmp_path), "--test", "3", "--seed", "2", "--workers", "1"])
    assert "world: test 3/3 clips" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "test.json").read_text())) == 3
    assert not (tmp_path / "train.json").exists()
    with pytest.raises(SystemExit):
        world.main(["--out", str(tmp_path)])
