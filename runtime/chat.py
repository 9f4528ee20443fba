"""python -m runtime.chat --artifacts DIR (--video PATH | --image PATH | --text-only) ["question"]

With a question: answer it (streamed) and exit. Without: an interactive multi-turn chat about the
media (empty line or EOF ends it).

What the command line accepts (anything else is a one-line error, exit status 2):
    question        UTF-8 text, not empty, without the image placeholder ("<image>"): the video or image
                    always goes before the question, so a placeholder typed in it would be a second one
    --video PATH    a video file, or an animated image (GIF, APNG): runtime.media decodes its frames as a video
    --image PATH    an image (an animated one is read as a video, said on stderr)
    --text-only     no media: the LLM answers from the text alone (without it, no media is an error)
    --manifest-sha256 HEX   refuse the artifacts unless manifest.json has this sha256 (tamper-evident)
"""
from __future__ import annotations

import argparse
import sys

from .manifest import read_manifest
from .pipeline import Pipeline, check_question


def animated_frames(path) -> int:
    """The frame count of an animated image at `path` (GIF, WebP, APNG), else 0 (a still image or not an image)."""
    from PIL import Image
    try:
        with Image.open(path) as img:
            n = getattr(img, "n_frames", 1)
            return n if n > 1 else 0
    except Exception:                                # not an image (a video, or unreadable): the pipeline says
        return 0


def check_media(a) -> str | None:
    if not (a.video or a.image or a.text_only):
        raise ValueError("expected --video PATH or --image PATH, found neither; pass --text-only to ask the LLM "
                         "without media")
    if a.image and (n := animated_frames(a.image)):
        print(f"[--image {a.image}: an animated image of {n} frames, read as a video]", file=sys.stderr)
    return a.video or a.image


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.chat", description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", required=True, help="directory written by python -m export.build")
    media = ap.add_mutually_exclusive_group()
    media.add_argument("--video")
    media.add_argument("--image")
    media.add_argument("--text-only", action="store_true", help="no video or image: the LLM answers from the text")
    ap.add_argument("question", nargs="?")
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--sample", action="store_true", help="top-p sampling (default: greedy)")
    ap.add_argument("--temperature", type=float, default=0.5)
    ap.add_argument("--top-p", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--manifest-sha256", help="expected sha256 of manifest.json (refuse the artifacts otherwise)")
    a = ap.parse_args(argv)
    sampling = dict(max_new_tokens=a.max_new_tokens, do_sample=a.sample, temperature=a.temperature,
                    top_p=a.top_p, seed=a.seed)
    try:
        # the pin and the manifest's own checks first (cheap); Pipeline.open then checks every file's hash
        placeholder = read_manifest(a.artifacts, False, a.manifest_sha256)["prompt"]["image_placeholder"]
        if a.question is not None:
            check_question(a.question, placeholder)
        path = check_media(a)
        pipe = Pipeline.open(a.artifacts, threads=a.threads, manifest_sha256=a.manifest_sha256)
        print(f"[{pipe.describe()}]", file=sys.stderr)
        chat = pipe.chat(path)
        for q in [a.question] if a.question is not None else _prompts(placeholder):
            for piece in chat.ask_stream(q, **sampling):
                print(piece, end="", flush=True)
            print()
    except (ValueError, RuntimeError, OSError) as e:       # VideoError and ManifestError included
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


def _prompts(placeholder: str):
    """Questions typed at the prompt; one that breaks check_question is reported and asked again."""
    while True:
        try:
            q = input("> ").strip()
        except EOFError:
            return
        if not q:
            return
        try:
            yield check_question(q, placeholder)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
