"""A deterministic synthetic video-QA world: coloured shapes that move, appear and disappear.

    seed, split --random.Random--> plan of (qtype, answer) --builder--> sprites --render--> .mp4
                                                                          '--ask--> question, answer

Clips are 64x64 RGB, 8 s at 4 fps (32 frames, H.264). load_video(fps=1) keeps frames 0, 4, ..., 28:
8 frames at t = 0..7 s. Every event happens at a half second (0.5 .. 6.5 s), between two sampled
frames, so each sampled frame shows an unambiguous state, and the last sampled frame (t = 7 s)
already shows the final state. Sprites (radius 6 px) move 3 px/s, 21 px between the first and
last sampled frame; their paths over the whole clip never come within 4 px of each other.

Question types (one per sample, tag `qtype`), each with a closed answer set (ANSWERS):
- object-specific, naming one sprite among several whose answers differ:
  color       "What color is the triangle?"                  the shape is unique in the clip
  direction   "Which way does the red square move?"          another sprite shares its colour or
  appear      "Does the green circle appear or disappear?"   shape and does something else
- whole-clip:
  count       "How many shapes are there?"                    no sprite appears or disappears
  first       "Which shape appears first?"                    all appear, at different seconds
  last_count  "How many shapes are in the last frame?"        differs from the first frame's count
Balance: each split cycles through the types and, within a type, through its answers (counts
differ by at most one), then shuffles; each clip is built for its (qtype, answer).
Splits never share a clip: a clip belongs to the split picked by a hash of its content, and a
split's generator (seeded from seed and split name) discards clips of other splits and repeats.

CLI: python -m llamavid_ref.data.world --out DIR --train N --val N --test N --seed S
writes DIR/videos/<split>/<id>.mp4, DIR/<split>.json (LLaVA style), DIR/world.json (this spec),
with --captions DIR/<split>_captions.json and with --multiturn DIR/<split>_multiturn.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import random
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import astuple, dataclass, replace
from pathlib import Path

import numpy as np

from llamavid_ref.video import write_video

FRAME_SIZE = 64
SOURCE_FPS = 4
CLIP_SECONDS = 8
NUM_FRAMES = SOURCE_FPS * CLIP_SECONDS                # 32 source frames
SAMPLE_TIMES = tuple(range(CLIP_SECONDS))             # what 1 fps sampling keeps: 0..7 s
EVENT_TIMES = tuple(k + 0.5 for k in range(CLIP_SECONDS - 1))  # 0.5 .. 6.5 s
RADIUS = 6      # px; a sprite fits in a (2 * RADIUS + 1)^2 box
SPEED = 3.0     # px per second
MARGIN = 2      # px kept free at the frame border
GAP = 4         # px between the boxes two sprites sweep over the clip

BACKGROUND = (24, 24, 24)
COLORS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 240), "yellow": (235, 215, 40)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
MOTIONS = (None, *DIRECTIONS)

QUESTIONS = {
    "color": "What color is the {shape}?",
    "direction": "Which way does the {color} {shape} move?",
    "appear": "Does the {color} {shape} appear or disappear?",
    "count": "How many shapes are there?",
    "first": "Which shape appears first?",
    "last_count": "How many shapes are in the last frame?",
}
ANSWERS = {
    "color": tuple(COLORS),
    "direction": tuple(DIRECTIONS),
    "appear": ("appear", "disappear"),
    "count": ("1", "2", "3", "4"),
    "first": SHAPES,
    "last_count": ("1", "2", "3"),
}
OBJECT_QTYPES = ("color", "direction", "appear")
QTYPES = tuple(QUESTIONS)
SPLITS = ("train", "val", "test")
CAPTION_PROMPT = "Describe the video briefly."


@dataclass(frozen=True)
class Sprite:
    shape: str
    color: str
    x: int = 0                 # centre at t = 0, px
    y: int = 0
    motion: str | None = None  # a DIRECTIONS key, None = still
    t_on: float = 0.0          # visible while t_on <= t < t_off (seconds)
    t_off: float = CLIP_SECONDS

    @property
    def event(self) -> str | None:
        if self.t_on > 0:
            return "appear"
        return "disappear" if self.t_off < CLIP_SECONDS else None

    def visible(self, t: float) -> bool:
        return self.t_on <= t < self.t_off

    def center(self, t: float) -> tuple[float, float]:
        dx, dy = DIRECTIONS.get(self.motion, (0, 0))
        return self.x + dx * SPEED * t, self.y + dy * SPEED * t


@dataclass(frozen=True)
class Clip:
    split: str
    index: int                 # 1-based within the split
    sprites: tuple[Sprite, ...]
    qtype: str
    question: str
    answer: str

    @property
    def id(self) -> str:
        return f"{self.split}_{self.index:06d}"

    @property
    def video(self) -> str:
        return f"videos/{self.split}/{self.index:06d}.mp4"


# ---------------------------------------------------------------- questions and captions

def ask(sprites, qtype: str, target: int | None = None) -> tuple[str, str] | None:
    """(question, answer) about the clip (and sprite `target` for object questions), or None
    when the clip does not determine an answer in the closed set."""
    if qtype in OBJECT_QTYPES:
        s = sprites[target]
        if sum((o.shape, o.color) == (s.shape, s.color) for o in sprites) != 1:
            return None
        seen = sum(s.visible(t) for t in SAMPLE_TIMES)
        ok, answer = {
            "color": (sum(o.shape == s.shape for o in sprites) == 1, s.color),
            "direction": (s.motion is not None and seen >= 2, s.motion),
            "appear": (s.event is not None, s.event),
        }[qtype]
        question = QUESTIONS[qtype].format(shape=s.shape, color=s.color)
    else:
        onsets = [o.t_on for o in sprites]
        ok, answer = {
            "count": (all(o.event is None for o in sprites), str(len(sprites))),
            "first": (all(o.event == "appear" for o in sprites)
                      and len(set(onsets)) == len(sprites) == len({o.shape for o in sprites}),
                      min(sprites, key=lambda o: o.t_on).shape),
            "last_count": (True, str(sum(o.visible(SAMPLE_TIMES[-1]) for o in sprites))),
        }[qtype]
        question = QUESTIONS[qtype]
    return (question, answer) if ok and answer in ANSWERS[qtype] else None


def questions(sprites) -> list[tuple[str, str, str]]:
    """Every (qtype, question, answer) the clip determines."""
    found = []
    for qtype in QTYPES:
        targets = range(len(sprites)) if qtype in OBJECT_QTYPES else [None]
        found += [(qtype, *qa) for qa in (ask(sprites, qtype, i) for i in targets) if qa]
    return found


def caption(sprites) -> str:
    """e.g. "a red square moves left. a blue circle appears and moves up." in order of appearance."""
    sentences = []
    for s in sorted(sprites, key=lambda o: (o.t_on, o.x, o.y)):
        verbs = ([f"{s.event}s"] if s.event else []) + ([f"moves {s.motion}"] if s.motion else [])
        sentences.append(f"a {s.color} {s.shape} {' and '.join(verbs) or 'stays still'}.")
    return " ".join(sentences)


# ---------------------------------------------------------------- building clips for an answer

def _pairs(rng, count: int, taken=()) -> list[tuple[str, str]]:
    """`count` (shape, colour) pairs, distinct from each other and from `taken`."""
    free = [(s, c) for s in SHAPES for c in COLORS if (s, c) not in taken]
    return rng.sample(free, count)


def _event(rng, kind: str | None) -> dict:
    if kind == "appear":
        return {"t_on": rng.choice(EVENT_TIMES)}
    return {"t_off": rng.choice(EVENT_TIMES)} if kind == "disappear" else {}


def _twin(rng, shape: str, color: str) -> tuple[str, str]:
    """A pair sharing the colour or the shape with (shape, color), so a question needs both words."""
    if rng.random() < 0.5:
        return shape, rng.choice([c for c in COLORS if c != color])
    return rng.choice([s for s in SHAPES if s != shape]), color


def _build_color(rng, color):
    shapes = rng.sample(SHAPES, rng.choice((2, 3)))  # the target's shape is unique
    colors = [color] + rng.sample([c for c in COLORS if c != color], len(shapes) - 1)
    sprites = [Sprite(shapes[0], color, motion=rng.choice(MOTIONS))]
    for shape, other in zip(shapes[1:], colors[1:]):
        kind = rng.choice((None, None, "appear", "disappear"))
        sprites.append(Sprite(shape, other, motion=rng.choice(MOTIONS), **_event(rng, kind)))
    return sprites


def _build_direction(rng, direction):
    shape, color = rng.choice(SHAPES), rng.choice(tuple(COLORS))
    others = [d for d in DIRECTIONS if d != direction]
    sprites = [Sprite(shape, color, motion=direction), Sprite(*_twin(rng, shape, color), motion=rng.choice(others))]
    if rng.random() < 0.5:
        (pair,) = _pairs(rng, 1, {(s.shape, s.color) for s in sprites})
        sprites.append(Sprite(*pair, motion=rng.choice([None, *others])))
    return sprites


def _build_appear(rng, kind):
    opposite = "disappear" if kind == "appear" else "appear"
    shape, color = rng.choice(SHAPES), rng.choice(tuple(COLORS))
    sprites = [Sprite(shape, color, motion=rng.choice(MOTIONS), **_event(rng, kind)),
               Sprite(*_twin(rng, shape, color), motion=rng.choice(MOTIONS), **_event(rng, opposite))]
    if rng.random() < 0.5:
        (pair,) = _pairs(rng, 1, {(s.shape, s.color) for s in sprites})
        sprites.append(Sprite(*pair, motion=rng.choice(MOTIONS)))
    return sprites


def _build_count(rng, count):
    return [Sprite(*pair, motion=rng.choice(MOTIONS)) for pair in _pairs(rng, int(count))]


def _build_first(rng, shape):
    shapes = [shape] + rng.sample([s for s in SHAPES if s != shape], rng.choice((1, 2)))
    onsets = sorted(rng.sample(EVENT_TIMES[:-1], len(shapes)))  # the earliest goes to `shape`
    return [Sprite(s, rng.choice(tuple(COLORS)), motion=rng.choice(MOTIONS), t_on=t)
            for s, t in zip(shapes, onsets)]


def _build_last_count(rng, count):
    n = int(count)
    # a of the n final sprites appear, d more disappear; a != d so the first frame shows n - a + d != n
    appear, disappear = rng.choice([(a, d) for a in range(n + 1) for d in range(5 - n) if a != d])
    kinds = ["appear"] * appear + [None] * (n - appear) + ["disappear"] * disappear
    return [Sprite(*pair, motion=rng.choice(MOTIONS), **_event(rng, kind))
            for pair, kind in zip(_pairs(rng, len(kinds)), kinds)]


_BUILDERS = {"color": _build_color, "direction": _build_direction, "appear": _build_appear,
             "count": _build_count, "first": _build_first, "last_count": _build_last_count}


def _swept_box(s: Sprite) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) covered by the sprite over the whole clip."""
    (xa, ya), (xb, yb) = s.center(0), s.center((NUM_FRAMES - 1) / SOURCE_FPS)
    return min(xa, xb) - RADIUS, min(ya, yb) - RADIUS, max(xa, xb) + RADIUS, max(ya, yb) + RADIUS


def _apart(a, b) -> bool:
    return a[2] + GAP <= b[0] or b[2] + GAP <= a[0] or a[3] + GAP <= b[1] or b[3] + GAP <= a[1]


def _place(rng, sprites, tries: int = 50) -> list[Sprite] | None:
    """Give each sprite a start so that every path stays in the frame and apart from the others."""
    placed, boxes = [], []
    for s in sprites:
        x0, y0, x1, y1 = _swept_box(s)  # at x = y = 0
        for _ in range(tries):
            x = rng.randint(int(np.ceil(MARGIN - x0)), int(np.floor(FRAME_SIZE - 1 - MARGIN - x1)))
            y = rng.randint(int(np.ceil(MARGIN - y0)), int(np.floor(FRAME_SIZE - 1 - MARGIN - y1)))
            box = (x0 + x, y0 + y, x1 + x, y1 + y)
            if all(_apart(box, other) for other in boxes):
                break
        else:
            return None
        placed.append(replace(s, x=x, y=y))
        boxes.append(box)
    return placed


def _key(sprites) -> tuple:
    return tuple(sorted(astuple(s) for s in sprites))


def _split_of(key) -> str:
    digest = hashlib.sha256(repr(key).encode()).digest()
    return SPLITS[int.from_bytes(digest[:8], "big") % len(SPLITS)]


def _plan(rng, count: int) -> list[tuple[str, str]]:
    """(qtype, answer) per sample: types and answers within a type as even as `count` allows."""
    qtypes = [QTYPES[i % len(QTYPES)] for i in range(count)]
    answers = {q: [ANSWERS[q][i % len(ANSWERS[q])] for i in range(qtypes.count(q))] for q in QTYPES}
    for q in QTYPES:
        rng.shuffle(answers[q])
    plan = [(q, answers[q].pop()) for q in qtypes]
    rng.shuffle(plan)
    return plan


def make_split(split: str, count: int, seed: int = 0) -> list[Clip]:
    """`count` clips of `split`, a function of (split, count, seed) only."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(f"llamavid-world/{seed}/{split}")
    clips, seen = [], set()
    for index, (qtype, answer) in enumerate(_plan(rng, count), start=1):
        while True:
            sprites = _place(rng, _BUILDERS[qtype](rng, answer))  # object questions: target first
            if sprites is not None and _key(sprites) not in seen and _split_of(_key(sprites)) == split:
                break
        seen.add(_key(sprites))
        asked = ask(sprites, qtype, 0 if qtype in OBJECT_QTYPES else None)
        if asked is None or asked[1] != answer:
            raise AssertionError(f"the {qtype} builder made a clip that does not answer {answer!r}: {sprites}")
        rng.shuffle(sprites)  # the sprite asked about is not always the first drawn or captioned
        clips.append(Clip(split, index, tuple(sprites), qtype, *asked))
    return clips


# ---------------------------------------------------------------- rendering and writing

def _mask(shape: str, cx: float, cy: float, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= RADIUS * RADIUS
    if shape == "square":
        return (np.abs(dx) <= RADIUS - 1) & (np.abs(dy) <= RADIUS - 1)
    # triangle, apex up: half-width grows from 0 at the apex to RADIUS at the base
    return (dy >= -RADIUS) & (dy <= RADIUS) & (np.abs(dx) <= (dy + RADIUS) / 2)


def render(sprites) -> np.ndarray:
    """The clip's frames, uint8 RGB [NUM_FRAMES, FRAME_SIZE, FRAME_SIZE, 3]."""
    frames = np.empty((NUM_FRAMES, FRAME_SIZE, FRAME_SIZE, 3), np.uint8)
    frames[:] = BACKGROUND
    yy, xx = np.mgrid[0:FRAME_SIZE, 0:FRAME_SIZE]
    for i, frame in enumerate(frames):
        t = i / SOURCE_FPS
        for s in sprites:
            if s.visible(t):
                frame[_mask(s.shape, *s.center(t), xx, yy)] = COLORS[s.color]
    return frames


def _write_clip(job: tuple[str, tuple[Sprite, ...]]) -> None:
    path, sprites = job
    write_video(path, render(sprites), SOURCE_FPS)


def _conversation(turns) -> list[dict]:
    """LLaVA turns from (question, answer) pairs; the video placeholder opens the first question."""
    out = []
    for i, (question, answer) in enumerate(turns):
        out += [{"from": "human", "value": ("<image>\n" if i == 0 else "") + question},
                {"from": "gpt", "value": answer}]
    return out


def _entry(clip: Clip, turns, **extra) -> dict:
    return {"id": clip.id, "video": clip.video, **extra, "conversations": _conversation(turns)}


def _multiturn(clip: Clip, rng, max_turns: int = 3) -> dict:
    """The clip's own question first, then up to max_turns - 1 others it also answers."""
    others = [q for q in questions(clip.sprites) if q[1] != clip.question]
    extra = rng.sample(others, min(len(others), max_turns - 1))
    turns = [(clip.question, clip.answer)] + [(q, a) for _, q, a in extra]
    return _entry(clip, turns, qtype=clip.qtype, qtypes=[clip.qtype] + [t for t, _, _ in extra])


def _dump(path: Path, entries: list[dict]) -> None:
    path.write_text(json.dumps(entries, indent=1) + "\n")


def spec() -> dict:
    """The world's constants, written to world.json for whoever evaluates on it."""
    return {"frame_size": FRAME_SIZE, "source_fps": SOURCE_FPS, "clip_seconds": CLIP_SECONDS,
            "sampled_frames_at_1fps": len(SAMPLE_TIMES), "colors": COLORS, "shapes": SHAPES,
            "questions": QUESTIONS, "answers": ANSWERS}


def generate(out, counts: dict[str, int], seed: int = 0, captions: bool = False,
             multiturn: bool = False, workers: int | None = None, log=print) -> dict[str, list[Clip]]:
    """Write the videos and JSON files of every split in `counts` under `out`; returns the clips.
    Encoding runs in `workers` spawned processes (default: one per core), inline for tiny sets."""
    out = Path(out)
    workers = workers or os.cpu_count() or 1
    spawn = multiprocessing.get_context("spawn")  # safe inside a process that already runs threads
    made = {}
    with ProcessPoolExecutor(workers, spawn) if workers > 1 and sum(counts.values()) > 64 else _InProcess() as pool:
        for split, count in counts.items():
            start = time.perf_counter()
            clips = made[split] = make_split(split, count, seed)
            (out / "videos" / split).mkdir(parents=True, exist_ok=True)
            jobs = [(str(out / clip.video), clip.sprites) for clip in clips]
            every = max(1, count // 10)
            for done, _ in enumerate(pool.map(_write_clip, jobs, chunksize=16), start=1):
                if done % every == 0 or done == count:
                    log(f"world: {split} {done}/{count} clips, {time.perf_counter() - start:.1f} s")
            _dump(out / f"{split}.json", [_entry(c, [(c.question, c.answer)], qtype=c.qtype) for c in clips])
            if captions:
                _dump(out / f"{split}_captions.json",
                      [_entry(c, [(CAPTION_PROMPT, caption(c.sprites))], qtype="caption") for c in clips])
            if multiturn:
                rng = random.Random(f"llamavid-world/{seed}/{split}/multiturn")
                _dump(out / f"{split}_multiturn.json", [_multiturn(c, rng) for c in clips])
    (out / "world.json").write_text(json.dumps({**spec(), "seed": seed, "counts": counts}, indent=1) + "\n")
    return made


class _InProcess:
    """The executor interface, run inline: tiny datasets do not pay for worker processes."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, fn, items, chunksize=1):
        return map(fn, items)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llamavid_ref.data.world", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    for split in SPLITS:
        parser.add_argument(f"--{split}", type=int, default=0, metavar="N", help=f"clips in the {split} split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--captions", action="store_true", help="also write <split>_captions.json")
    parser.add_argument("--multiturn", action="store_true", help="also write <split>_multiturn.json")
    parser.add_argument("--workers", type=int, default=None, help="encoding processes (default: all cores)")
    args = parser.parse_args(argv)
    counts = {split: getattr(args, split) for split in SPLITS if getattr(args, split) > 0}
    if not counts:
        parser.error("nothing to make: give --train, --val and/or --test a count > 0")
    generate(args.out, counts, args.seed, args.captions, args.multiturn, args.workers)


if __name__ == "__main__":
    main()
