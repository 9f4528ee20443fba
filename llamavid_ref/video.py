"""Video decoding with LLaMA-VID's frame sampling, and a small writer for tests and synthetic data.

    file --PyAV demux+decode (sequential)--> frame i --keep if i % step == 0--> [T, H, W, 3] uint8 RGB

The release samples with decord: step = round(avg_fps / fps) and keeps frames 0, step, 2*step, ...
below the frame count (so 1 frame per second at fps=1). Python's round() is used on purpose: it
rounds halves to even, so a 2.5 fps source keeps every 2nd frame and a 3.5 fps source every 4th,
exactly as the release does. The step is at least 1 (the release divides by zero below 0.5 fps).
Frames are counted while decoding; what the container declares (its duration) is only used to
notice a file that ends early.
"""
from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np


class VideoError(ValueError):
    """A video file that cannot be loaded; the message names the path, what was expected and found."""


@dataclass
class VideoFrames:
    frames: np.ndarray      # [T, H, W, 3] uint8 RGB
    timestamps: np.ndarray  # [T] float64, seconds since the first decoded frame
    source_fps: float       # the stream's average rate that set the step (nan if unknown)
    indices: np.ndarray     # [T] int64, indices of the kept frames among all decoded frames
    partial: bool = False   # True when allow_partial kept the frames decoded before an error

    def __len__(self) -> int:
        return len(self.frames)


def sample_step(source_fps: float | None, fps: float = 1.0) -> int:
    """Frames to advance between kept frames: the release's round(avg_fps / fps), at least 1."""
    if source_fps is None or not source_fps > 0:  # unknown or nan rate: keep every frame
        return 1
    return max(1, round(source_fps / fps))


def subsample_uniform(n: int, max_frames: int | None) -> np.ndarray:
    """Positions 0..n-1 thinned to at most max_frames, evenly spaced, first and last kept."""
    if max_frames is None or n <= max_frames:
        return np.arange(n)
    if max_frames == 1:
        return np.zeros(1, dtype=np.int64)
    return np.linspace(0, n - 1, max_frames).round().astype(np.int64)


def _fail(path, expected: str, found: str, hint: str = "") -> VideoError:
    return VideoError(f"{os.fspath(path)}: expected {expected}, found {found}" + (f"; {hint}" if hint else ""))


def _declared_fps(stream) -> float | None:
    """The stream's average rate, as decord reports it, else the rate FFmpeg guesses."""
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            return float(rate)
    return None


def _measured_fps(head) -> float | None:
    """Rate from the presentation times of the first two decoded frames."""
    if len(head) == 2 and head[0].time is not None and head[1].time is not None:
        dt = head[1].time - head[0].time
        if dt > 0:
            return 1.0 / dt
    return None


def _shortfall(container, stream, decoded: int, last_time, rate) -> str | None:
    """How far decoding ended before the end the file declares, if by more than max(0.5 s,
    2 frames) (B-frame delays and rounding), else None. The frame count in the header is not
    used: edit lists make it overstate what decodes."""
    if last_time is None or not rate:
        return None
    if stream.duration and stream.time_base:
        declared = float(((stream.start_time or 0) + stream.duration) * stream.time_base)
    elif container.duration and len(container.streams) == 1:  # only then is it the video's length
        declared = ((container.start_time or 0) + container.duration) / av.time_base
    else:
        return None
    decoded_end = last_time + 1.0 / rate
    if decoded_end < declared - max(0.5, 2.0 / rate):
        return (f"a stream that ends after {decoded} frames, at {decoded_end:.2f} s, where the file "
                f"declares {declared:.2f} s")
    return None


def _open_video_stream(path):
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


def load_video(path, fps: float = 1.0, max_frames: int | None = None,
               allow_partial: bool = False) -> VideoFrames:
    """Decode `path` and keep frames 0, step, 2*step, ... with step = max(1, round(avg_fps / fps)).

    max_frames: if more frames are kept, thin them uniformly (first and last kept); None = no cap,
    like the release CLI. allow_partial: when decoding fails part-way, return the frames decoded
    before the error (marked partial=True) instead of raising.
    """
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1 or None, got {max_frames}")
    path = os.fspath(path)
    container, stream = _open_video_stream(path)
    codec = f"video stream ({stream.codec_context.name})"
    kept, times, indices = [], [], []
    decoded, problem, last_time = 0, None, None
    source_fps = _declared_fps(stream)
    with container:
        try:
            frames = container.decode(stream)
            if source_fps is None:
                head = list(itertools.islice(frames, 2))
                source_fps = _measured_fps(head)
                frames = itertools.chain(head, frames)
            step = sample_step(source_fps, fps)
            for frame in frames:
                if decoded % step == 0:
                    kept.append(frame.to_ndarray(format="rgb24"))  # [H, W, 3]
                    times.append(frame.time)
                    indices.append(decoded)
                decoded += 1
                last_time = frame.time
        except av.FFmpegError as err:
            where = f"after {decoded} frames" if decoded else "before the first frame"
            problem = f"a decode error {where} ({err})"
        if problem is None and decoded:
            problem = _shortfall(container, stream, decoded, last_time, source_fps)

    if decoded == 0:
        raise _fail(path, f"a {codec} with at least one decodable frame", problem or "no frames at all")
    if problem is not None and not allow_partial:
        raise _fail(path, f"a complete {codec}", problem,
                    "the file looks truncated or corrupt; pass allow_partial=True to keep the "
                    f"{decoded} frames decoded before that")

    pick = subsample_uniform(len(kept), max_frames)
    rate = source_fps or math.nan
    t0 = times[0] if times[0] is not None else 0.0
    seconds = [(t - t0) if t is not None else i / rate for t, i in zip(times, indices)]
    return VideoFrames(
        frames=np.stack([kept[i] for i in pick]),                      # [T, H, W, 3]
        timestamps=np.asarray(seconds, dtype=np.float64)[pick],      # [T]
        source_fps=float(rate),
        indices=np.asarray(indices, dtype=np.int64)[pick],           # [T]
        partial=problem is not None,
    )


def _encoder() -> str:
    try:
        av.codec.Codec("libx264", "w")
        return "libx264"
    except av.codec.codec.UnknownCodecError:
        return "mpeg4"


def write_video(path, frames: np.ndarray, fps: float, codec: str | None = None, crf: int = 18) -> str:
    """Write uint8 RGB frames [T, H, W, 3] (H, W even) as H.264/yuv420p, or MPEG-4 Part 2 when
    libx264 is absent (or codec="mpeg4"). crf sets H.264 quality (lower is closer; 18 is near
    visually lossless). Returns the codec used. The output is byte-identical for identical input.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"expected uint8 frames [T>0, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs even frame sizes, got {height}x{width} (H x W)")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    codec = codec or _encoder()
    # No B-frames: libx264's B-frames came out different from run to run under CPU load here.
    options = {"crf": str(crf), "x264-params": "bframes=0"} if codec == "libx264" else {}
    path = os.fspath(path)
    # faststart puts the MP4 index first, so a file cut short still opens and decodes part-way.
    mp4 = os.path.splitext(path)[1].lower() in (".mp4", ".mov", ".m4v")
    with av.open(path, "w", options={"movflags": "faststart"} if mp4 else {}) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001), options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "mpeg4":  # fixed quantiser 2 (ffmpeg's -q:v 2) instead of a 200 kb/s bit rate
            stream.codec_context.qscale = True
            stream.codec_context.global_quality = 2 * 118  # FF_QP2LAMBDA
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder's lookahead
            container.mux(packet)
    return codec
