"""The runtime's own media preprocessing (numpy, Pillow for image files, PyAV for video; no torch), equal
bit for bit to the reference's (llamavid_ref.preprocess, llamavid_ref.video) on the pinned Pillow.

    image (PIL, any mode / uint8 [H,W,3]) --to_rgb--> uint8 [H,W,3] --expand_to_square (images only)-->
      --resize shortest side to S (Pillow's bicubic, in numpy) and center crop S x S, computing only the
        kept pixels--> uint8 [S,S,3] --/255, (x - mean) / std in float32 (one 256-entry table per channel)-->
      pixel_values [3,S,S] float32

    video file --PyAV decode--> frame i --keep if i % step == 0, step = max(1, round(avg_fps / fps))-->
      rgb24 [H,W,3] --preprocess_frame (not padded)--> [3,S,S]   (one frame at a time: iter_video)

Pillow's bicubic resize, as Pillow 13 runs it (src/libImaging/Resample.c), for 8-bit RGB:
- per output pixel o of an axis (in -> out pixels, scale = in / out, fs = max(scale, 1)):
  center = (o + 0.5) * scale, taps first = max(0, int(center - 2 fs + 0.5)) up to
  min(in, int(center + 2 fs + 0.5)), weight of tap x = cubic((x - center + 0.5) / fs) with Keys'
  cubic (a = -0.5, support 2), normalised to sum 1 (summed in tap order), then fixed point with 22
  fractional bits, rounded half away from zero;
- a pass: sum of uint8 * coefficient + 2^21, shifted right by 22, clipped to 0..255 (uint8 after
  each pass); a pass is skipped when its axis keeps its size;
- pass order: horizontal first, except that Pillow 13 runs the vertical pass first when the height
  shrinks by more than twice as many pixels as the width does (older Pillow always went horizontal
  first; the order changes the rounding between passes, so it is part of the contract).
Here each pass is a few float64 matrix products over bands of the banded coefficient matrix: every
product and partial sum is an integer below 2^53, so the float64 sums are exact and the result is
Pillow's whatever order BLAS adds in.
"""
from __future__ import annotations

import itertools
import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import av
import numpy as np
from PIL import Image, UnidentifiedImageError

PRECISION_BITS = 22      # fractional bits of Pillow's 8-bit resampling coefficients


# ---- colour ----------------------------------------------------------------------------------------
def to_rgb(image) -> np.ndarray:
    """Any PIL image or uint8 [H,W,3] array -> uint8 [H,W,3] RGB. Grey, palette, RGBA (alpha dropped),
    CMYK, YCbCr, LAB, HSV and 16-bit or 32-bit integer / float images are converted as the reference
    converts them; anything else is an error naming what was found."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image array: expected uint8 [H,W,3], found {image.dtype} {list(image.shape)}")
        return image
    if not isinstance(image, Image.Image):
        raise TypeError(f"image: expected a PIL image or uint8 [H,W,3] array, found {type(image).__name__}")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):       # to 8-bit grey: 16-bit by 65535, else by the max
        a = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(a.max()), 1.0)
        grey = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)          # [H,W]
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode not in ("RGB", "L", "LA", "P", "PA", "RGBA", "RGBX", "CMYK", "YCbCr", "1", "LAB", "HSV"):
        raise ValueError(f"image: expected an RGB, grey, palette or 8/16-bit image, found mode {image.mode!r}")
    return np.asarray(image.convert("RGB"))


def expand_to_square(rgb: np.ndarray, mean) -> np.ndarray:
    """uint8 [H,W,3] -> [side,side,3]: the shorter side padded on both sides with the mean colour
    (int(m * 255) per channel), the image at ((side - W) // 2, (side - H) // 2) (LLaVA's expand2square)."""
    h, w = rgb.shape[:2]
    if h == w:
        return rgb
    side = max(h, w)
    out = np.empty((side, side, 3), np.uint8)
    out[:] = [int(m * 255) for m in mean]
    top, left = (side - h) // 2, (side - w) // 2
    out[top:top + h, left:left + w] = rgb
    return out


# ---- Pillow's bicubic resampling ------------------------------------------------------------------
def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel, a = -0.5, support 2 (Pillow's operation order)."""
    x = np.abs(x)
    near = (1.5 * x - 2.5) * x * x + 1.0                      # |x| < 1: ((a+2)|x| - (a+3)) x^2 + 1
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * -0.5            # 1 <= |x| < 2
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@lru_cache(maxsize=64)
def _coefficients(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """in -> out pixels of one axis: first tap [out] int64, taps [out] int64 and fixed-point
    coefficients [out, K] int64 (K = the widest window, zero past each window's end)."""
    scale = n_in / n_out
    fs = max(scale, 1.0)
    support = 2.0 * fs
    k = int(math.ceil(support)) * 2 + 1
    center = (np.arange(n_out) + 0.5) * scale                                # [out]
    first = np.maximum((center - support + 0.5).astype(np.int64), 0)         # int() truncates, as in C
    count = np.minimum((center + support + 0.5).astype(np.int64), n_in) - first
    taps = np.arange(k)
    w = _cubic(((first[:, None] + taps) - center[:, None] + 0.5) * (1.0 / fs))   # [out, K]
    w[taps >= count[:, None]] = 0.0
    total = np.zeros(n_out)
    for j in range(k):                                    # summed in tap order, as Pillow does
        total += w[:, j]
    w = np.divide(w, total[:, None], out=w, where=total[:, None] != 0.0)
    fixed = np.trunc(w * (1 << PRECISION_BITS) + np.where(w < 0, -0.5, 0.5))   # half away from zero
    return first, count, fixed.astype(np.int64)


@lru_cache(maxsize=64)
def _band_plan(n_in: int, n_out: int, start: int, stop: int, horizontal: bool) -> tuple[int, int, list]:
    """Outputs start..stop-1 of one axis -> (lo, hi, bands): the input pixels lo..hi-1 they read, and
    bands (o0, o1, i0, i1, M): outputs o0..o1-1 (from start) = M [o1-o0, i1-i0] float64 @ inputs
    i0..i1-1 (from lo); for the horizontal pass M is kron(M^T, I3) [3(i1-i0), 3(o1-o0)], which keeps
    RGB interleaved (outputs = inputs @ M). A band holds a few outputs, so M is mostly taps, not zeros."""
    first, count, fixed = (a[start:stop] for a in _coefficients(n_in, n_out))
    last = first + count                                                      # window ends (exclusive)
    lo, hi = int(first.min()), int(last.max())
    scale = n_in / n_out
    per_band = max(2, int(4 / scale))    # 2 outputs when shrinking (measured fastest), ~4 inputs when growing
    bands = []
    for o0 in range(0, stop - start, per_band):
        o1 = min(o0 + per_band, stop - start)
        i0, i1 = int(first[o0:o1].min()) - lo, int(last[o0:o1].max()) - lo
        m = np.zeros((o1 - o0, i1 - i0))
        for r, o in enumerate(range(o0, o1)):
            m[r, first[o] - lo - i0: last[o] - lo - i0] = fixed[o, :count[o]]
        bands.append((o0, o1, i0, i1, np.kron(m.T, np.eye(3)) if horizontal else m))
    return lo, hi, bands


def _to_uint8_range(s: np.ndarray) -> np.ndarray:
    """Exact fixed-point sums -> (s + 2^21) >> 22 clipped to 0..255, in place (float64 holding integers)."""
    s += 1 << (PRECISION_BITS - 1)
    s *= 2.0 ** -PRECISION_BITS
    np.floor(s, out=s)
    return np.clip(s, 0, 255, out=s)


def _vertical(x: np.ndarray, bands: list, n_out: int) -> np.ndarray:
    """x [rows, C] float64 -> [n_out, C]: each band's outputs = M @ its input rows."""
    out = np.empty((n_out, x.shape[1]))
    for o0, o1, i0, i1, m in bands:
        np.matmul(m, x[i0:i1], out=out[o0:o1])
    return _to_uint8_range(out)


def _horizontal(x: np.ndarray, bands: list, n_out: int) -> np.ndarray:
    """x [R, cols*3] float64 (RGB interleaved) -> [R, n_out*3]: each band's outputs = its input columns @
    kron(M^T, I3) (the channels stay interleaved, so the decoded frame is never transposed)."""
    out = np.empty((x.shape[0], n_out * 3))
    for o0, o1, i0, i1, m in bands:
        out[:, 3 * o0:3 * o1] = x[:, 3 * i0:3 * i1] @ m
    return _to_uint8_range(out)


def resize_bicubic(rgb: np.ndarray, width: int, height: int, crop: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """uint8 [H,W,3] -> Pillow 13's Image.resize((width, height), Image.BICUBIC), bit for bit, as uint8
    [h,w,3]; with crop = (left, top, right, bottom) only that box of the result is computed and returned
    (every output pixel reads only its own window, so the box is exactly the full result's box)."""
    H, W = rgb.shape[:2]
    left, top, right, bottom = crop or (0, 0, width, height)
    if not (0 <= left < right <= width and 0 <= top < bottom <= height):
        raise ValueError(f"resize crop: expected a box inside {width}x{height}, found {(left, top, right, bottom)}")
    if (width, height) == (W, H):
        return rgb[top:bottom, left:right]
    cols = _band_plan(W, width, left, right, True) if width != W else (left, right, None)
    rows = _band_plan(H, height, top, bottom, False) if height != H else (top, bottom, None)
    x = rgb[rows[0]:rows[1], cols[0]:cols[1]].astype(np.float64)       # [h_in, w_in, 3]: the pixels read
    x = x.reshape(x.shape[0], -1)                                       # [h_in, w_in*3]
    def horizontal(x):
        return x if cols[2] is None else _horizontal(x, cols[2], right - left)

    def vertical(x):
        return x if rows[2] is None else _vertical(x, rows[2], bottom - top)

    vertical_first = H - height > 0 and H - height > 2 * (W - width)    # Pillow 13's pass order
    x = horizontal(vertical(x)) if vertical_first else vertical(horizontal(x))
    return x.astype(np.uint8).reshape(bottom - top, right - left, 3)


# ---- preprocessing ---------------------------------------------------------------------------------
@lru_cache(maxsize=16)
def _normalizer(mean: tuple, std: tuple) -> np.ndarray:
    """[3,256] float32: for channel c and level v, (float32(v) / 255 - mean[c]) / std[c], computed with
    the reference's float32 operations, so a table lookup gives its values exactly."""
    levels = np.arange(256, dtype=np.float32)[:, None] / 255.0                      # [256,1]
    table = (levels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)    # [256,3]
    return np.ascontiguousarray(table.T)


def resize_center_crop(rgb: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H,W,3] -> [S,S,3]: the shortest side resized to S (the long side to int(S * long / short)),
    then the centre S x S (the reference's rule), computing only the kept pixels."""
    h, w = rgb.shape[:2]
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    nw, nh = (size, new_long) if w <= h else (new_long, size)
    top, left = (nh - size) // 2, (nw - size) // 2
    return resize_bicubic(rgb, nw, nh, (left, top, left + size, top + size))


def normalize(rgb: np.ndarray, mean, std) -> np.ndarray:
    """uint8 [S,S,3] -> (x / 255 - mean) / std as float32 [3,S,S]."""
    table = _normalizer(tuple(mean), tuple(std))                       # [3,256]
    out = np.empty((3, *rgb.shape[:2]), np.float32)
    for c in range(3):
        np.take(table[c], rgb[..., c], out=out[c])
    return out


def preprocess_frame(rgb: np.ndarray, size: int, mean, std) -> np.ndarray:
    """A video frame, uint8 [H,W,3] RGB -> pixel values [3,S,S] float32 (frames are not padded)."""
    return normalize(resize_center_crop(to_rgb(rgb), size), mean, std)


def preprocess_image(image, size: int, pad_to_square: bool, mean, std) -> np.ndarray:
    """An image (PIL, any mode, or uint8 [H,W,3]) -> pixel values [3,S,S] float32; pad_to_square pads it
    with the mean colour first (image_aspect_ratio "pad")."""
    rgb = to_rgb(image)
    if pad_to_square:
        rgb = expand_to_square(rgb, mean)
    return normalize(resize_center_crop(rgb, size), mean, std)


# ---- video -----------------------------------------------------------------------------------------
class VideoError(ValueError):
    """A video file that cannot be loaded; the message names the path, what was expected and found."""


def _fail(path, expected: str, found: str, hint: str = "") -> VideoError:
    return VideoError(f"{os.fspath(path)}: expected {expected}, found {found}" + (f"; {hint}" if hint else ""))


def sample_step(source_fps: float | None, fps: float) -> int:
    """Frames between kept frames: the release's round(avg_fps / fps) (Python's round: halves to even),
    at least 1; every frame when the rate is unknown."""
    if source_fps is None or not source_fps > 0:
        return 1
    return max(1, round(source_fps / fps))


def subsample_uniform(n: int, max_frames: int | None) -> np.ndarray:
    """Positions 0..n-1 thinned to at most max_frames, evenly spaced, first and last kept."""
    if max_frames is None or n <= max_frames:
        return np.arange(n)
    if max_frames == 1:
        return np.zeros(1, dtype=np.int64)
    return np.linspace(0, n - 1, max_frames).round().astype(np.int64)


def _declared_fps(stream) -> float | None:
    """The stream's average rate (what the release's decord reports), else the rate FFmpeg guesses."""
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            return float(rate)
    return None


def _shortfall(container, stream, decoded: int, last_time, rate) -> str | None:
    """How far decoding ended before the end the file declares, when by more than max(0.5 s, 2 frames),
    else None (the header's frame count is not used: edit lists make it overstate what decodes)."""
    if last_time is None or not rate:
        return None
    if stream.duration and stream.time_base:
        declared = float(((stream.start_time or 0) + stream.duration) * stream.time_base)
    elif container.duration and len(container.streams) == 1:      # only then is it the video's length
        declared = ((container.start_time or 0) + container.duration) / av.time_base
    else:
        return None
    decoded_end = last_time + 1.0 / rate
    if decoded_end < declared - max(0.5, 2.0 / rate):
        return (f"a stream that ends after {decoded} frames, at {decoded_end:.2f} s, where the file "
                f"declares {declared:.2f} s")
    return None


def _open(path: str):
    if not os.path.exists(path):
        raise _fail(path, "an existing video file", "no such file or directory")
    if os.path.isdir(path):
        raise _fail(path, "a video file", "a directory")
    if os.path.getsize(path) == 0:
        raise _fail(path, "a video file", "an empty (0-byte) file")
    try:
        container = av.open(path, metadata_errors="replace")    # tags that are not UTF-8 must not stop decoding
    except av.FFmpegError as err:
        raise _fail(path, "a video container FFmpeg can read", f"data it cannot parse ({err})",
                    "the file is not a video or its container is corrupt") from err
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams})
        container.close()
        if kinds:
            raise _fail(path, "a video stream", f"only {', '.join(kinds)} stream(s)")
        raise _fail(path, "a video stream", "no streams at all",
                    "an MP4 cut short before its index (moov atom) looks like this")
    stream = container.streams.video[0]
    if stream.codec_context is None:                    # a codec id FFmpeg has no decoder for (or a damaged header)
        container.close()
        raise _fail(path, "a video stream FFmpeg can decode", "one whose codec it does not know",
                    "the file is damaged or uses a codec this FFmpeg build lacks")
    stream.thread_type = "AUTO"
    return container, stream


def _kept_frames(path: str, fps: float, allow_partial: bool) -> Iterator[tuple[av.VideoFrame, float]]:
    """Decode `path` and yield (frame, seconds since the first frame) for frames 0, step, 2*step, ...
    A file that ends early or fails to decode raises VideoError after the frames decoded before that
    (unless allow_partial); one with no decodable frame raises at once."""
    container, stream = _open(path)
    codec = f"video stream ({stream.codec_context.name})"
    decoded, problem, last_time, t0 = 0, None, None, None
    rate = _declared_fps(stream)
    with container:
        try:
            frames = container.decode(stream)
            if rate is None:                         # no declared rate: measure it from the first two frames
                head = list(itertools.islice(frames, 2))
                if len(head) == 2 and head[0].time is not None and head[1].time is not None \
                        and head[1].time > head[0].time:
                    rate = 1.0 / (head[1].time - head[0].time)
                frames = itertools.chain(head, frames)
            step = sample_step(rate, fps)
            for frame in frames:
                if decoded == 0:
                    t0 = frame.time if frame.time is not None else 0.0
                if decoded % step == 0:
                    yield frame, (frame.time - t0 if frame.time is not None else decoded / (rate or math.nan))
                decoded += 1
                last_time = frame.time
        except av.FFmpegError as err:
            where = f"after {decoded} frames" if decoded else "before the first frame"
            problem = f"a decode error {where} ({err})"
        if problem is None and decoded:
            problem = _shortfall(container, stream, decoded, last_time, rate)
    if decoded == 0:
        raise _fail(path, f"a {codec} with at least one decodable frame", problem or "no frames at all")
    if problem is not None and not allow_partial:
        raise _fail(path, f"a complete {codec}", problem,
                    "the file looks truncated or corrupt; pass allow_partial=True to keep the "
                    f"{decoded} frames decoded before that")


def _check_sampling(fps, max_frames):
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1 or None, got {max_frames}")


def iter_video(path, size: int, mean, std, fps: float = 1.0, max_frames: int | None = None,
               allow_partial: bool = False) -> Iterator[tuple[np.ndarray, float]]:
    """Decode a video file and yield (pixel_values [3,S,S] float32, t seconds since the first frame) for
    the frames the reference keeps (step = max(1, round(avg_fps / fps))), each resized as it is decoded:
    a source-size frame is never held past its own preprocessing.

    max_frames thins the kept frames to that many, evenly spaced, first and last kept, as the reference
    does; the count must be known first, so the file is decoded twice: once to count (no colour
    conversion, no resize; a broken file fails here, before anything is yielded), then to convert and
    yield the chosen frames. Without max_frames, a file that turns out truncated or corrupt raises
    VideoError after the frames decoded before the damage were yielded (allow_partial: no error)."""
    _check_sampling(fps, max_frames)
    path = os.fspath(path)
    keep = None
    if max_frames is not None:
        count = sum(1 for _ in _kept_frames(path, fps, allow_partial))
        keep = set(subsample_uniform(count, max_frames).tolist())
    for i, (frame, t) in enumerate(_kept_frames(path, fps, allow_partial)):
        if keep is None or i in keep:
            yield preprocess_frame(frame.to_ndarray(format="rgb24"), size, mean, std), t


def load_video(path, size: int, mean, std, fps: float = 1.0, max_frames: int | None = None,
               allow_partial: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A video file -> (pixel_values [T,3,S,S] float32, timestamps [T] float64 seconds); a truncated or
    corrupt file raises VideoError and returns nothing (unless allow_partial)."""
    kept = list(iter_video(path, size, mean, std, fps, max_frames, allow_partial))
    return np.stack([px for px, _ in kept]), np.asarray([t for _, t in kept], np.float64)


# ---- any media -------------------------------------------------------------------------------------
def is_video_file(path) -> bool:
    """False for a still image Pillow reads; True for anything else: a video, an animated image (GIF, APNG:
    FFmpeg decodes them as videos), or a file Pillow cannot identify (the video decoder's error says why)."""
    try:
        with Image.open(path) as image:
            return getattr(image, "n_frames", 1) > 1
    except (UnidentifiedImageError, IsADirectoryError, FileNotFoundError):
        return True


def _load_file(path, size: int, mean, std, pad_to_square: bool, fps: float) -> np.ndarray:
    """An image file -> [1,3,S,S]; a video file or an animated image -> [T,3,S,S]."""
    if is_video_file(path):
        return load_video(path, size, mean, std, fps)[0]
    with Image.open(path) as image:
        return preprocess_image(image, size, pad_to_square, mean, std)[None]


def load_media(media, image_size: int, mean, std, pad_to_square: bool, fps: float = 1.0) -> np.ndarray:
    """Media -> pixel values [T,3,S,S] float32:
    - a video file path (decoded at `fps`, as the reference samples it);
    - an image file path (an animated one, GIF or APNG, is decoded as a video by FFmpeg: its frames,
      sampled at `fps`, not padded);
    - a PIL image or uint8 [H,W,3] array (an image: padded to square when pad_to_square);
    - uint8 [T,H,W,3] (video frames, not padded);
    - ready pixel values, float32 [3,S,S] or [T,3,S,S]."""
    S = image_size
    if isinstance(media, np.ndarray) and media.dtype == np.float32:
        px = media[None] if media.ndim == 3 else media
    elif isinstance(media, (str, Path)):
        px = _load_file(media, S, mean, std, pad_to_square, fps)
    elif isinstance(media, np.ndarray) and media.ndim == 4:
        if media.dtype != np.uint8 or media.shape[-1] != 3 or len(media) == 0:
            raise ValueError(f"video frames: expected uint8 [T>0,H,W,3], found {media.dtype} {list(media.shape)}")
        px = np.stack([preprocess_frame(f, S, mean, std) for f in media])
    else:
        px = preprocess_image(media, S, pad_to_square, mean, std)[None]
    if px.ndim != 4 or px.shape[1:] != (3, S, S) or len(px) == 0:
        raise ValueError(f"pixel values: expected [T,3,{S},{S}] float32, found {list(px.shape)}")
    return np.ascontiguousarray(px, dtype=np.float32)
