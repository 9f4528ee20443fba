"""python -m llamavid_ref.probe --checkpoint CKPT --data WORLD_DIR: what the visual tokens carry.

For each question type of the synthetic world, a small MLP is trained on the visual tokens the
model gives each training clip (with its question as the Q-Former prompt) to predict the answer,
and scored on the validation clips; once on the context tokens, once on the content tokens, once
on both. A type the probe cannot answer is one no LLM can answer from these tokens.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import load_or_exit
from .data import world
from .video import load_video

VIEWS = {"context": slice(0, None, 2), "content": slice(1, None, 2), "both": slice(None)}


def token_table(model, root: Path, clips):
    """-> visual tokens [clips, frames*2, H], answer indices, question types."""
    xs, ys, qs = [], [], []
    for c in clips:
        with torch.no_grad():
            xs.append(model.visual_tokens([model.load_media(load_video(root / c.video).frames)], [c.question])[0])
        ys.append(world.ANSWERS[c.qtype].index(c.answer))
        qs.append(c.qtype)
    return torch.stack(xs), torch.tensor(ys), qs


def probe_accuracy(x_tr, y_tr, x_va, y_va, classes: int, steps: int = 300, seed: int = 0) -> float:
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    x_tr, x_va = ((x_tr - mu) / sd).flatten(1), ((x_va - mu) / sd).flatten(1)
    torch.manual_seed(seed)
    clf = torch.nn.Sequential(torch.nn.Linear(x_tr.shape[1], 256), torch.nn.GELU(), torch.nn.Linear(256, classes))
    opt = torch.optim.AdamW(clf.parameters(), 1e-3, weight_decay=0.1)
    for _ in range(steps):
        loss = F.cross_entropy(clf(x_tr), y_tr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((clf(x_va).argmax(-1) == y_va).float().mean())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint")
    ap.add_argument("--data", required=True, help="a folder written by python -m llamavid_ref.data.world")
    ap.add_argument("--train-clips", type=int, help="use the first N training clips (default: all)")
    a = ap.parse_args(argv)
    model, root = load_or_exit(a.checkpoint), Path(a.data)
    spec = json.loads((root / "world.json").read_text())       # clips are rebuilt from seed and counts
    counts, seed = spec["counts"], spec["seed"]
    if model.config.tokens_per_frame != 2:
        raise SystemExit(f"probe: expected a model with 2 tokens per frame, found {model.config.tokens_per_frame}")
    tr = token_table(model, root, world.make_split("train", counts["train"], seed)[:a.train_clips])
    va = token_table(model, root, world.make_split("val", counts["val"], seed))
    print("| question type | context % | content % | both % |\n|---|---|---|---|")
    for qt in world.QTYPES:
        i_tr = [i for i, q in enumerate(tr[2]) if q == qt]
        i_va = [i for i, q in enumerate(va[2]) if q == qt]
        accs = [probe_accuracy(tr[0][i_tr][:, v], tr[1][i_tr], va[0][i_va][:, v], va[1][i_va], len(world.ANSWERS[qt]))
                for v in VIEWS.values()]
        print(f"| {qt} | " + " | ".join(f"{100 * x:.0f}" for x in accs) + " |", flush=True)


if __name__ == "__main__":
    main()
