"""load_video's sampling rule and errors, write_video's round trip; every clip is written here."""
import math

import av
import numpy as np
import pytest

from llamavid_ref import video
from llamavid_ref.video import VideoError, load_video, sample_step, write_video


def numbered_frames(count, size=32):
    """Frame i shows i in two grey halves (i % 16 and i // 16), readable back after lossy coding,
    above a strip of noise that makes the coded frames large next to the container's index."""
    frames = np.zeros((count, size, size, 3), np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (count, size // 4, size, 3), dtype=np.uint8)
    for i in range(count):
        frames[i, :, : size // 2] = (i % 16) * 16
        frames[i, :, size // 2:] = (i // 16) * 32
    frames[:, -size // 4:] = noise
    return frames


def read_numbers(frames):
    return [int(round(f[16, 4, 0] / 16)) + 16 * int(round(f[16, 24, 0] / 32)) for f in frames]


def smooth_frames(count=12, height=48, width=64):
    """Gradients and a moving red block: hard edges where 4:2:0 chroma loses most."""
    y, x = np.mgrid[0:height, 0:width]
    frames = np.zeros((count, height, width, 3), np.uint8)
    for t in range(count):
        frames[t, ..., 0] = (x * 3 + t * 5) % 256
        frames[t, ..., 1] = (y * 4) % 256
        frames[t, ..., 2] = 128
        frames[t, 10:26, 8 + 2 * t: 24 + 2 * t] = (230, 40, 40)
    return frames


def add_silent_audio(container):
    audio = container.add_stream("aac", rate=16000)
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
    frame.sample_rate = 16000
    for packet in [*audio.encode(frame), *audio.encode()]:
        container.mux(packet)


@pytest.mark.parametrize("source_fps, fps, step", [
    (4, 1, 4), (30, 1, 30), (29.97, 1, 30), (25, 1, 25), (30, 2, 15),
    (2.5, 1, 2), (3.5, 1, 4),  # Python's round: halves go to the even neighbour, as in the release
    (0.4, 1, 1), (None, 1, 1), (math.nan, 1, 1),
])
def test_sample_step_follows_release_rule(source_fps, fps, step):
    assert sample_step(source_fps, fps) == step


@pytest.mark.parametrize("source_fps, count, indices", [
    (4, 12, [0, 4, 8]),           # every 4th frame
    (30, 90, [0, 30, 60]),        # 3 s at 30 fps -> 3 frames
    (2.5, 10, [0, 2, 4, 6, 8]),   # round(2.5) == 2
    (29.97, 100, [0, 30, 60, 90]),
    (0.5, 3, [0, 1, 2]),          # slower than 1 fps: every frame
])
def test_sampling_keeps_release_indices(tmp_path, source_fps, count, indices):
    path = tmp_path / "numbered.mp4"
    write_video(path, numbered_frames(count), source_fps)
    clip = load_video(path)
    assert clip.indices.tolist() == indices
    assert read_numbers(clip.frames) == indices  # the decoded pictures are those frames
    assert clip.source_fps == pytest.approx(source_fps, rel=1e-3)
    np.testing.assert_allclose(clip.timestamps, np.array(indices) / source_fps, atol=1e-3)
    assert clip.frames.dtype == np.uint8 and clip.frames.shape == (len(indices), 32, 32, 3)
    assert not clip.partial


def test_fps_argument_and_max_frames(tmp_path):
    path = tmp_path / "ten_seconds.mp4"
    write_video(path, numbered_frames(100), 10)
    assert load_video(path, fps=2).indices.tolist() == list(range(0, 100, 5))
    assert len(load_video(path, max_frames=None)) == 10
    assert load_video(path, max_frames=20).indices.tolist() == list(range(0, 100, 10))
    capped = load_video(path, max_frames=4)  # uniform over the 10 kept: positions 0, 3, 6, 9
    assert capped.indices.tolist() == [0, 30, 60, 90]
    assert read_numbers(capped.frames) == [0, 30, 60, 90]
    np.testing.assert_allclose(capped.timestamps, [0, 3, 6, 9], atol=1e-3)
    assert load_video(path, max_frames=1).indices.tolist() == [0]
    with pytest.raises(ValueError, match="max_frames"):
        load_video(path, max_frames=0)
    with pytest.raises(ValueError, match="fps"):
        load_video(path, fps=0)


def test_stream_without_declared_rate_measures_it_from_timestamps(tmp_path, monkeypatch):
    path = tmp_path / "four_fps.mp4"
    write_video(path, numbered_frames(12), 4)
    monkeypatch.setattr(video, "_declared_fps", lambda stream: None)
    clip = load_video(path)
    assert clip.source_fps == pytest.approx(4.0)
    assert read_numbers(clip.frames) == [0, 4, 8]


@pytest.mark.parametrize("codec", ["libx264", "mpeg4"])
def test_write_read_round_trip_within_codec_loss(tmp_path, codec):
    # Tolerance: mean |error| <= 4 levels of 255 and 99th percentile <= 24; the large errors sit
    # on hard colour edges, where yuv420p halves the chroma resolution.
    frames = smooth_frames()
    path = tmp_path / f"{codec}.mp4"
    assert write_video(path, frames, fps=4, codec=codec) == codec
    clip = load_video(path, fps=4)  # keep every frame
    assert clip.frames.shape == frames.shape
    error = np.abs(clip.frames.astype(np.int16) - frames)
    assert error.mean() <= 4 and np.percentile(error, 99) <= 24


def test_write_video_is_deterministic_and_validates(tmp_path):
    frames = smooth_frames(count=4)
    write_video(tmp_path / "a.mp4", frames, 4)
    write_video(tmp_path / "b.mp4", frames, 4)
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", np.zeros((2, 31, 32, 3), np.uint8), 4)
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "float.mp4", np.zeros((2, 32, 32, 3), np.float32), 4)
    with pytest.raises(ValueError, match="fps"):
        write_video(tmp_path / "still.mp4", frames, 0)


def test_mpeg4_is_the_fallback_without_libx264(monkeypatch):
    def no_x264(name, mode):
        raise av.codec.codec.UnknownCodecError(name)

    monkeypatch.setattr(av.codec, "Codec", no_x264)
    assert video._encoder() == "mpeg4"


def expect_error(path, *fragments, **kwargs):
    with pytest.raises(VideoError) as caught:
        load_video(path, **kwargs)
    message = str(caught.value)
    for fragment in (str(path), "expected", "found", *fragments):
        assert fragment in message, message
    return message


def test_missing_file_and_directory(tmp_path):
    expect_error(tmp_path / "nope.mp4", "no such file")
    expect_error(tmp_path, "a directory")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    expect_error(path, "empty (0-byte)")


def test_not_a_video(tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("these are words, not a video\n" * 20)
    expect_error(text, "container", "cannot parse")
    noise = tmp_path / "noise.mkv"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    expect_error(noise, "container")


def test_audio_only_file_has_no_video_stream(tmp_path):
    path = tmp_path / "speech.m4a"
    with av.open(str(path), "w") as container:
        add_silent_audio(container)
    expect_error(path, "a video stream", "audio")


def test_video_stream_with_zero_frames(tmp_path):
    path = tmp_path / "no_pictures.mkv"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=4)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        add_silent_audio(container)
    expect_error(path, "at least one decodable frame", "no frames")


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_truncated_file_raises_unless_partial_allowed(tmp_path, suffix):
    whole = tmp_path / f"whole{suffix}"
    write_video(whole, numbered_frames(40), 4)  # 10 s
    data = whole.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) * 6 // 10])
    message = expect_error(cut, "complete video stream", "frames", "allow_partial=True")
    assert "truncated" in message
    clip = load_video(cut, allow_partial=True)
    assert clip.partial and 2 <= len(clip) < 10
    # Frames just before the cut may be lost (their references are), so check the head only.
    assert read_numbers(clip.frames[:2]) == clip.indices[:2].tolist() == [0, 4]
    assert not load_video(whole).partial


def test_mp4_cut_inside_its_index(tmp_path):
    whole = tmp_path / "whole.mp4"
    write_video(whole, numbered_frames(40), 4)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[:200])  # faststart: the moov index comes first
    expect_error(cut)
