"""Live streams on tiny models: a stream whose focus tier covers the clip answers exactly as one-shot does; the
sliding window's re-rotated keys against a cache computed fresh (both KV layouts, linear RoPE scaling 16);
long-video mode; frames arriving during an answer; several streams at once; bad input; runtime.stream."""
import dataclasses
import io
import re
import threading

import numpy as np
import pytest

import llamavid_ref
from export.build import build
from llamavid_ref.config import from_name
from llamavid_ref.tiny import tiny_model
from llamavid_ref.video import write_video
from runtime import _llamavid
from runtime import stream as stream_cli
from runtime.pipeline import Pipeline
from test_export_build import quiet

QUESTIONS = ["what color is the square ?", "how many shapes are there ?", "what moves left ?"]


def checkpoint(root, fused: bool, rope_scaling: float = 1.0, layers: int = 2):
    cfg = from_name("tiny")
    cfg.llm = dataclasses.replace(cfg.llm, hidden=64 if fused else 32, rope_scaling=rope_scaling, layers=layers)
    return llamavid_ref.save(tiny_model(root / "src", seed=7, cfg=cfg), root / "ckpt")


@pytest.fixture(scope="module", params=["fused", "plain"])
def pipe(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    return Pipeline.open(build(checkpoint(root, request.param == "fused"), "fp32", root / "art", "ort", log=quiet))


def clip(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 28, 28)).astype(np.float32)


def fill(stream, frames, t0: float = 0.0):
    for i, f in enumerate(frames):
        stream.push(f, t0 + i)


def test_focus_over_the_whole_clip_answers_as_one_shot(pipe):
    """focus_frames >= the clip's frames: the layout is one-shot's (warm copies replaced by the question's
    tokens), so greedy answers are identical; asking twice gives the same answer (the cache was rolled back)."""
    for n, q in ((3, QUESTIONS[0]), (4, QUESTIONS[1]), (2, QUESTIONS[2])):
        frames = clip(n, seed=n)
        s = pipe.stream(focus_frames=4)
        fill(s, frames)
        want = pipe.ask(frames, q, max_new_tokens=10)
        assert s.answer(q, 10) == want and s.answer(q, 10) == want
        assert s.info()["position"] == pipe.stream().info()["position"] + 2 * n     # the prefix, 2 tokens a frame


def logits_after(pipe, ids: list[int], evict: tuple[int, int] | None, more: list[int]) -> np.ndarray:
    s = _llamavid.Session(pipe.core, n_ctx=128)
    s.prompt(np.asarray(ids, np.int32))
    if evict:
        s.evict(*evict)
    s.prompt(np.asarray(more, np.int32))
    return np.frombuffer(s.logits(), np.float32)


@pytest.mark.parametrize("scaling", [1.0, 16.0])
def test_evicted_window_reads_as_a_cache_computed_fresh(tmp_path, scaling):
    """Positions [5, 17) dropped from a 30-token cache, the later keys re-rotated: with one layer (whose keys
    and values depend on the token and its position only) the next logits equal those of a cache that held the
    kept tokens from the start (fused and plain graphs; linear RoPE 1 and 16). With more layers the kept tokens'
    deeper KV entries still carry what they attended to before the eviction (StreamingLLM's approximation)."""
    ids = [1] + [3 + (7 * k) % 40 for k in range(29)]
    more = [11, 12, 13]
    for fused in (True, False):
        root = tmp_path / f"{fused}"
        p = Pipeline.open(build(checkpoint(root, fused, scaling, layers=1), "fp32", root / "art", "ort", log=quiet))
        got = logits_after(p, ids, (5, 12), more)
        want = logits_after(p, ids[:5] + ids[17:], None, more)
        assert np.abs(got - want).max() / np.abs(want).max() < 1e-5, fused
        plain = logits_after(p, ids, None, more)                  # without eviction: another answer entirely
        assert np.abs(plain - want).max() / np.abs(want).max() > 1e-2


def test_window_keeps_the_newest_frames_and_answers(pipe):
    s = pipe.stream(n_ctx=120, focus_frames=2, reserve=24, evict_frames=8)
    fill(s, clip(200, seed=3))
    s.flush()
    info = s.info()
    assert info["frames_pushed"] == 200 and info["frames_evicted"] > 100
    assert info["last_time"] == 199 and info["first_time"] == 200 - info["frames_held"]
    assert info["position"] + 24 <= 120 and info["kv_bytes"] > 0
    answers = [s.answer(QUESTIONS[1], 6) for _ in range(3)]
    assert answers[0] == answers[1] == answers[2]             # the window is rolled back after every answer


def test_long_video_mode_interleaves_subtitles(pipe):
    """Frames each followed by their subtitle, the release's movie prompt around them: the answer equals the
    core's one-shot prompt of the same layout (one placeholder per frame)."""
    frames, subs = clip(3, seed=9), ["the red square", "moves left", ""]
    s = pipe.stream(long_video=True, focus_frames=3)
    for i, (f, sub) in enumerate(zip(frames, subs)):
        s.push(f, i, subtitle=sub)
    lv = pipe.manifest["prompt"]["long_video"]
    before, after = pipe.prompt_text([(0, f"{lv['intro']}\n<image>Q"), (1, None)]).split("<image>")
    ids = pipe.encode_prompt(before)
    for sub in subs:
        ids += [pipe.image_id] + pipe.tokenizer.encode(sub)
    ids += pipe.tokenizer.encode("\n" + lv["outro"] + after.replace("Q", QUESTIONS[0], 1))
    with pipe.session(len(ids) + 30) as core:
        core.prompt(np.asarray(ids, np.int32), frames, *pipe.qformer_tokenizer([QUESTIONS[0]]),
                    image_counts=np.ones(3, np.int32))
        sampler, want = _llamavid.Sampler(pipe.info["vocab_size"]), []
        while len(want) < 6 and (t := core.next(sampler)) != pipe.eos:
            want.append(t)
    assert s.answer(QUESTIONS[0], 6) == pipe.tokenizer.decode(want).strip()


def test_frames_pushed_during_an_answer_go_in_after_it(pipe):
    s = pipe.stream(focus_frames=2)
    fill(s, clip(3))
    answer = s.ask(QUESTIONS[0], 6)
    next(answer, None)
    assert s.push(clip(1, seed=4)[0], 3.0)                       # while the answer is open: waits
    with pytest.raises(RuntimeError, match="a question is already being answered"):
        s.ask(QUESTIONS[1])
    list(answer)
    s.flush()
    assert s.info()["frames_pushed"] == 4 and s.info()["frames_encoded"] == 4


def test_bad_input_is_a_clear_error_and_the_stream_goes_on(pipe):
    s = pipe.stream(focus_frames=2)
    fill(s, clip(3))
    with pytest.raises(ValueError, match=r"expected a time >= 2.000 s \(the last frame's\), found 1.500 s; the frame was not kept"):
        s.push(clip(1)[0], 1.5)
        s.flush()
    with pytest.raises(ValueError, match=r"push: expected an RGB frame uint8 \[H,W,3\] or pixel values float32 \[3,28,28\], "
                                         r"found float64 \[28, 28\]"):
        s.push(np.zeros((28, 28)), 4.0)
    s.push(np.full((40, 60, 3), 128, np.uint8), 4.0)             # any RGB size: resized as it arrives
    assert s.answer(QUESTIONS[1], 4) == s.answer(QUESTIONS[1], 4)
    assert s.info()["frames_pushed"] == 4


def test_several_streams_at_once_on_one_pipeline(pipe):
    videos = [clip(n, seed=n) for n in (2, 3, 4, 5)]
    want = []
    for v in videos:
        s = pipe.stream(focus_frames=2)
        fill(s, v)
        want.append(s.answer(QUESTIONS[2], 8))
    got = [None] * 4

    def run(i):
        s = pipe.stream(focus_frames=2)
        fill(s, videos[i])
        got[i] = s.answer(QUESTIONS[2], 8)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want


def test_stream_cli_answers_with_the_stream_time(pipe, tmp_path, monkeypatch, capsys):
    video = tmp_path / "v.mp4"
    write_video(video, np.random.default_rng(1).integers(0, 256, (8, 28, 28, 3), dtype=np.uint8), fps=4)
    monkeypatch.setattr("sys.stdin", io.StringIO(QUESTIONS[1] + "\n"))
    assert stream_cli.main(["--artifacts", str(pipe.root), "--source", str(video), "--fast"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and re.match(r"\[t=\d+\.\d s, \d+ frames held\] ", out[0]), out
    assert stream_cli.main(["--artifacts", str(pipe.root), "--source", str(tmp_path / "none.mp4")]) == 2
    assert "--source" in capsys.readouterr().err


def test_chat_on_a_video_longer_than_the_context_answers_through_a_stream(pipe, tmp_path, capsys):
    """300 frames at 1 fps make 600 visual tokens, past the tiny model's 512 positions: runtime.chat --video
    decodes them frame by frame into a stream and answers (it used to refuse: "prompt too long")."""
    from runtime import chat as chat_cli
    video = tmp_path / "long.mp4"
    write_video(video, np.random.default_rng(2).integers(0, 256, (300, 28, 28, 3), dtype=np.uint8), fps=1)
    c = pipe.chat(str(video))
    assert c.stream is not None and c.pixels is None
    info = c.stream.info()
    assert info["frames_pushed"] == 300 and info["frames_evicted"] > 0 and info["last_time"] == 299
    answer = c.ask(QUESTIONS[1], max_new_tokens=6)
    assert chat_cli.main(["--artifacts", str(pipe.root), "--video", str(video), "--max-new-tokens", "6",
                          QUESTIONS[1]]) == 0
    assert capsys.readouterr().out.strip() == answer


def test_a_source_with_corrupt_packets_or_cut_short_goes_on(pipe, tmp_path, monkeypatch, capsys):
    """Bytes flipped in the middle of the file: the broken packets are skipped (and counted), the frames
    before and after go in and the question is answered; a file cut short ends the stream, which still answers."""
    video = tmp_path / "v.mp4"
    write_video(video, np.random.default_rng(1).integers(0, 256, (40, 28, 28, 3), dtype=np.uint8), fps=4)
    data = bytearray(video.read_bytes())
    for k in range(len(data) // 3, len(data) // 3 + 600, 7):
        data[k] ^= 0xFF
    for name, blob in (("bad.mp4", bytes(data)), ("cut.mp4", bytes(data[: len(data) * 2 // 3]))):
        (tmp_path / name).write_bytes(blob)
        frames = list(stream_cli.frames_of(*stream_cli.open_source(str(tmp_path / name)), realtime=False))
        assert 10 < len(frames) < 40
        assert "corrupt packet(s) skipped" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO(QUESTIONS[0] + "\n"))
    assert stream_cli.main(["--artifacts", str(pipe.root), "--source", str(tmp_path / "bad.mp4"), "--fast"]) == 0
    assert re.match(r"\[t=\d+\.\d s, \d+ frames held\] ", capsys.readouterr().out)
