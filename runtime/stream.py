"""Live streams and hour-long video: frames pushed into a warm KV cache, questions at any time.

    s = Pipeline.open(dir).stream()                 # the C core's llamavid_stream (llamavid.h draws the layout)
    s.push(frame, t)                                # RGB uint8 [H,W,3] (resized now) or pixel values [3,S,S]
    for piece in s.ask("What just happened?"):      # frames may keep arriving from other threads meanwhile
        print(piece, end="")

    python -m runtime.stream --artifacts DIR --source FILE|URL|DEVICE [--fps 1] [--fast]
        reads a file at real-time pace (--fast: as fast as it decodes) or any live source PyAV opens
        (rtsp://..., /dev/video0 as V4L2, a pipe), takes questions on stdin, prints answers with the stream time.

Each frame is encoded once, with a fixed ingest instruction as the Q-Former prompt (the warm tier: valid for
any question); at question time the last focus_frames frames' context tokens are recomputed from their kept
vision features with the question (the focus tier), the answer is generated, and the cache is rolled back.
Past the window, the oldest frames are evicted and the later keys re-rotated (the prefix stays as sinks).
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from collections import deque
from typing import Iterator

import numpy as np

from . import _llamavid, media, text
from .pipeline import check_question

INGEST = "describe the video ."   # the warm tier's fixed Q-Former prompt: the best generic one on val (docs/BENCHMARKS.md)
QUESTION = "\x00question\x00"                   # where the question goes in the prompt text


class Stream:
    def __init__(self, pipe, *, fps: float | None = None, n_ctx: int | None = None, focus_frames: int = 8,
                 focus_replace: bool = True, reserve: int = 64, evict_frames: int = 16, ingest: str = INGEST,
                 long_video: bool = False, max_subtitle: int = 64, feature_budget_mib: float | None = None):
        """fps: keep frames at this rate by their times (None: every pushed frame); n_ctx: KV positions (default:
        the model's context); focus_frames: the last frames re-encoded with each question (0: warm tier only);
        focus_replace: they replace their warm copies (else they follow them); reserve: positions kept for the
        question and answer; long_video: the release's movie prompt, frames followed by subtitles;
        feature_budget_mib: at most this much memory for the focus frames' kept vision features and tokens
        (fewer focus frames if needed; info()["feature_bytes"] reports it)."""
        self.p, self.fps, self.long_video = pipe, fps, long_video
        i = pipe.info
        per_frame = 4 * (i["vision_tokens"] * i["vision_width"] + i["tokens_per_frame"] * i["hidden"])
        if feature_budget_mib is not None:
            focus_frames = min(focus_frames, int(feature_budget_mib * 2 ** 20 // per_frame))
        prompt = pipe.manifest["prompt"]
        user = f"{prompt['long_video']['intro']}\n{prompt['image_placeholder']}" if long_video else prompt["media_prefix"]
        before, self._after = pipe.prompt_text([(0, user + QUESTION), (1, None)]).split(prompt["image_placeholder"], 1)
        if long_video:
            self._after = "\n" + prompt["long_video"]["outro"] + self._after.removeprefix("\n")
        prefix = np.asarray(pipe.encode_prompt(before), np.int32)
        ids, mask = pipe.qformer_tokenizer([ingest])
        self.core = _llamavid.Stream(pipe.core, prefix, ids, mask, n_ctx=n_ctx or 0, focus_frames=focus_frames,
                                     focus_replace=int(focus_replace), reserve=reserve, evict_frames=evict_frames,
                                     max_subtitle=max_subtitle if long_video else 0)
        self._lock = threading.Lock()            # the core stream: one call at a time
        self._asking = False
        self._backlog: deque = deque()           # frames pushed while a question is open
        self._next_t = None                      # fps sampling: the next time a frame is kept

    # ---- frames ----------------------------------------------------------------------------------------------------
    def pixels(self, frame) -> np.ndarray:
        """An RGB frame uint8 [H,W,3] (any size: resized to the model's input now) or ready float32 [3,S,S]."""
        p = self.p.manifest["preprocess"]
        S = p["image_size"]
        frame = np.asarray(frame)
        if frame.dtype == np.float32 and frame.shape == (3, S, S):
            return np.ascontiguousarray(frame)
        if frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3 and min(frame.shape[:2]) > 0:
            return media.preprocess_frame(frame, S, p["mean"], p["std"])
        raise ValueError(f"push: expected an RGB frame uint8 [H,W,3] or pixel values float32 [3,{S},{S}], found "
                         f"{frame.dtype} {list(frame.shape)}")

    def push(self, frame, t: float, subtitle: str | None = None) -> bool:
        """Add a frame at t seconds (not before the last frame's time). Returns whether it was kept (fps sampling).
        While a question is being answered the frame waits and goes in after the answer."""
        if self.fps:
            if self._next_t is not None and t < self._next_t:
                return False
            self._next_t = (t if self._next_t is None else self._next_t) + 1.0 / self.fps
        px = self.pixels(frame)
        sub = np.asarray(self.p.tokenizer.encode(subtitle), np.int32) if subtitle and self.long_video else None
        if not self._lock.acquire(blocking=False):
            self._backlog.append((px, t, sub))
            return True
        try:
            self._drain()
            self.core.push(px, float(t), sub)
        finally:
            self._lock.release()
        return True

    def _drain(self):
        while self._backlog:
            self.core.push(*self._backlog[0][:2], self._backlog[0][2])
            self._backlog.popleft()

    # ---- questions ---------------------------------------------------------------------------------------------------
    def ask(self, question: str, max_new_tokens: int = 64, **sampling) -> Iterator[str]:
        """Text pieces of the answer as they are generated (greedy, or do_sample with temperature, top_k, top_p,
        repetition_penalty, seed as Pipeline.generate). One question at a time per stream."""
        check_question(question, self.p.manifest["prompt"]["image_placeholder"])
        if not self._lock.acquire(blocking=False) or self._asking:
            raise RuntimeError("stream: a question is already being answered; ask again when its answer ends")
        self._asking = True
        try:
            self._drain()
            ids = np.asarray(self.p.tokenizer.encode(self._after.replace(QUESTION, question)), np.int32)
            q_ids, q_mask = self.p.qformer_tokenizer([question])
            self.core.begin(ids, q_ids, q_mask)
        except BaseException:
            self._asking = False
            self._lock.release()
            raise
        return self._answer(max_new_tokens, sampling)

    def _answer(self, max_new_tokens, sampling) -> Iterator[str]:
        try:
            yield from text.stream_text(self.p.tokenizer, self._tokens(max_new_tokens, **sampling), self.p.eos)
        finally:
            try:
                self.core.end()
                self._drain()
            finally:
                self._asking = False
                self._lock.release()

    def _tokens(self, max_new_tokens, do_sample=False, temperature=0.2, top_p=0.7, top_k=0, repetition_penalty=1.0,
                seed=0) -> Iterator[int]:
        sampler = _llamavid.Sampler(self.p.info["vocab_size"], temperature if do_sample else 0.0, top_k, top_p,
                                    repetition_penalty, seed)
        for _ in range(max_new_tokens):
            token = self.core.next(sampler)
            if token < 0:
                return
            yield token
            if token == self.p.eos:
                return

    def answer(self, question: str, max_new_tokens: int = 64, **sampling) -> str:
        return "".join(self.ask(question, max_new_tokens, **sampling))

    def flush(self):
        with self._lock:
            self._drain()
            self.core.flush()

    def info(self) -> dict:
        """Frames pushed, encoded, held and evicted, the times held, positions, KV and feature memory."""
        with self._lock:
            return self.core.info()

    def close(self):
        with self._lock:
            self.core.close()


# ---- python -m runtime.stream ------------------------------------------------------------------------------------------
def open_source(source: str):
    """A PyAV container for a file, URL (rtsp://, http://) or device (/dev/video*: V4L2), and its video stream."""
    import av
    options, fmt = {}, None
    if source.startswith("/dev/video"):
        fmt = "v4l2"
    elif source.startswith("rtsp://"):
        options = {"rtsp_transport": "tcp", "stimeout": "5000000"}
    try:
        container = av.open(source, format=fmt, options=options, timeout=10.0)
    except (av.FFmpegError, OSError) as e:
        raise ValueError(f"--source {source}: expected a video PyAV can open, found {e}") from None
    if not container.streams.video:
        raise ValueError(f"--source {source}: expected a video stream, found none")
    return container, container.streams.video[0]


def frames_of(container, video, realtime: bool) -> Iterator[tuple[np.ndarray, float]]:
    """(RGB uint8 [H,W,3], t seconds) from an opened source; a corrupt packet is skipped (counted), the end or a
    stall (no packet for the open timeout) ends the iteration with a message."""
    import av
    start, skipped, t0 = time.monotonic(), 0, None
    try:
        for packet in container.demux(video):
            try:
                decoded = packet.decode()
            except av.FFmpegError:
                skipped += 1
                continue
            for frame in decoded:
                t = float(frame.time) if frame.time is not None else time.monotonic() - start
                t0 = t if t0 is None else t0
                if realtime:
                    time.sleep(max(0.0, (t - t0) - (time.monotonic() - start)))
                yield frame.to_ndarray(format="rgb24"), t - t0
    except av.FFmpegError as e:
        print(f"[stream] source stopped: {e}", file=sys.stderr)
    finally:
        container.close()
        if skipped:
            print(f"[stream] {skipped} corrupt packet(s) skipped", file=sys.stderr)


def main(argv=None) -> int:
    from .pipeline import Pipeline
    ap = argparse.ArgumentParser(prog="python -m runtime.stream", description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", required=True, help="directory written by python -m export.build")
    ap.add_argument("--source", required=True, help="a video file, an rtsp:// or http:// URL, a V4L2 device, a pipe")
    ap.add_argument("--fps", type=float, default=1.0, help="frames kept per second of stream time")
    ap.add_argument("--fast", action="store_true", help="read a file as fast as it decodes, not at real-time pace")
    ap.add_argument("--focus-frames", type=int, default=8)
    ap.add_argument("--context", type=int, default=None, help="KV positions (default: the model's context)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    try:
        pipe = Pipeline.open(a.artifacts, threads=a.threads)
        stream = pipe.stream(fps=a.fps, n_ctx=a.context, focus_frames=a.focus_frames)
        container, video = open_source(a.source)
        done = threading.Event()
        errors: list[Exception] = []

        def ingest():
            try:
                for frame, t in frames_of(container, video, not a.fast):
                    stream.push(frame, t)
            except Exception as e:          # shown by the main thread
                errors.append(e)
            finally:
                done.set()

        threading.Thread(target=ingest, daemon=True).start()
        print(f"[{pipe.describe()}] questions on stdin, one per line", file=sys.stderr)
        for line in sys.stdin:
            if errors:
                break
            if line.strip():
                info = stream.info()
                print(f"[t={info['last_time']:.1f} s, {info['frames_held']} frames held] ", end="", flush=True)
                for piece in stream.ask(line.strip(), a.max_new_tokens):
                    print(piece, end="", flush=True)
                print()
        if errors:
            raise errors[0]
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
