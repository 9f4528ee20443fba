"""python -m runtime.chat --artifacts DIR (--video PATH | --image PATH) ["question"]

With a question: answer it (streamed) and exit. Without: an interactive multi-turn chat about the
media (empty line or EOF ends it).
"""
from __future__ import annotations

import argparse
import sys

from .pipeline import Pipeline


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.chat", description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", required=True, help="directory written by python -m export.build")
    media = ap.add_mutually_exclusive_group()
    media.add_argument("--video")
    media.add_argument("--image")
    ap.add_argument("question", nargs="?")
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--sample", action="store_true", help="top-p sampling (default: greedy)")
    ap.add_argument("--temperature", type=float, default=0.5)
    ap.add_argument("--top-p", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    sampling = dict(max_new_tokens=a.max_new_tokens, do_sample=a.sample, temperature=a.temperature,
                    top_p=a.top_p, seed=a.seed)
    try:
        pipe = Pipeline.open(a.artifacts, threads=a.threads)
        print(f"[{pipe.describe()}]", file=sys.stderr)
        chat = pipe.chat(a.video or a.image)
        questions = [a.question] if a.question else _prompts()
        for q in questions:
            for piece in chat.ask_stream(q, **sampling):
                print(piece, end="", flush=True)
            print()
    except (ValueError, RuntimeError, FileNotFoundError) as e:       # VideoError and ManifestError included
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _prompts():
    while True:
        try:
            q = input("> ").strip()
        except EOFError:
            return
        if not q:
            return
        yield q


if __name__ == "__main__":
    sys.exit(main())
