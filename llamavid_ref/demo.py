"""python -m llamavid_ref.demo: the reference answers a question about a freshly generated clip.

Uses the default model when it is built (llamavid_ref/default_model), else a tiny random-weight
model (its answer is noise: it shows the plumbing, not the accuracy). Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from .checkpoint import DEFAULT_MODEL_DIR, load
from .video import load_video, write_video


def moving_square_clip(path: Path, seconds: int = 6, fps: int = 4, size: int = 64) -> Path:
    """A red square moving left to right on grey, written as H.264."""
    frames = np.full((seconds * fps, size, size, 3), 128, np.uint8)
    for t in range(len(frames)):
        x = 4 + t * (size - 20) // len(frames)
        frames[t, 24:40, x:x + 16] = (220, 30, 30)
    write_video(path, frames, fps)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--checkpoint", help="checkpoint directory (default: the shipped default model)")
    ap.add_argument("--video", help="a video file (default: a generated clip)")
    ap.add_argument("question", nargs="?", default="Which way does the red square move?")
    a = ap.parse_args(argv)
    if a.checkpoint or (DEFAULT_MODEL_DIR / "config.json").is_file():
        model, what = load(a.checkpoint), a.checkpoint or "the default model"
    else:
        from .tiny import tiny_model
        model, what = tiny_model(Path(tempfile.mkdtemp())), "a tiny random-weight model (default model not built)"
    video = Path(a.video) if a.video else moving_square_clip(Path(tempfile.mkdtemp()) / "clip.mp4")
    clip = load_video(video)
    t0 = time.perf_counter()
    answer = model.ask(clip.frames, a.question, max_new_tokens=32)
    print(f"model:    {what}\nvideo:    {video} ({len(clip.frames)} frames at 1 fps, "
          f"{model.config.tokens_per_frame} tokens each)\nquestion: {a.question}\nanswer:   {answer}\n"
          f"({time.perf_counter() - t0:.2f} s)")


if __name__ == "__main__":
    main()
