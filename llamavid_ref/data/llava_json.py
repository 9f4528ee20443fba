"""LLaVA-style JSON conversations -> plain samples; no tokenization here (templates do that).

    [{"id": "...", "video" | "image": "relative/path", "qtype": "...",   (media and qtype optional)
      "conversations": [{"from": "human", "value": "<image>\\nWhat ...?"}, {"from": "gpt", "value": "..."}, ...]}]

LLaMA-VID uses LLaVA's `<image>` placeholder for videos too; the model later replaces it with all
visual tokens of that image or video. A sample with media gets exactly one placeholder: when no turn
has one, it goes at the start ("<image>\\n" + text) or the end (text + "\\n<image>") of the first
human turn (media_position "start", "end", or "random": either, seeded by (seed, entry index));
a placeholder already in a human turn is kept where it is. A sample without media is a text-only
conversation and must not contain the placeholder. Turns alternate human, gpt, human, ...; a final
human turn without an answer is allowed (a question to answer at evaluation).
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

MEDIA_TOKEN = "<image>"
HUMAN, GPT = "human", "gpt"
ROLE_ALIASES = {"human": HUMAN, "user": HUMAN, "gpt": GPT, "assistant": GPT}
MEDIA_KINDS = ("image", "video")
MEDIA_POSITIONS = ("start", "end", "random")


class LlavaJsonError(ValueError):
    """A malformed entry; the message names the file, the entry's index and id."""


@dataclass(frozen=True)
class Sample:
    id: str
    media_kind: str | None               # "image", "video", or None for a text-only conversation
    media_path: Path | None              # resolved against the media root
    turns: tuple[tuple[str, str], ...]   # (role, text), roles HUMAN/GPT alternating, HUMAN first
    qtype: str | None = None


def place_media(text: str, position: str) -> str:
    """The first human turn with the placeholder added at its start or end."""
    return f"{MEDIA_TOKEN}\n{text}" if position == "start" else f"{text}\n{MEDIA_TOKEN}"


def _turns(entry: dict, fail) -> list[tuple[str, str]]:
    conversations = entry.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        fail("a non-empty 'conversations' list", repr(conversations) if "conversations" in entry else "none")
    turns = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            fail(f"turn {i} to be {{'from': ..., 'value': <string>}}", repr(turn)[:80])
        role = ROLE_ALIASES.get(turn.get("from"))
        want = HUMAN if i % 2 == 0 else GPT
        if role != want:
            fail(f"turn {i} from {want!r} (turns alternate human, gpt, ...)", f"from {turn.get('from')!r}")
        turns.append((role, turn["value"]))
    return turns


def _media(entry: dict, media_root: Path, check_media: bool, fail) -> tuple[str | None, Path | None]:
    kinds = [kind for kind in MEDIA_KINDS if kind in entry]
    if not kinds:
        return None, None
    if len(kinds) > 1:
        fail("one of 'image' or 'video'", "both")
    kind = kinds[0]
    value = entry[kind]
    if not isinstance(value, str) or not value:
        fail(f"'{kind}' to be one path string", repr(value)[:80])
    path = media_root / value
    if check_media and not path.is_file():
        fail(f"the {kind} file {path}", "no such file (paths are resolved against the media root)")
    return kind, path


def parse_entry(entry, index: int, media_root, media_position: str = "start", seed: int = 0,
                check_media: bool = True, source: str = "entries") -> Sample:
    """One JSON entry -> Sample. index is the entry's position in its file (for messages and for
    the "random" media position)."""
    if media_position not in MEDIA_POSITIONS:
        raise ValueError(f"media_position must be one of {MEDIA_POSITIONS}, got {media_position!r}")
    sample_id = str(entry.get("id", index)) if isinstance(entry, dict) else str(index)

    def fail(expected, found):
        raise LlavaJsonError(f"{source} entry {index} (id {sample_id!r}): expected {expected}, found {found}")

    if not isinstance(entry, dict):
        fail("an object", type(entry).__name__)
    turns = _turns(entry, fail)
    kind, path = _media(entry, Path(media_root), check_media, fail)
    placeholders = [i for i, (_, text) in enumerate(turns) if MEDIA_TOKEN in text]
    if kind is None and placeholders:
        fail(f"no {MEDIA_TOKEN} in a conversation without 'image' or 'video'", f"one in turn {placeholders[0]}")
    if kind is not None:
        count = sum(text.count(MEDIA_TOKEN) for _, text in turns)
        if count > 1:
            fail(f"one {MEDIA_TOKEN} for its one {kind}", f"{count}")
        if placeholders and turns[placeholders[0]][0] != HUMAN:
            fail(f"{MEDIA_TOKEN} in a human turn", f"it in turn {placeholders[0]} (gpt)")
        if not placeholders:
            position = media_position
            if position == "random":
                position = random.Random(f"{seed}/{index}").choice(("start", "end"))
            turns[0] = (HUMAN, place_media(turns[0][1], position))
    qtype = entry.get("qtype")
    return Sample(sample_id, kind, path, tuple(turns), qtype if isinstance(qtype, str) else None)


def load_llava_json(path, media_root=None, media_position: str = "start", seed: int = 0,
                    check_media: bool = True) -> list[Sample]:
    """Every entry of a LLaVA-style JSON file. media_root defaults to the file's folder."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LlavaJsonError(f"{path}: expected a JSON list of conversations, could not read it ({err})") from err
    if not isinstance(entries, list):
        raise LlavaJsonError(f"{path}: expected a JSON list of conversations, found a {type(entries).__name__}")
    root = Path(media_root) if media_root is not None else path.parent
    return [parse_entry(entry, i, root, media_position, seed, check_media, os.fspath(path))
            for i, entry in enumerate(entries)]
