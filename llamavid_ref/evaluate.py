"""python -m llamavid_ref.evaluate --checkpoint PATH --data DIR --split test: exact-match accuracy
per question type and overall (greedy answers, normalised), as text and JSON."""
from __future__ import annotations

import argparse
import json
import re
import time
from collections import defaultdict
from pathlib import Path

import torch

from .checkpoint import load
from .templates import question_prompt
from .video import load_video

_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}


def normalise(answer: str) -> str:
    """Lower case, no punctuation or articles, number words as digits."""
    words = re.sub(r"[^\w\s]", " ", answer.lower()).split()
    return " ".join(_NUMBERS.get(w, w) for w in words if w not in ("a", "an", "the"))


def score(predictions: list[tuple[str, str, str]]) -> dict:
    """[(qtype, predicted, expected)] -> {"overall": acc, "per_type": {qtype: acc}, "n": ...}."""
    hits, counts = defaultdict(int), defaultdict(int)
    for qtype, pred, gold in predictions:
        counts[qtype] += 1
        hits[qtype] += normalise(pred) == normalise(gold)
    n = sum(counts.values())
    return {"overall": sum(hits.values()) / max(n, 1), "n": n,
            "per_type": {q: hits[q] / counts[q] for q in sorted(counts)},
            "n_per_type": dict(sorted(counts.items()))}


def predict(model, entries: list[dict], media_root: Path, max_new_tokens: int = 8, frames_cache=None):
    """Greedy answers to the first question of each LLaVA-style entry -> [(qtype, predicted, expected)]."""
    out = []
    for e in entries:
        question = e["conversations"][0]["value"].replace("<image>", "").strip()
        video = frames_cache[e["video"]] if frames_cache is not None else \
            model.load_media(load_video(media_root / e["video"]).frames)
        ids = torch.tensor([model.tokenizer.encode_prompt(question_prompt(question, model.config.template))])
        new = model.generate(ids, [video], [question], max_new_tokens=max_new_tokens)
        out.append((e.get("qtype", "all"), model.decode(new[0]), e["conversations"][1]["value"]))
    return out


def report(result: dict) -> str:
    rows = [f"| {q} | {result['n_per_type'][q]} | {100 * a:.1f} |" for q, a in result["per_type"].items()]
    return "\n".join(["| question type | n | accuracy % |", "|---|---|---|", *rows,
                      f"| **overall** | {result['n']} | **{100 * result['overall']:.1f}** |"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--checkpoint", help="checkpoint directory (default: the shipped default model)")
    ap.add_argument("--data", required=True, help="folder with <split>.json and the videos (the synthetic world)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, help="first N entries only")
    ap.add_argument("--json", help="write the result here")
    a = ap.parse_args(argv)
    model = load(a.checkpoint)
    entries = json.loads((Path(a.data) / f"{a.split}.json").read_text())[: a.limit]
    t0 = time.perf_counter()
    result = score(predict(model, entries, Path(a.data)))
    result.update(checkpoint=str(a.checkpoint or "default"), split=a.split, seconds=round(time.perf_counter() - t0, 1))
    print(report(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
