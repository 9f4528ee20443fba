"""python -m llamavid_ref.recipe: build the shipped default model from nothing, on CPU.

    synthetic world (seed) ─> tokenizers (BPE for the LLM, WordPiece for the Q-Former)
      ─> random init of the "default" preset
      ─> stage 0: the vision encoder alone: the object on every patch, its centre, the scene
      ─> stage 1: grounding: the head's tokens carry the named object and the scene (fixed readouts)
      ─> stage 2: the LLM alone on QA + captions (vision and head frozen)
      ─> evaluate val/test ─> llamavid_ref/default_model

No small pretrained vision encoder or LLM exists offline, so stages 0 and 1 are ours: stage 0
pre-trains the encoder that the paper takes from EVA, and stage 1 replaces the paper's alignment to
a frozen pretrained LLM (there is none) with direct targets for the head's tokens, from the world's
geometry. Stage 2 is the paper's instruction tuning with a from-scratch learning rate, the head
frozen. What each choice was measured against is in docs/DESIGN.md and docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint
from .config import from_name
from .data import world
from .evaluate import greedy, predict, report, score
from .model import LlamaVid
from .templates import TEMPLATES
from .tiny import random_init
from .tokenizer import LLMTokenizer, QFormerTokenizer
from .train import build_example, lr_at, train
from .video import load_video

CAPTION_PROMPT = world.CAPTION_PROMPT


def corpus(clips) -> list[str]:
    """Every text the model sees: template, questions, answers, captions."""
    texts = [t.system for t in TEMPLATES.values()] + ["USER: ASSISTANT:", CAPTION_PROMPT]
    for c in clips:
        texts += [q + " " + a for _, q, a in world.questions(c.sprites)] + [world.caption(c.sprites)]
    return texts


def build_tokenizers(texts: list[str], out: Path, llm_vocab: int, qformer_vocab: int) -> tuple[Path, Path]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers.implementations import BertWordPieceTokenizer
    out.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=llm_vocab, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    if bpe.get_vocab_size() > llm_vocab:
        raise ValueError(f"tokenizer: the LLM's vocabulary ({llm_vocab}) must hold the byte-level BPE's alphabet "
                         f"and special tokens; found {bpe.get_vocab_size()} tokens (use a preset with a larger vocab_size)")
    bpe.save(str(out / "tokenizer.json"))
    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(texts, vocab_size=qformer_vocab, show_progress=False,
                           special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    vocab = out / "qformer_vocab.txt"
    vocab.write_text("\n".join(sorted(wp.get_vocab(), key=wp.get_vocab().get)) + "\n")
    return out / "tokenizer.json", vocab


def object_class(sprite) -> int:
    """1 + shape * colours + colour: the probe class of a (shape, colour); 0 is background."""
    return 1 + world.SHAPES.index(sprite.shape) * len(world.COLORS) + list(world.COLORS).index(sprite.color)


N_OBJECTS = len(world.SHAPES) * len(world.COLORS)   # object classes 1..12
MAX_COUNT = 4
SCENE_OUTPUTS = N_OBJECTS + MAX_COUNT + 1            # objects in view (multi-hot), how many (0..4)
NAMED_OUTPUTS = 2 + len(world.COLORS) + 2            # named object in view?, its colour, its centre


@dataclass
class FrameTruth:
    """What one sampled frame shows, from the world's geometry (the targets of stages 0 and 1)."""
    labels: torch.Tensor    # [N] class per patch: 0 background, else object_class of the object on it
    centres: torch.Tensor   # [N,2] that object's centre / frame size (0 on background patches)
    visible: torch.Tensor   # [N_OBJECTS] 1 for each object class in view
    count: int              # objects in view


def frame_truth(sprites, t: float, image: int, patch: int) -> FrameTruth:
    """A patch belongs to the object covering at least a quarter of it (the world's own masks)."""
    yy, xx = np.mgrid[0:image, 0:image] * (world.FRAME_SIZE / image)
    owner = np.zeros((image, image), np.int64)
    centre = {0: (0.0, 0.0)}
    for s in sprites:
        if s.visible(t):
            owner[world._mask(s.shape, *s.center(t), xx, yy)] = object_class(s)
            centre[object_class(s)] = tuple(c / world.FRAME_SIZE for c in s.center(t))
    g = image // patch
    blocks = owner.reshape(g, patch, g, patch).transpose(0, 2, 1, 3).reshape(g * g, patch * patch)
    labels = np.zeros(g * g, np.int64)
    for i, b in enumerate(blocks):
        counts = np.bincount(b[b > 0], minlength=1)
        if counts.size > 1 and counts.max() >= patch * patch / 4:
            labels[i] = counts.argmax()
    visible = torch.zeros(N_OBJECTS)
    visible[[k - 1 for k in centre if k]] = 1
    return FrameTruth(torch.from_numpy(labels), torch.tensor([centre[k] for k in labels.tolist()]),
                      visible, len(centre) - 1)


def clip_truth(clip, cfg) -> list[FrameTruth]:
    return [frame_truth(clip.sprites, float(t), cfg.image_size, cfg.patch_size) for t in world.SAMPLE_TIMES]


def scene_loss(logits: torch.Tensor, truths: list[FrameTruth]) -> torch.Tensor:
    """logits [F, SCENE_OUTPUTS] -> which objects are in view (BCE) + how many (CE)."""
    visible = torch.stack([t.visible for t in truths])
    count = torch.tensor([t.count for t in truths])
    return (F.binary_cross_entropy_with_logits(logits[:, :N_OBJECTS], visible)
            + F.cross_entropy(logits[:, N_OBJECTS:], count))


def pretrain_vision(model: LlamaVid, frames: dict, clips, steps: int, lr: float, batch: int, seed: int) -> float:
    """Stage 0: EvaViT + linear probes. Per output patch token: the object on it and that object's
    centre; on the mean of the patch tokens (what the content token pools): which objects are in view
    and how many. Positions must survive into the features the context attention averages (direction
    questions), and the scene into their mean (count, first). Returns the accuracy on object patches."""
    v = model.config.vision
    n_cls = 1 + N_OBJECTS
    px = torch.cat([frames[c.video] for c in clips])                                 # [C*8,3,S,S]
    truths = [t for c in clips for t in clip_truth(c, v)]
    labels = torch.stack([t.labels for t in truths])                                 # [C*8,N]
    centres = torch.stack([t.centres for t in truths])                               # [C*8,N,2]
    probe = torch.nn.Linear(v.width, n_cls + 2)
    scene = torch.nn.Linear(v.width, SCENE_OUTPUTS)
    weight = torch.full((n_cls,), 5.0)
    weight[0] = 1.0                                    # objects cover few patches: weigh them up
    params = [*model.vision.parameters(), *probe.parameters(), *scene.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    gen = torch.Generator().manual_seed(seed)
    model.vision.train()
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(step - 1, steps, lr, 0.03)
        idx = torch.randint(0, len(px), (batch,), generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            feats = model.vision(px[idx])[:, 1:]                                      # [B,N,C]
            out = probe(feats)                                                        # [B,N,cls+2]
        feats, out = feats.float(), out.float()
        logits, obj = out[..., :n_cls], labels[idx] > 0
        loss = (F.cross_entropy(logits.flatten(0, 1), labels[idx].flatten(), weight=weight)
                + 20 * F.mse_loss(out[..., -2:][obj], centres[idx][obj])
                + scene_loss(scene(feats.mean(1)), [truths[i] for i in idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 20 == 0 or step == steps:
            acc = float((logits.argmax(-1) == labels[idx])[obj].float().mean())
            err = float((out.detach()[..., -2:][obj] - centres[idx][obj]).abs().mean()) * world.FRAME_SIZE
            print(f"stage 0 (vision) step {step}/{steps}  loss {float(loss.detach()):.4f}  "
                  f"object-patch accuracy {acc:.3f}  centre error {err:.1f} px", flush=True)
    model.vision.eval()
    return acc


def grounding_items(clips, cfg):
    """(clip, Q-Former prompt, frame truths, named sprite or None) for every question a clip answers."""
    items = []
    for c in clips:
        truths = clip_truth(c, cfg)
        for qtype in world.QTYPES:
            for i in (range(len(c.sprites)) if qtype in world.OBJECT_QTYPES else [None]):
                if qa := world.ask(c.sprites, qtype, i):
                    items.append((c, qa[0], truths, None if i is None else c.sprites[i]))
    return items


XY_SCALE = 8.0   # the named object's centre in the context token spans +-4: as salient as the rest


def fixed_readout(width: int, outputs: int, seed: int) -> torch.Tensor:
    """[width, outputs] orthonormal columns, never trained: the tokens themselves must carry the
    targets at unit scale. (A learned readout let the position hide in directions the LLM then
    did not learn to read: direction stayed at chance; with this it was learned, docs/BENCHMARKS.md.)"""
    q, _ = torch.linalg.qr(torch.randn(width, outputs, generator=torch.Generator().manual_seed(seed)))
    return q


def readout_maps(model: LlamaVid, seed: int) -> tuple[bool, bool, torch.Tensor, torch.Tensor]:
    """(has context token, has content tokens, named readout [H,NAMED_OUTPUTS], scene readout [H,SCENE_OUTPUTS])."""
    tokens = model.config.head.tokens
    named, scene = fixed_readout(model.config.llm.hidden, NAMED_OUTPUTS + SCENE_OUTPUTS, seed).split(
        [NAMED_OUTPUTS, SCENE_OUTPUTS], 1)
    return tokens != "content", tokens != "context", named, scene


def in_view(sprite) -> torch.Tensor:
    """[8] bool: the sprite is visible in each sampled frame."""
    return torch.tensor([sprite.visible(float(t)) for t in world.SAMPLE_TIMES])


def named_loss(logits: torch.Tensor, sprite) -> tuple[torch.Tensor, float]:
    """logits [8, NAMED_OUTPUTS] from one question's context tokens -> loss on whether the named
    sprite is in view, its colour and its centre (where in view); and the in-view accuracy."""
    present = in_view(sprite)
    colour = torch.full((int(present.sum()),), list(world.COLORS).index(sprite.color))
    centre = torch.tensor([sprite.center(float(t)) for t in world.SAMPLE_TIMES])[present] / world.FRAME_SIZE
    loss = (F.cross_entropy(logits[:, :2], present.long()) + F.cross_entropy(logits[present, 2:-2], colour)
            + F.mse_loss(logits[present, -2:], (centre - 0.5) * XY_SCALE))
    return loss, float((logits[:, :2].argmax(-1) == present).float().mean())


def ground_tokens(model: LlamaVid, frames: dict, clips, steps: int, lr: float, batch: int, seed: int) -> float:
    """Stage 1 (ours): make the head's tokens say what the questions ask about, before any LLM reads
    them. Fixed linear readouts on each frame's tokens, for the question that prompts the Q-Former:
    context token -> the named object in view?, its colour, its centre (object questions) or the
    scene (whole-clip questions: its attention finds the objects that the content token's mean over
    all patches dilutes); content token -> the scene: which objects are in view, how many. Trains
    the Q-Former, its queries and every head projector (the vision encoder stays frozen). Ablations
    without one of the tokens skip its targets. Returns the context token's in-view accuracy on the
    last batch."""
    head = model.head
    items = grounding_items(clips, model.config.vision)
    has_context, has_content, named, scene = readout_maps(model, seed)
    params = list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr)
    gen, T = torch.Generator().manual_seed(seed), len(world.SAMPLE_TIMES)
    with torch.no_grad():
        feats = {c.video: model.vision(frames[c.video]) for c in clips}              # [8,N+1,Cv] each
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(step - 1, steps, lr, 0.03)
        chosen = [items[i] for i in torch.randint(0, len(items), (batch,), generator=gen).tolist()]
        ids, mask = model.qformer_tokenizer([q for _, q, _, _ in chosen])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tokens = head(torch.cat([feats[c.video] for c, *_ in chosen]),
                          ids.repeat_interleave(T, 0), mask.repeat_interleave(T, 0)).float()  # [B*8,n+1,H]
        tokens = tokens.unflatten(0, (batch, T))                                      # [B,8,n+1,H]
        loss, parts = torch.zeros(()), []
        if has_content:      # the scene from the mean of the content tokens (n = 1, or k*k for grid:k)
            content = tokens[:, :, int(has_context):].mean(2).flatten(0, 1)           # [B*8,H]
            loss = scene_loss(content @ scene, [t for _, _, ts, _ in chosen for t in ts])
        if has_context:
            parts = [named_loss(tokens[k, :, 0] @ named, sp) for k, (*_, sp) in enumerate(chosen) if sp is not None]
            loss = loss + sum(p[0] for p in parts) / max(1, len(parts))
            whole = [k for k, (*_, sp) in enumerate(chosen) if sp is None]   # whole-clip questions: the scene
            if whole:
                loss = loss + scene_loss(tokens[whole, :, 0].flatten(0, 1) @ scene, [t for k in whole for t in chosen[k][2]])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        acc = sum(p[1] for p in parts) / max(1, len(parts))
        if step % 20 == 0 or step == steps:
            print(f"stage 1 (grounding) step {step}/{steps}  loss {float(loss.detach()):.4f}  "
                  f"named object in view accuracy {acc:.3f}", flush=True)
    return acc


@torch.no_grad()
def readouts(model: LlamaVid, frames: dict, clips, seed: int) -> dict:
    """Stage 1's fixed readouts on held-out clips, each prompted by its own question: what the head's
    tokens carry, so the ceiling of what stage 2 can read from them. Per frame, unless per question."""
    has_context, has_content, named, scene = readout_maps(model, seed)
    hits = {}
    for c in clips:
        feats, truths = model.vision(frames[c.video]), clip_truth(c, model.config.vision)
        ids, mask = model.qformer_tokenizer([c.question])
        T = len(feats)
        tokens = model.head(feats, ids.repeat_interleave(T, 0), mask.repeat_interleave(T, 0))   # [8,n+1,H]
        if has_content:
            out = tokens[:, int(has_context):].mean(1) @ scene                                   # [8,SCENE_OUTPUTS]
            visible = torch.stack([t.visible for t in truths])
            hits.setdefault("scene: objects in view", []).extend(((out[:, :N_OBJECTS] > 0) == (visible > 0)).all(1).tolist())
            hits.setdefault("scene: how many", []).extend((out[:, N_OBJECTS:].argmax(-1) == torch.tensor(
                [t.count for t in truths])).tolist())
        if has_context and c.qtype in world.OBJECT_QTYPES:
            sp = next(s for i, s in enumerate(c.sprites) if world.ask(c.sprites, c.qtype, i) == (c.question, c.answer))
            out = tokens[:, 0] @ named                                                           # [8,NAMED_OUTPUTS]
            present = in_view(sp)
            hits.setdefault("named object: in view", []).extend((out[:, :2].argmax(-1) == present).tolist())
            hits.setdefault("named object: colour", []).extend(
                (out[present, 2:-2].argmax(-1) == list(world.COLORS).index(sp.color)).tolist())
            if c.qtype == "direction":
                dx, dy = (out[present, -2:][-1] - out[present, -2:][0]).tolist()
                guess = max(world.DIRECTIONS, key=lambda d: world.DIRECTIONS[d][0] * dx + world.DIRECTIONS[d][1] * dy)
                hits.setdefault("named object: direction, per question", []).append(guess == sp.motion)
    return {k: sum(v) / len(v) for k, v in hits.items()}


def examples_for(model: LlamaVid, data: Path, clips, all_questions: bool):
    """(examples, their question types, frames by video path): every question a clip answers and
    its caption (train) or its own question (eval)."""
    out, qtypes, frames = [], [], {}
    for c in clips:
        px = frames[c.video] = model.load_media(load_video(data / c.video).frames)
        qas = world.questions(c.sprites) if all_questions else [(c.qtype, c.question, c.answer)]
        qas += [("caption", CAPTION_PROMPT, world.caption(c.sprites))] if all_questions else []
        out += [build_example(model, [("human", "<image>\n" + q), ("gpt", a)], px) for _, q, a in qas]
        qtypes += [t for t, _, _ in qas]
    return out, qtypes, frames


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/default", help="world data and stage checkpoints")
    ap.add_argument("--out", default=str(checkpoint.DEFAULT_MODEL_DIR))
    ap.add_argument("--preset", default="default")
    ap.add_argument("--train-clips", type=int, default=2000)
    ap.add_argument("--eval-clips", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stage0-steps", type=int, default=2500, help="vision pre-training steps")
    ap.add_argument("--stage0-batch", type=int, default=64, help="frames per vision step")
    ap.add_argument("--stage1-steps", type=int, default=1500,
                    help="head grounding steps (0: skip, and stage 2 trains the head as well)")
    ap.add_argument("--stage1-batch", type=int, default=64, help="questions per grounding step")
    ap.add_argument("--lr1", type=float, default=2e-3)
    ap.add_argument("--stage2-epochs", type=float, default=3.0)
    ap.add_argument("--motion-warmup", type=int, default=800,
                    help="stage 2 first trains this many steps on direction questions alone (0: none)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr0", type=float, default=2e-3)
    ap.add_argument("--lr2", type=float, default=1e-3)
    ap.add_argument("--head-tokens", default="both", choices=("both", "context", "content"),
                    help="ablation: which per-frame tokens the LLM gets")
    ap.add_argument("--compress", default="mean", help="content pooling: mean (n=1) | grid:k (n=k*k)")
    ap.add_argument("--vision-from", help="take the stage-0 vision encoder from this checkpoint (ablations)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 measured 3-6x faster than 2 on a 2-core machine with other work)")
    a = ap.parse_args(argv)
    marks, work, minutes = [time.perf_counter()], Path(a.work), {}

    def lap(name: str):
        marks.append(time.perf_counter())
        minutes[name] = round((marks[-1] - marks[-2]) / 60, 2)
        print(f"[recipe] {name}: {minutes[name]:.1f} min", flush=True)

    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    counts = {"train": a.train_clips, "val": a.eval_clips, "test": a.eval_clips}
    if not (work / "world" / "world.json").is_file() or \
            json.loads((work / "world" / "world.json").read_text()).get("counts") != counts:
        world.generate(work / "world", counts, seed=a.seed, captions=True)
    clips = {s: world.make_split(s, n, a.seed) for s, n in counts.items()}
    cfg = from_name(a.preset)
    cfg.head.tokens, cfg.head.compress_type = a.head_tokens, a.compress
    tok, vocab = build_tokenizers(corpus(clips["train"]), work / "tokenizer", cfg.llm.vocab_size, cfg.qformer.vocab_size)
    model = random_init(LlamaVid(cfg), a.seed, std=0.02)
    model.tokenizer = LLMTokenizer(tok, cfg.llm.bos_id, cfg.llm.eos_id)
    model.qformer_tokenizer = QFormerTokenizer(vocab, cfg.qformer.max_text_len)
    train_ex, train_types, train_frames = examples_for(model, work / "world", clips["train"], all_questions=True)
    print(f"{len(train_ex)} training examples from {len(clips['train'])} clips "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters)")
    eval_frames = {s: examples_for(model, work / "world", clips[s], all_questions=False)[2] for s in ("val", "test")}
    lap("data")
    if a.vision_from:
        model.vision.load_state_dict(checkpoint.load(a.vision_from).vision.state_dict())
    else:
        pretrain_vision(model, train_frames, clips["train"], a.stage0_steps, a.lr0, a.stage0_batch, a.seed)
    lap("stage 0")
    found = {}
    if a.stage1_steps:
        ground_tokens(model, train_frames, clips["train"], a.stage1_steps, a.lr1, a.stage1_batch, a.seed)
        found = readouts(model, eval_frames["val"], clips["val"], a.seed)
        print("stage 1 readouts on val: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in found.items()))
    lap("stage 1")
    trainable = ("llm.",) if a.stage1_steps else None
    if a.motion_warmup:
        motion = [e for e, t in zip(train_ex, train_types) if t == "direction"]
        train(model, motion, 2, work / "stage2-motion", lr=a.lr2, epochs=a.motion_warmup * a.batch_size / len(motion),
              batch_size=a.batch_size, seed=a.seed, save_every=500, max_tokens=cfg.max_token, bf16=True,
              trainable=trainable)
    train(model, train_ex, 2, work / "stage2", lr=a.lr2, epochs=a.stage2_epochs, batch_size=a.batch_size,
          seed=a.seed, save_every=500, max_tokens=cfg.max_token, bf16=True, trainable=trainable)
    checkpoint.save(model, a.out)
    lap("stage 2")
    results = {}
    for split in ("val", "test"):
        entries = json.loads((work / "world" / f"{split}.json").read_text())
        results[split] = score(predict(greedy(model), entries, work / "world", frames_cache=eval_frames[split]))
        print(f"{split}:\n{report(results[split])}")
    lap("evaluation")
    (Path(a.out) / "recipe.json").write_text(json.dumps(
        {"args": vars(a), "stage1_readouts_val": found, "results": results, "minutes": round((marks[-1] - marks[0]) / 60, 1), "minutes_per_step": minutes},
        indent=2) + "\n")
    print(f"wrote {a.out} in {(marks[-1] - marks[0]) / 60:.1f} min")


if __name__ == "__main__":
    main()
