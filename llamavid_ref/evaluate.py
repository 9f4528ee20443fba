"""python -m llamavid_ref.evaluate --data DIR --split test [--checkpoint PATH | --artifacts DIR]:
exact-match accuracy per question type and overall (greedy answers, normalised), as text and JSON,
for the PyTorch reference or an exported artifact directory run by the runtime (ONNX Runtime).
With --artifacts, --agreement also runs the reference and reports how many answers are identical."""
from __future__ import annotations

import argparse
import json
import re
import time
from collections import defaultdict
from pathlib import Path

from .checkpoint import load_or_exit
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


def predict(ask, entries: list[dict], media_root: Path, frames_cache=None):
    """Answers to the first question of each LLaVA-style entry -> [(qtype, predicted, expected)].
    `ask(media, question) -> str` is a model's or a pipeline's greedy ask."""
    out = []
    for e in entries:
        question = e["conversations"][0]["value"].replace("<image>", "").strip()
        media = frames_cache[e["video"]] if frames_cache is not None else load_video(media_root / e["video"]).frames
        out.append((e.get("qtype", "all"), ask(media, question), e["conversations"][1]["value"]))
    return out


def greedy(model_or_pipeline, max_new_tokens: int = 8):
    return lambda media, question: model_or_pipeline.ask(media, question, max_new_tokens=max_new_tokens)


def report(result: dict) -> str:
    rows = [f"| {q} | {result['n_per_type'][q]} | {100 * a:.1f} |" for q, a in result["per_type"].items()]
    return "\n".join(["| question type | n | accuracy % |", "|---|---|---|", *rows,
                      f"| **overall** | {result['n']} | **{100 * result['overall']:.1f}** |"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--checkpoint", help="checkpoint directory (default: the shipped default model)")
    ap.add_argument("--artifacts", help="evaluate this export.build directory with the runtime instead")
    ap.add_argument("--agreement", action="store_true", help="with --artifacts: also run the reference "
                    "(--checkpoint) and count identical answers")
    ap.add_argument("--precision", choices=("fp32", "fp16", "int8"), help="with --artifacts: run only this "
                    "precision's graphs (fp16 runs the GPU graphs on ORT's CPU provider when there is no GPU)")
    ap.add_argument("--data", required=True, help="folder with <split>.json and the videos (the synthetic world)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, help="first N entries only")
    ap.add_argument("--json", help="write the result here")
    a = ap.parse_args(argv)
    entries = json.loads((Path(a.data) / f"{a.split}.json").read_text())[: a.limit]
    t0 = time.perf_counter()
    if a.artifacts:
        from runtime.pipeline import Pipeline
        pipeline = Pipeline.open(a.artifacts, precision=a.precision)
        print(pipeline.describe())
        preds = predict(greedy(pipeline), entries, Path(a.data))
    else:
        preds = predict(greedy(load_or_exit(a.checkpoint)), entries, Path(a.data))
    result = score(preds)
    result.update(checkpoint=str(a.checkpoint or "default"), artifacts=a.artifacts, precision=a.precision, split=a.split,
                  seconds=round(time.perf_counter() - t0, 1))
    print(report(result))
    if a.artifacts and a.agreement:
        ref = predict(greedy(load_or_exit(a.checkpoint)), entries, Path(a.data))
        same = sum(p[1] == r[1] for p, r in zip(preds, ref))
        result["identical_to_reference"] = same / max(len(ref), 1)
        print(f"answers identical to the reference: {same}/{len(ref)}")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
