"""LLaVA-style JSON loading: media fields, the <image> placeholder, turns, and malformed entries."""
import json

import pytest

from llamavid_ref.data import world
from llamavid_ref.data.llava_json import GPT, HUMAN, LlavaJsonError, Sample, load_llava_json, parse_entry


def write_json(folder, entries, name="data.json"):
    path = folder / name
    path.write_text(json.dumps(entries))
    return path


def qa(question="What is it?", answer="a cat", **media):
    return {"id": "s1", **media, "conversations": [{"from": "human", "value": question},
                                                   {"from": "gpt", "value": answer}]}


@pytest.fixture
def media(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "cat.jpg").write_bytes(b"not decoded here")
    return tmp_path


def test_loads_world_json(tmp_path):
    world.generate(tmp_path, {"test": 6}, seed=1, multiturn=True, workers=1, log=lambda _: None)
    samples = load_llava_json(tmp_path / "test.json")
    assert len(samples) == 6
    for s in samples:
        assert s.media_kind == "video" and s.media_path.is_file() and s.media_path.parent == tmp_path / "videos" / "test"
        assert s.qtype in world.QTYPES and s.id.startswith("test_")
        (role_q, question), (role_a, answer) = s.turns
        assert (role_q, role_a) == (HUMAN, GPT) and question.startswith("<image>\n") and question.count("<image>") == 1
        assert answer in world.ANSWERS[s.qtype]
    for s in load_llava_json(tmp_path / "test_multiturn.json", media_position="end"):
        assert [r for r, _ in s.turns] == [HUMAN, GPT] * (len(s.turns) // 2)
        assert s.turns[0][1].startswith("<image>\n")  # a placeholder already there is kept


@pytest.mark.parametrize("position, expected", [("start", "<image>\nWhat is it?"), ("end", "What is it?\n<image>")])
def test_placeholder_added_to_first_human_turn(media, position, expected):
    path = write_json(media, [qa(image="imgs/cat.jpg")])
    (sample,) = load_llava_json(path, media_position=position)
    assert sample == Sample("s1", "image", media / "imgs" / "cat.jpg",
                            ((HUMAN, expected), (GPT, "a cat")), None)


def test_random_position_is_seeded_per_entry(media):
    path = write_json(media, [qa(image="imgs/cat.jpg") for _ in range(40)])

    def starts(seed):
        return [s.turns[0][1].startswith("<image>\n") for s in load_llava_json(path, media_position="random", seed=seed)]

    first = starts(3)
    assert first == starts(3) and 5 < sum(first) < 35 and first != starts(4)
    ends = [s.turns[0][1] for s in load_llava_json(path, media_position="random", seed=3)]
    assert all(t in ("<image>\nWhat is it?", "What is it?\n<image>") for t in ends)


def test_existing_placeholder_is_kept_and_later_turns_untouched(media):
    entry = {"id": 7, "video": "imgs/cat.jpg", "qtype": "color", "conversations": [
        {"from": "human", "value": "Look: <image> what colour?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "And the shape?"}, {"from": "gpt", "value": "square"},
        {"from": "human", "value": "Anything else?"}]}  # a last question without an answer is allowed
    (sample,) = load_llava_json(write_json(media, [entry]), media_position="end")
    assert sample.id == "7" and sample.media_kind == "video" and sample.qtype == "color"
    assert [t for _, t in sample.turns] == ["Look: <image> what colour?", "red", "And the shape?", "square",
                                            "Anything else?"]


def test_text_only_and_role_aliases(media):
    entry = {"id": "t", "conversations": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hello"}]}
    (sample,) = load_llava_json(write_json(media, [entry]))
    assert sample == Sample("t", None, None, ((HUMAN, "Hi"), (GPT, "Hello")), None)


def test_media_root_and_unchecked_media(media, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("json")
    path = write_json(elsewhere, [qa(image="imgs/cat.jpg")])
    assert load_llava_json(path, media_root=media)[0].media_path == media / "imgs" / "cat.jpg"
    assert load_llava_json(path, check_media=False)[0].media_path == elsewhere / "imgs" / "cat.jpg"


@pytest.mark.parametrize("entry, fragments", [
    ({"id": "s1", "image": "imgs/cat.jpg"}, ["'conversations'", "found none"]),
    ({"id": "s1", "conversations": []}, ["non-empty 'conversations'"]),
    ({"id": "s1", "conversations": [{"from": "gpt", "value": "hi"}]}, ["turn 0 from 'human'", "'gpt'"]),
    ({"id": "s1", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]},
     ["turn 1 from 'gpt'", "alternate"]),
    ({"id": "s1", "conversations": [{"from": "human"}]}, ["turn 0 to be"]),
    (qa(image="imgs/dog.jpg"), ["image file", "dog.jpg", "no such file"]),
    (qa(image="imgs/cat.jpg", video="imgs/cat.jpg"), ["one of 'image' or 'video'", "both"]),
    (qa(image=["imgs/cat.jpg"]), ["one path string"]),
    (qa(question="<image>\nWhat?"), ["without 'image' or 'video'", "turn 0"]),
    (qa(question="<image> and <image>", image="imgs/cat.jpg"), ["one <image>", "found 2"]),
    (qa(answer="<image>", image="imgs/cat.jpg"), ["in a human turn", "turn 1"]),
    ("just text", ["an object", "str"]),
])
def test_malformed_entries_name_index_and_id(media, entry, fragments):
    path = write_json(media, [qa(image="imgs/cat.jpg"), entry])
    with pytest.raises(LlavaJsonError) as caught:
        load_llava_json(path)
    message = str(caught.value)
    for fragment in [str(path), "entry 1", "expected", "found", *fragments]:
        assert fragment in message, message
    if isinstance(entry, dict):
        assert "(id 's1')" in message


def test_malformed_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(LlavaJsonError, match="bad.json: expected a JSON list"):
        load_llava_json(bad)
    with pytest.raises(LlavaJsonError, match="found a dict"):
        load_llava_json(write_json(tmp_path, {"conversations": []}))
    with pytest.raises(LlavaJsonError, match="could not read"):
        load_llava_json(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="media_position"):
        parse_entry(qa(), 0, tmp_path, media_position="middle")


def test_package_exports_resolve():
    import llamavid_ref.data as data

    assert all(getattr(data, name) is not None for name in data.__all__)
    assert data.load_llava_json is load_llava_json and data.QTYPES == world.QTYPES
