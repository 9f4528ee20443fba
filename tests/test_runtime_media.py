"""runtime.media against the reference (llamavid_ref: Pillow + torch): Pillow's bicubic resize bit for bit,
pixel values identical (np.array_equal) for images, frames and encoded clips, the same timestamps, the same
VideoError messages for bad files, and no torch behind it."""
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from llamavid_ref import video as ref_video
from llamavid_ref.config import CLIP_MEAN, CLIP_STD
from llamavid_ref.preprocess import preprocess, preprocess_video, to_rgb as ref_to_rgb
from runtime import media
from runtime.media import VideoError, iter_video, load_media, load_video, resize_bicubic
from test_video import add_silent_audio

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "llamavid_ref" / "default_model" / "sample.mp4"
OTHER = ((0.5, 0.25, 0.75), (0.2, 0.3, 0.4))          # a mean / std pair that is not CLIP's
rng = np.random.default_rng(0)


def pil_resize(x, w, h):
    return np.asarray(Image.fromarray(x).resize((w, h), Image.BICUBIC))


def random_image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---- resize ----------------------------------------------------------------------------------------
def random_cases(count, top, seed):
    g = np.random.default_rng(seed)
    return [tuple(int(v) for v in g.integers(1, top, 4)) for _ in range(count)]


@pytest.mark.parametrize("H, W, h, w", random_cases(150, 40, 1) + random_cases(150, 300, 2))
def test_resize_is_pillows_bit_for_bit(H, W, h, w):
    x = random_image(H, W, seed=H * 1000 + W)
    assert np.array_equal(resize_bicubic(x, w, h), pil_resize(x, w, h))


@pytest.mark.parametrize("H, W, h, w", [
    (720, 1280, 224, 398), (720, 1280, 64, 113), (1280, 720, 398, 224), (1080, 1920, 336, 597),
    (1, 1, 5, 7), (1, 9, 1, 1), (9, 1, 1, 1), (5, 7, 1, 1), (2, 3, 300, 1), (300, 1, 2, 200),
    (17, 17, 17, 40), (17, 40, 17, 17), (40, 17, 17, 17), (17, 17, 40, 17),       # one pass only
    # Pillow 13 goes vertical first when H - h > 2 (W - w): both sides of the boundary, and a growing width
    (41, 20, 1, 1), (61, 40, 21, 20), (62, 40, 21, 20), (100, 10, 20, 60), (300, 3, 224, 224),
])
def test_resize_edge_sizes_and_pass_order(H, W, h, w):
    x = random_image(H, W, seed=7)
    assert np.array_equal(resize_bicubic(x, w, h), pil_resize(x, w, h))


@pytest.mark.parametrize("H, W, h, w", random_cases(40, 120, 3) + [(720, 1280, 64, 113)])
def test_resize_crop_is_the_box_of_the_full_result(H, W, h, w):
    x = random_image(H, W, seed=3)
    full = pil_resize(x, w, h)
    g = np.random.default_rng(H + W)
    left, top = int(g.integers(0, w)), int(g.integers(0, h))
    right, bottom = int(g.integers(left + 1, w + 1)), int(g.integers(top + 1, h + 1))
    assert np.array_equal(resize_bicubic(x, w, h, (left, top, right, bottom)), full[top:bottom, left:right])


def test_resize_of_flat_and_extreme_images():
    for value in (0, 255, 128):
        x = np.full((33, 47, 3), value, np.uint8)
        assert np.array_equal(resize_bicubic(x, 20, 70), pil_resize(x, 20, 70))
    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[:, ::2] = 255                                # ringing overshoots: clipping at 0 and 255
    assert np.array_equal(resize_bicubic(stripes, 100, 30), pil_resize(stripes, 100, 30))
    with pytest.raises(ValueError, match=r"resize crop: expected a box inside 10x10, found \(0, 0, 11, 10\)"):
        resize_bicubic(stripes, 10, 10, (0, 0, 11, 10))


# ---- to_rgb and preprocessing ----------------------------------------------------------------------
def images_in_every_mode():
    base = Image.fromarray(random_image(13, 21, seed=5))
    out = [base.convert(m) for m in ("L", "LA", "P", "PA", "RGBA", "RGBX", "CMYK", "YCbCr", "1", "LAB", "HSV")]
    out.append(Image.fromarray(np.random.default_rng(1).integers(0, 65536, (13, 21), dtype=np.uint16)))  # I;16
    out += [Image.new(m, (9, 5)) for m in ("I;16B", "I;16L")]
    out.append(Image.fromarray(np.random.default_rng(2).integers(-5, 70000, (13, 21), dtype=np.int32)))   # I
    out.append(Image.fromarray(np.random.default_rng(3).random((13, 21), dtype=np.float32) * 3))         # F
    out.append(Image.new("I", (4, 4)))                                                  # all zero: max 1
    return out


@pytest.mark.parametrize("image", images_in_every_mode(), ids=lambda im: im.mode)
def test_to_rgb_converts_every_mode_as_the_reference(image):
    ours = media.to_rgb(image)
    assert ours.dtype == np.uint8 and ours.shape == (image.height, image.width, 3)
    assert np.array_equal(ours, np.asarray(ref_to_rgb(image)))
    for S, pad in ((28, True), (28, False), (64, True)):
        assert np.array_equal(media.preprocess_image(image, S, pad, CLIP_MEAN, CLIP_STD),
                              preprocess(image, S, pad).numpy())


def test_to_rgb_errors_are_the_references():
    for bad in (np.zeros((4, 4)), np.zeros((4, 4, 3), np.float32), np.zeros((4, 4, 4), np.uint8),
                Image.new("RGBa", (4, 4)), Image.new("La", (4, 4)), "a string"):
        with pytest.raises((ValueError, TypeError)) as ours:
            media.to_rgb(bad)
        with pytest.raises((ValueError, TypeError)) as ref:
            ref_to_rgb(bad)
        assert type(ours.value) is type(ref.value) and str(ours.value) == str(ref.value)
    with pytest.raises(ValueError, match=r"image array: expected uint8 \[H,W,3\], found float64 \[4, 4\]"):
        media.to_rgb(np.zeros((4, 4)))


@pytest.mark.parametrize("seed", range(60))
def test_preprocess_image_and_frame_equal_the_reference(seed):
    g = np.random.default_rng(seed)
    H, W = (int(v) for v in g.integers(1, 400, 2))
    if seed % 5 == 0:
        H = int(W * g.uniform(2.1, 6)) + 1                   # taller than 2:1: Pillow's vertical-first order
    S = int(g.choice([7, 28, 64, 224, 336]))
    mean, std = (CLIP_MEAN, CLIP_STD) if seed % 2 else OTHER
    x = random_image(H, W, seed)
    for pad in (True, False):
        ours = media.preprocess_image(x, S, pad, mean, std)
        assert ours.dtype == np.float32 and ours.shape == (3, S, S) and ours.flags.c_contiguous
        assert np.array_equal(ours, preprocess(x, S, pad, mean, std).numpy())
    assert np.array_equal(media.preprocess_frame(x, S, mean, std), preprocess(x, S, False, mean, std).numpy())


@pytest.mark.parametrize("H, W", [(720, 1280), (1280, 720), (480, 640), (1080, 1920)])
def test_preprocess_real_frame_sizes(H, W):
    x = random_image(H, W, seed=H)
    for S in (64, 224, 336):
        assert np.array_equal(media.preprocess_frame(x, S, CLIP_MEAN, CLIP_STD), preprocess(x, S, False).numpy())
    assert np.array_equal(media.preprocess_image(x, 224, True, CLIP_MEAN, CLIP_STD), preprocess(x, 224, True).numpy())


def test_expand_to_square_pads_with_the_mean_colour():
    red = np.zeros((20, 40, 3), np.uint8)
    red[..., 0] = 255
    sq = media.expand_to_square(red, CLIP_MEAN)
    assert sq.shape == (40, 40, 3) and tuple(sq[0, 0]) == (122, 116, 104) and tuple(sq[20, 20]) == (255, 0, 0)
    assert np.array_equal(sq[10:30], red) and (sq[:10] == sq[0, 0]).all() and (sq[30:] == sq[0, 0]).all()


# ---- video -----------------------------------------------------------------------------------------
def moving_frames(count, h, w, seed=0):
    """A gradient with a moving block and noise: every frame differs and resizing has work to do."""
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    frames = np.empty((count, h, w, 3), np.uint8)
    for t in range(count):
        frames[t, ..., 0] = (x * 255 // max(w - 1, 1) + 9 * t) % 256
        frames[t, ..., 1] = (y * 255 // max(h - 1, 1)) % 256
        frames[t, ..., 2] = g.integers(0, 256, (h, w))
        frames[t, h // 4: h // 2, (3 * t) % w: (3 * t) % w + w // 5] = (240, 30, 30)
    return frames


def reference_video(path, S, fps=1.0, max_frames=None, mean=CLIP_MEAN, std=CLIP_STD):
    clip = ref_video.load_video(path, fps=fps, max_frames=max_frames)
    return preprocess_video(clip.frames, S, mean, std).numpy(), clip.timestamps


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """(path, source fps) of encoded clips: rates that round differently, odd aspect ratios, 720p."""
    root = tmp_path_factory.mktemp("clips")
    out = []
    for name, (count, h, w, fps) in {"four.mp4": (14, 48, 64, 4), "ntsc.mp4": (64, 36, 64, 29.97),
                                     "halves.mkv": (11, 64, 40, 2.5), "hd.mp4": (6, 720, 1280, 2),
                                     "tall.mp4": (5, 200, 64, 1)}.items():
        ref_video.write_video(root / name, moving_frames(count, h, w, seed=count), fps)
        out.append((root / name, fps))
    return out


@pytest.mark.parametrize("S", [28, 64, 224])
def test_video_pixels_and_timestamps_equal_the_reference(clips, S):
    for path, _ in clips + [(SAMPLE, 4)]:
        for mean, std in ((CLIP_MEAN, CLIP_STD), OTHER):
            px, ts = load_video(path, S, mean, std)
            ref_px, ref_ts = reference_video(path, S, mean=mean, std=std)
            assert px.dtype == np.float32 and px.shape == ref_px.shape == (len(ref_ts), 3, S, S)
            assert np.array_equal(px, ref_px), path
            assert ts.dtype == np.float64 and np.array_equal(ts, ref_ts), path


def test_video_fps_and_max_frames_follow_the_reference(clips):
    for path, _ in [c for c in clips if c[0].stem != "hd"] + [(SAMPLE, 4)]:
        for fps, max_frames in ((2.0, None), (100.0, None), (1.0, 1), (4.0, 5), (1.0, 1000)):
            px, ts = load_video(path, 28, CLIP_MEAN, CLIP_STD, fps=fps, max_frames=max_frames)
            ref_px, ref_ts = reference_video(path, 28, fps, max_frames)
            assert np.array_equal(px, ref_px) and np.array_equal(ts, ref_ts), (path, fps, max_frames)
    with pytest.raises(ValueError, match="max_frames must be >= 1 or None, got 0"):
        load_video(SAMPLE, 28, CLIP_MEAN, CLIP_STD, max_frames=0)
    with pytest.raises(ValueError, match="fps must be > 0, got 0"):
        load_video(SAMPLE, 28, CLIP_MEAN, CLIP_STD, fps=0)


def test_iter_video_streams_one_frame_at_a_time(clips):
    path = clips[1][0]
    stream = iter_video(path, 28, CLIP_MEAN, CLIP_STD)
    px, t = next(stream)                                    # the first frame before the file is read through
    assert px.shape == (3, 28, 28) and px.dtype == np.float32 and t == 0.0
    stream.close()                                          # stopping early closes the container
    ref_px, ref_ts = reference_video(path, 28)
    got = list(iter_video(path, 28, CLIP_MEAN, CLIP_STD))
    assert np.array_equal(np.stack([p for p, _ in got]), ref_px) and [t for _, t in got] == ref_ts.tolist()


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "empty.mp4").write_bytes(b"")
    (root / "notes.mp4").write_text("these are words, not a video\n" * 20)
    (root / "noise.mkv").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with av.open(str(root / "speech.m4a"), "w") as container:
        add_silent_audio(container)
    with av.open(str(root / "no_pictures.mkv"), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        add_silent_audio(container)
    for suffix in (".mp4", ".mkv"):
        whole = root / f"whole{suffix}"
        ref_video.write_video(whole, moving_frames(40, 32, 32), 4)
        data = whole.read_bytes()
        (root / f"cut{suffix}").write_bytes(data[: len(data) * 6 // 10])
    (root / "index_cut.mp4").write_bytes((root / "whole.mp4").read_bytes()[:200])
    return {"missing": root / "nope.mp4", "directory": root, **{p.stem: p for p in root.iterdir()}}


@pytest.mark.parametrize("case, fragment", [
    ("missing", "no such file"), ("directory", "a directory"), ("empty", "empty (0-byte)"),
    ("notes", "cannot parse"), ("noise", "container"), ("speech", "only audio stream(s)"),
    ("no_pictures", "at least one decodable frame"), ("cut", "truncated"), ("index_cut", "expected"),
])
def test_bad_files_raise_the_references_video_errors(bad_files, case, fragment):
    paths = [bad_files[case]] + ([bad_files["cut"].with_suffix(".mkv")] if case == "cut" else [])
    for path in paths:
        with pytest.raises(ref_video.VideoError) as ref:
            ref_video.load_video(path)
        for kwargs in ({}, {"max_frames": 2}):
            with pytest.raises(VideoError) as ours:
                load_video(path, 28, CLIP_MEAN, CLIP_STD, **kwargs)
            assert isinstance(ours.value, ValueError) and not isinstance(ours.value, ref_video.VideoError)
            assert str(ours.value) == str(ref.value)
            assert str(path) in str(ours.value) and "expected" in str(ours.value) and fragment in str(ours.value)


def test_truncated_file_streams_its_frames_then_raises_unless_partial(bad_files):
    cut = bad_files["cut"]
    ref = ref_video.load_video(cut, allow_partial=True)
    got = []
    with pytest.raises(VideoError, match="allow_partial=True"):
        for px, t in iter_video(cut, 28, CLIP_MEAN, CLIP_STD):
            got.append(px)
    assert np.array_equal(np.stack(got), preprocess_video(ref.frames, 28).numpy())
    px, ts = load_video(cut, 28, CLIP_MEAN, CLIP_STD, allow_partial=True)
    assert np.array_equal(px, preprocess_video(ref.frames, 28).numpy()) and np.array_equal(ts, ref.timestamps)
    with pytest.raises(VideoError, match="truncated"):                # max_frames: raised before any frame
        next(iter_video(cut, 28, CLIP_MEAN, CLIP_STD, max_frames=2))


def test_stream_without_a_declared_rate_measures_it(clips, monkeypatch):
    path = clips[0][0]                                      # 4 fps
    monkeypatch.setattr(media, "_declared_fps", lambda stream: None)
    monkeypatch.setattr(ref_video, "_declared_fps", lambda stream: None)
    px, ts = load_video(path, 28, CLIP_MEAN, CLIP_STD)
    ref_px, ref_ts = reference_video(path, 28)
    assert len(ts) == 4 and np.array_equal(px, ref_px) and np.array_equal(ts, ref_ts)


# ---- load_media ------------------------------------------------------------------------------------
def test_load_media_takes_every_kind_of_input_as_the_reference(tmp_path, clips):
    S, args = 28, (28, CLIP_MEAN, CLIP_STD)
    x = random_image(30, 50, seed=9)
    Image.fromarray(x).save(tmp_path / "still.png")
    image_ref = preprocess(x, S, True).numpy()[None]
    for media_in in (tmp_path / "still.png", str(tmp_path / "still.png"), Image.fromarray(x), x):
        assert np.array_equal(load_media(media_in, *args, pad_to_square=True), image_ref)
    assert np.array_equal(load_media(x, *args, pad_to_square=False), preprocess(x, S, False).numpy()[None])
    frames = moving_frames(3, 30, 50)
    assert np.array_equal(load_media(frames, *args, pad_to_square=True), preprocess_video(frames, S).numpy())
    path, _ = clips[0]
    assert np.array_equal(load_media(path, *args, pad_to_square=True), reference_video(path, S)[0])
    assert np.array_equal(load_media(path, *args, pad_to_square=True, fps=2.0), reference_video(path, S, 2.0)[0])
    ready = np.random.default_rng(0).standard_normal((4, 3, S, S)).astype(np.float32)
    assert np.array_equal(load_media(ready, *args, pad_to_square=True), ready)
    assert np.array_equal(load_media(ready[0], *args, pad_to_square=True), ready[:1])


def test_animated_images_are_decoded_as_videos(tmp_path):
    frames = moving_frames(6, 32, 48)
    gif = tmp_path / "moving.gif"
    Image.fromarray(frames[0]).save(gif, save_all=True, append_images=[Image.fromarray(f) for f in frames[1:]],
                                    duration=250, loop=0)
    px = load_media(gif, 28, CLIP_MEAN, CLIP_STD, pad_to_square=True)
    ref_px, _ = reference_video(gif, 28)                    # FFmpeg's frames, sampled at 1 fps: 0 and 4
    assert px.shape == (2, 3, 28, 28) and np.array_equal(px, ref_px)
    still = tmp_path / "still.gif"
    Image.fromarray(frames[0]).save(still)
    with Image.open(still) as image:
        expected = preprocess(image, 28, True).numpy()[None]
    assert np.array_equal(load_media(still, 28, CLIP_MEAN, CLIP_STD, pad_to_square=True), expected)


def test_load_media_errors_name_what_was_expected_and_found(tmp_path):
    args = (28, CLIP_MEAN, CLIP_STD, True)
    with pytest.raises(ValueError, match=r"expected \[T,3,28,28\] float32, found \[2, 3, 32, 32\]"):
        load_media(np.zeros((2, 3, 32, 32), np.float32), *args)
    with pytest.raises(ValueError, match=r"expected \[T,3,28,28\] float32, found \[0, 3, 28, 28\]"):
        load_media(np.zeros((0, 3, 28, 28), np.float32), *args)
    with pytest.raises(ValueError, match=r"expected uint8 \[H,W,3\], found float64 \[4, 4\]"):
        load_media(np.zeros((4, 4)), *args)
    with pytest.raises(ValueError, match=r"video frames: expected uint8 \[T>0,H,W,3\], found float64 \[2, 4, 4, 3\]"):
        load_media(np.zeros((2, 4, 4, 3)), *args)
    with pytest.raises(TypeError, match="expected a PIL image or uint8 \\[H,W,3\\] array, found list"):
        load_media([1, 2], *args)
    (tmp_path / "corrupt.png").write_bytes(b"not a picture\n" * 50)
    for path, fragment in ((tmp_path / "missing.mp4", "no such file"), (tmp_path, "a directory"),
                           (tmp_path / "corrupt.png", "at least one decodable frame")):
        with pytest.raises(VideoError, match="expected") as e:
            load_media(path, *args)
        assert str(path) in str(e.value) and fragment in str(e.value) and "found" in str(e.value)


# ---- no torch --------------------------------------------------------------------------------------
BLOCKER = """
import importlib.abc, importlib.util, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'llamavid_ref', 'export'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
def load(name):
    spec = importlib.util.spec_from_file_location('runtime_' + name, 'runtime/' + name + '.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
"""


def run_without_torch(code: str) -> str:
    """Run code in a fresh interpreter where torch, llamavid_ref and export cannot be imported (load(name)
    imports runtime/<name>.py on its own, not through the runtime package) -> its stdout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", BLOCKER + code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_media_needs_no_torch():
    out = run_without_torch("""
import numpy as np
media = load('media')
px, ts = media.load_video('llamavid_ref/default_model/sample.mp4', 64, (0.5,) * 3, (0.25,) * 3)
x = media.load_media(np.zeros((5, 9, 3), np.uint8), 28, (0.5,) * 3, (0.25,) * 3, True)
assert not any(m.split('.')[0] in ('torch', 'llamavid_ref', 'export') for m in sys.modules)
print(px.shape, x.shape)
""")
    assert out.strip() == "(8, 3, 64, 64) (1, 3, 28, 28)"
