"""python -m llamavid_ref.train --stage 0|1|2|3: the paper's training stages (Table 7) on CPU or GPU.

    LLaVA-style JSON ─> conversations ─> (input_ids with -200, labels on assistant turns, frames)
        ─> model(ids, videos, prompts) ─> shifted cross-entropy ─> AdamW, cosine with warmup

| stage | trains                                            | frozen                         | lr / batch  | max tokens |
|-------|---------------------------------------------------|--------------------------------|-------------|------------|
| 0     | everything (ours: no small pretrained encoder/LLM) | -                              | 1e-3 / 32   | 2048       |
| 1     | mm_projector, vlm_att_{projector,key,val}         | LLM, vision, Q-Former, ln, query | 1e-3 / 256 | 2048       |
| 2     | all but the vision encoder                        | vision                         | 2e-5 / 128  | 2048       |
| 3     | LLM + mm_projector (long video, RoPE scaling)     | vision, all vlm_att_*          | 2e-5 / 8    | 65536      |
Common: 1 epoch, AdamW, cosine, warmup 0.03, weight decay 0. Every default is a flag.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import load, load_or_exit, save
from .config import IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX
from .model import LlamaVid
from .templates import Conversation

IGNORE = -100
TRAINABLE = {   # parameter-name prefixes per stage (our names; see the table above)
    0: ("",),
    1: ("head.mm_projector.", "head.att_projector.", "head.key_projector.", "head.val_projector."),
    2: ("head.", "llm."),
    3: ("llm.", "head.mm_projector."),
}
DEFAULTS = {0: dict(lr=1e-3, batch_size=32, max_tokens=2048), 1: dict(lr=1e-3, batch_size=256, max_tokens=2048),
            2: dict(lr=2e-5, batch_size=128, max_tokens=2048), 3: dict(lr=2e-5, batch_size=8, max_tokens=65536)}


@dataclass
class Example:
    input_ids: list[int]      # with IMAGE_TOKEN_INDEX where the media goes
    labels: list[int]         # IGNORE except on assistant answers (and their </s>)
    media: object             # pixel tensor [T,3,S,S] / [3,S,S], or None for text only
    prompt: str               # the Q-Former prompt: the first human turn without the placeholder


def build_example(model: LlamaVid, turns, media, subtitles=None) -> Example:
    """turns [(role 'human'|'gpt', text)] -> token ids and labels in the model's chat template.
    Prompt pieces and answers are tokenized separately, exactly as generation sees them."""
    tok, conv = model.tokenizer, Conversation.new(model.config.template)
    ids, labels = [tok.bos_id], [IGNORE]
    first_human = next(t for r, t in turns if r == "human")
    for i, (role, text) in enumerate(turns):
        if role == "human":
            piece = (conv.template.system + conv.template.sep if i == 0 else "") + f"{conv.template.roles[0]}: {text} {conv.template.roles[1]}:"
            p = tok.encode_prompt(piece)[1:]                        # drop the BOS encode_prompt adds
            ids += p
            labels += [IGNORE] * len(p)
        else:
            a = tok.encode(" " + text) + [tok.eos_id]
            ids += a
            labels += a
    return Example(ids, labels, media, first_human.replace(IMAGE_PLACEHOLDER, "").strip())


def stage_parameters(model: LlamaVid, stage: int, prefixes=None) -> list[torch.nn.Parameter]:
    """Freeze everything, then unfreeze the stage's prefixes (or `prefixes`, overriding them)."""
    params = []
    for name, p in model.named_parameters():
        p.requires_grad = any(name.startswith(pre) for pre in (prefixes or TRAINABLE[stage]))
        if p.requires_grad:
            params.append(p)
    return params


def lr_at(step: int, total: int, base: float, warmup_ratio: float) -> float:
    warm = max(1, int(round(total * warmup_ratio)))
    if step < warm:
        return base * (step + 1) / warm
    return base * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def batch_loss(model: LlamaVid, batch: list[Example]) -> torch.Tensor:
    """Right-padded batch -> mean cross-entropy over supervised tokens (labels shifted by one)."""
    L = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), L), model.config.llm.pad_id, dtype=torch.long)
    mask = torch.zeros(len(batch), L, dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, :len(e.input_ids)], mask[i, :len(e.input_ids)] = torch.tensor(e.input_ids), 1
    media = [e.media for e in batch if e.media is not None]
    prompts = [e.prompt for e in batch if e.media is not None]
    embeds, amask = model.embed(ids, media, prompts, mask)
    # labels follow the same expansion: each placeholder becomes len(visual tokens) IGNOREs
    n_vis = [(m.shape[0] if m.dim() == 4 else 1) * model.config.tokens_per_frame for m in media]
    rows, k = [], 0
    for e in batch:
        row = []
        for t, lab in zip(e.input_ids, e.labels):
            if t == IMAGE_TOKEN_INDEX:
                row += [IGNORE] * n_vis[k]
                k += 1
            else:
                row.append(lab)
        rows.append(row + [IGNORE] * (embeds.shape[1] - len(row)))
    labels = torch.tensor(rows)
    logits, _ = model.llm(embeds, amask)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE)


class Progress:
    """One line: step, loss (running mean), samples/s, ETA. Rewritten in place on a terminal."""

    def __init__(self, total: int, every: int = 10):
        self.total, self.every, self.t0, self.losses = total, every, time.perf_counter(), []
        self.tty = sys.stdout.isatty()

    def update(self, step: int, loss: float, samples: int, lr: float):
        self.losses.append(loss)
        if step % self.every and step != self.total:
            return
        dt = time.perf_counter() - self.t0
        rate = samples / max(dt, 1e-9)
        eta = dt / step * (self.total - step)
        line = (f"step {step}/{self.total}  loss {np.mean(self.losses[-self.every:]):.4f}  lr {lr:.2e}  "
                f"{rate:.1f} samples/s  eta {eta:.0f}s")
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", flush=True)


def train(model: LlamaVid, examples: list[Example], stage: int, out: Path, *, lr: float, batch_size: int,
          grad_accum: int = 1, epochs: float = 1.0, warmup: float = 0.03, weight_decay: float = 0.0,
          max_tokens: int = 2048, bf16: bool = False, seed: int = 0, save_every: int = 500,
          resume: bool = False, log_every: int = 10, trainable=None) -> LlamaVid:
    """Train `model` in place on `examples` for the stage; checkpoints to out/checkpoint-last.
    `trainable` overrides the stage's parameter prefixes (TRAINABLE)."""
    torch.manual_seed(seed)
    too_long = [i for i, e in enumerate(examples) if len(e.input_ids) > max_tokens]
    if too_long:
        raise ValueError(f"{len(too_long)} examples exceed max_tokens={max_tokens} text tokens (first: #{too_long[0]})")
    params = stage_parameters(model, stage, trainable)
    frozen_vision = not any(p.requires_grad for p in model.vision.parameters())
    model.vision_cache = {} if frozen_vision else None     # encode each clip once per run
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999))
    per_step = batch_size * grad_accum
    total = max(1, int(len(examples) * epochs) // per_step)
    step, state_file = 0, out / "checkpoint-last" / "trainer_state.pt"
    if resume and state_file.is_file():
        st = torch.load(state_file, weights_only=True)
        model.load_state_dict(load(out / "checkpoint-last").state_dict())
        opt.load_state_dict(st["optimizer"])
        step = int(st["step"])
        print(f"resumed stage {stage} at step {step}/{total}")
    order = _order(examples, total * per_step, seed, by_media=not frozen_vision)
    model.train()
    progress = Progress(total, log_every)
    while step < total:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, lr, warmup)
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for a in range(grad_accum):
            idx = order[(step * grad_accum + a) * batch_size:(step * grad_accum + a + 1) * batch_size]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = batch_loss(model, [examples[i] for i in idx]) / grad_accum
            loss.backward()
            loss_sum += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        progress.update(step, loss_sum, step * per_step, opt.param_groups[0]["lr"])
        if step % save_every == 0 or step == total:
            _checkpoint(model, opt, step, out / "checkpoint-last")
    print()
    model.eval()
    model.vision_cache = None
    return model


def _order(examples: list[Example], n: int, seed: int, by_media: bool) -> np.ndarray:
    """n example indices, epoch after epoch, shuffled. by_media: examples about the same clip stay
    adjacent, so a batch runs a trainable vision stage once per clip (visual_tokens dedupes by
    tensor); with a frozen, cached encoder every example is shuffled on its own."""
    groups: dict[int, list[int]] = {}
    for i, e in enumerate(examples):
        groups.setdefault(id(e.media) if by_media and e.media is not None else -i - 1, []).append(i)
    members, rng, out = list(groups.values()), np.random.default_rng(seed), []
    while len(out) < n:
        for g in rng.permutation(len(members)):
            out += members[g]
    return np.array(out[:n])


def _checkpoint(model, opt, step, where: Path):
    save(model, where)
    torch.save({"optimizer": opt.state_dict(), "step": step}, where / "trainer_state.pt")


def examples_from_json(model: LlamaVid, json_file: Path, media_root: Path | None, fps: float = 1.0) -> list[Example]:
    """LLaVA-style JSON (image or video field, multi-turn conversations) -> examples with pixels."""
    from .data.llava_json import load_llava_json
    from .video import load_video
    out = []
    for s in load_llava_json(json_file, media_root=media_root):
        media = None
        if s.media_path is not None:
            media = model.load_media(load_video(s.media_path, fps=fps).frames if s.media_kind == "video"
                                     else s.media_path)
        out.append(build_example(model, s.turns, media))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", type=int, choices=(0, 1, 2, 3), required=True)
    ap.add_argument("--init", required=True, help="checkpoint to start from (project or released format)")
    ap.add_argument("--data", required=True, help="LLaVA-style JSON file")
    ap.add_argument("--media-root", help="folder media paths are relative to (default: the JSON's folder)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--warmup", type=float, default=0.03)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--max-tokens", type=int)
    ap.add_argument("--rope-scaling", type=float, help="stage 3: linear RoPE scaling factor (e.g. 16)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (CPU AMX / GPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-every", type=int, default=500)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--trainable", nargs="+", metavar="PREFIX",
                    help="parameter-name prefixes to train instead of the stage's (e.g. llm.)")
    a = ap.parse_args(argv)
    d = DEFAULTS[a.stage]
    model = load_or_exit(a.init)
    if a.rope_scaling:
        model.config.llm.rope_scaling = a.rope_scaling
        model.config.llm.max_positions = int(model.config.llm.max_positions * a.rope_scaling)
    data = Path(a.data)
    examples = examples_from_json(model, data, Path(a.media_root) if a.media_root else data.parent)
    out = Path(a.out)
    train(model, examples, a.stage, out, lr=a.lr or d["lr"], batch_size=a.batch_size or d["batch_size"],
          grad_accum=a.grad_accum, epochs=a.epochs, warmup=a.warmup, weight_decay=a.weight_decay,
          max_tokens=a.max_tokens or d["max_tokens"], bf16=a.bf16, seed=a.seed, save_every=a.save_every,
          resume=a.resume, trainable=a.trainable)
    save(model, out / "final")
    (out / "final" / "train_args.json").write_text(json.dumps(vars(a), indent=2))
    print(f"wrote {out / 'final'}")


if __name__ == "__main__":
    main()
