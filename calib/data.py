"""Calibration data: clips and questions -> the batches each stage is calibrated on.

    DATA: a LLaVA-style .json (entries with "video" and a first question) | a folder holding calib.json,
          train.json, val.json or test.json (the synthetic world's layout) | a folder of clips (+ questions.txt,
          one question per line, cycled; else QUESTIONS) | None: the clips shipped with the default model
      --clips()--> [Clip(video, question)]          data_sha256(): what the manifest records
      --frames as the runtime samples them (runtime.media.load_video at the manifest's video_fps)-->
        vision batches  {"pixel_values": [F,3,S,S] float32}                      F <= frame_chunk per call
        head batches    {"vision_feats": fp32 vision(pixel_values) [F,N+1,Cv],
                         "qformer_ids", "qformer_mask": the clip's question [1,L] int64}

The shipped set (llamavid_ref/default_model/calib/, 32 clips, 240 KB) is the synthetic world's train split,
seed 0, written by

    python -m llamavid_ref.data.world --out llamavid_ref/default_model/calib --train 32 --seed 0

(byte-deterministic; a train clip never lands in any seed's val or test split), each clip with its own
question, so every question type of the world is in it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from llamavid_ref.checkpoint import DEFAULT_MODEL_DIR

DEFAULT_DATA = DEFAULT_MODEL_DIR / "calib"
JSON_NAMES = ("calib.json", "train.json", "val.json", "test.json")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm")
QUESTIONS = ("What happens in this video?", "Describe the objects and how they move.",
             "How many objects are there?", "What color is the object that moves?")


class CalibrationError(ValueError):
    """Calibration cannot go on; the message says what was expected and what was found."""


@dataclass(frozen=True)
class Clip:
    video: Path
    question: str


@dataclass(frozen=True)
class Preprocess:
    """How the runtime turns a clip into pixel values (the manifest's "preprocess" section)."""
    image_size: int
    mean: tuple
    std: tuple
    video_fps: float = 1.0

    @classmethod
    def of(cls, manifest_or_config) -> "Preprocess":
        """From a manifest dict or a LlamaVidConfig."""
        if isinstance(manifest_or_config, dict):
            p = manifest_or_config["preprocess"]
            return cls(p["image_size"], tuple(p["mean"]), tuple(p["std"]), p["video_fps"])
        c = manifest_or_config
        return cls(c.vision.image_size, tuple(c.image_mean), tuple(c.image_std))


def clips(data=None) -> list[Clip]:
    """The calibration clips of DATA (see the module docstring); None: the shipped set."""
    path = Path(data) if data is not None else DEFAULT_DATA
    if path.is_file() and path.suffix == ".json":
        return _from_json(path)
    if path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES:
        return [Clip(path, QUESTIONS[0])]
    if not path.is_dir():
        found = "nothing" if not path.exists() else f"a {path.suffix or 'suffix-less'} file"
        raise CalibrationError(f"calibration data {path}: expected a LLaVA-style .json, a folder with one of "
                               f"{list(JSON_NAMES)}, or a folder of clips ({', '.join(VIDEO_SUFFIXES)}); found {found}")
    for name in JSON_NAMES:
        if (path / name).is_file():
            return _from_json(path / name)
    videos = sorted(p for p in path.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
    if not videos:
        raise CalibrationError(f"calibration data {path}: expected one of {list(JSON_NAMES)} or video files "
                               f"({', '.join(VIDEO_SUFFIXES)}), found neither: an empty calibration set")
    lines = (path / "questions.txt").read_text().splitlines() if (path / "questions.txt").is_file() else []
    questions = [q.strip() for q in lines if q.strip()] or list(QUESTIONS)
    return [Clip(v, questions[i % len(questions)]) for i, v in enumerate(videos)]


def _from_json(path: Path) -> list[Clip]:
    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CalibrationError(f"calibration data {path}: expected JSON, found a parse error ({e})") from e
    out = []
    for i, e in enumerate(entries if isinstance(entries, list) else [None]):
        if not isinstance(e, dict) or "video" not in e or not e.get("conversations"):
            raise CalibrationError(f"calibration data {path}: entry {i}: expected {{'video': ..., 'conversations': "
                                   f"[{{'value': question}}, ...]}}, found {str(e)[:80]}")
        out.append(Clip(path.parent / e["video"], e["conversations"][0]["value"].replace("<image>", "").strip()))
    if not out:
        raise CalibrationError(f"calibration data {path}: expected at least one entry, found an empty list")
    return out


def data_sha256(clip_list: list[Clip]) -> str:
    """sha256 over each clip's file content and question, in order (not over paths: a moved copy hashes the same)."""
    h = hashlib.sha256()
    for c in clip_list:
        if not c.video.is_file():
            raise CalibrationError(f"calibration clip {c.video}: expected a video file, found nothing")
        h.update(hashlib.sha256(c.video.read_bytes()).hexdigest().encode() + b"\0" + c.question.encode() + b"\n")
    return h.hexdigest()


def pixels(clip: Clip, pre: Preprocess) -> np.ndarray:
    """[T,3,S,S] float32: the clip sampled and preprocessed by the runtime's own code."""
    from runtime.media import VideoError, load_video
    try:
        return load_video(clip.video, pre.image_size, pre.mean, pre.std, pre.video_fps)[0]
    except VideoError as e:
        raise CalibrationError(f"calibration clip: {e}") from e


def vision_batches(clip_list: list[Clip], pre: Preprocess, chunk: int) -> Iterator[dict]:
    """{"pixel_values": [F,3,S,S]} per call of at most `chunk` frames, clip by clip."""
    for clip in clip_list:
        px = pixels(clip, pre)
        for i in range(0, len(px), chunk):
            yield {"pixel_values": px[i:i + chunk]}


def head_batches(clip_list: list[Clip], pre: Preprocess, chunk: int, vision: Callable[[np.ndarray], np.ndarray],
                 qformer_tokenizer) -> Iterator[dict]:
    """{"vision_feats", "qformer_ids", "qformer_mask"} per call: the fp32 vision features of each chunk and the
    clip's question, as the runtime calls the head."""
    for clip in clip_list:
        ids, mask = (np.asarray(t, np.int64) for t in qformer_tokenizer([clip.question]))    # numpy or torch
        px = pixels(clip, pre)
        for i in range(0, len(px), chunk):
            yield {"vision_feats": vision(px[i:i + chunk]), "qformer_ids": ids, "qformer_mask": mask}
