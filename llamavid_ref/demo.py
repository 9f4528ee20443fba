"""python -m llamavid_ref.demo: the reference answers a question about a freshly generated clip.

Uses the default model when it is built (llamavid_ref/default_model), else a tiny random-weight
model (its answer is noise: it shows the plumbing, not the accuracy). Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from .checkpoint import DEFAULT_MODEL_DIR, load_or_exit
from .video import load_video, write_video


def moving_square_clip(path: Path) -> Path:
    """A red square moving right and a still blue circle, drawn by the synthetic world's renderer
    (the default model's domain) and written as H.264."""
    from .data import world
    sprites = [world.Sprite("square", "red", x=16, y=20, motion="right"), world.Sprite("circle", "blue", x=40, y=48)]
    write_video(path, world.render(sprites), world.SOURCE_FPS)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--checkpoint", help="checkpoint directory (default: the shipped default model)")
    ap.add_argument("--video", help="a video file (default: a generated clip)")
    ap.add_argument("question", nargs="?", help="default on the generated clip: How many shapes are there? (truth: 2)")
    a = ap.parse_args(argv)
    if a.checkpoint or (DEFAULT_MODEL_DIR / "config.json").is_file():
        model, what = load_or_exit(a.checkpoint), a.checkpoint or "the default model"
    else:
        from .tiny import tiny_model
        model, what = tiny_model(Path(tempfile.mkdtemp())), "a tiny random-weight model (default model not built)"
    video = Path(a.video) if a.video else moving_square_clip(Path(tempfile.mkdtemp()) / "clip.mp4")
    if a.question is None:
        a.question = "How many shapes are there?" if not a.video else "What happens in this video?"
    truth = "2" if not a.video and a.question == "How many shapes are there?" else None
    clip = load_video(video)
    t0 = time.perf_counter()
    answer = model.ask(clip.frames, a.question, max_new_tokens=32)
    print(f"model:    {what}\nvideo:    {video} ({len(clip.frames)} frames at 1 fps, "
          f"{model.config.tokens_per_frame} tokens each)\nquestion: {a.question}\nanswer:   {answer}"
          f"{f'   (ground truth: {truth})' if truth else ''}\n"
          f"({time.perf_counter() - t0:.2f} s)")


if __name__ == "__main__":
    main()
