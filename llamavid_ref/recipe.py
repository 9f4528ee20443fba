"""python -m llamavid_ref.recipe: build the shipped default model from nothing, on CPU.

    synthetic world (seed) ─> tokenizers (BPE for the LLM, WordPiece for the Q-Former)
      ─> random init of the "default" preset
      ─> stage 0: the vision encoder alone, labelling every patch with the object on it
      ─> stage 2: all but the vision encoder (Q-Former, head, LLM) on captions + QA
      ─> evaluate val/test ─> llamavid_ref/default_model

No small pretrained vision encoder or LLM exists offline. Stage 0 (ours) pre-trains the encoder
that the paper takes from EVA: a linear probe on each output patch token predicts which
(shape, colour) covers that patch, from the world's geometry. The encoder is then frozen, as in all
of the paper's stages. Stage 1 (alignment to a frozen pretrained LLM) has nothing to align to here,
so the recipe goes to stage 2 (instruction tuning) with a from-scratch learning rate. Training end
to end from random weights instead was measured: the context path saturates (raw patch features
grow large, the context softmax goes one-hot, its gradient vanishes) and accuracy stays at chance.
"""
from __future__ import annotations

import argparse
import json
import time
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


def patch_labels(sprites, t: float, image: int, patch: int) -> torch.Tensor:
    """[grid*grid] class per patch: 0 background, 1 + shape*4 + colour for the object covering
    at least a quarter of the patch (the world's own masks, at the frame's time)."""
    yy, xx = np.mgrid[0:image, 0:image] * (world.FRAME_SIZE / image)
    owner = np.zeros((image, image), np.int64)
    for s in sprites:
        if s.visible(t):
            owner[world._mask(s.shape, *s.center(t), xx, yy)] = object_class(s)
    g = image // patch
    blocks = owner.reshape(g, patch, g, patch).transpose(0, 2, 1, 3).reshape(g * g, patch * patch)
    labels = np.zeros(g * g, np.int64)
    for i, b in enumerate(blocks):
        counts = np.bincount(b[b > 0], minlength=1)
        if counts.size > 1 and counts.max() >= patch * patch / 4:
            labels[i] = counts.argmax()
    return torch.from_numpy(labels)


def pretrain_vision(model: LlamaVid, frames: dict, clips, steps: int, lr: float, batch: int, seed: int) -> float:
    """Stage 0: EvaViT + a linear probe per output patch token predicting the (shape, colour) on it
    and the patch's own row and column (so positions survive into the features that context
    attention averages: direction questions need them). Returns the accuracy on object patches."""
    v = model.config.vision
    g, n_cls = v.grid, 1 + len(world.SHAPES) * len(world.COLORS)
    px = torch.cat([frames[c.video] for c in clips])                                 # [C*8,3,S,S]
    labels = torch.stack([patch_labels(c.sprites, float(t), v.image_size, v.patch_size)
                          for c in clips for t in world.SAMPLE_TIMES])              # [C*8,N]
    rows, cols = torch.arange(g * g) // g, torch.arange(g * g) % g                   # [N]
    probe = torch.nn.Linear(v.width, n_cls + 2 * g)
    weight = torch.full((n_cls,), 5.0)
    weight[0] = 1.0                                    # objects cover few patches: weigh them up
    params = list(model.vision.parameters()) + list(probe.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    gen = torch.Generator().manual_seed(seed)
    model.vision.train()
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(step - 1, steps, lr, 0.03)
        idx = torch.randint(0, len(px), (batch,), generator=gen)
        out = probe(model.vision(px[idx])[:, 1:])                                     # [B,N,cls+2g]
        logits = out[..., :n_cls]
        loss = (F.cross_entropy(logits.flatten(0, 1), labels[idx].flatten(), weight=weight)
                + F.cross_entropy(out[..., n_cls:n_cls + g].flatten(0, 1), rows.repeat(batch))
                + F.cross_entropy(out[..., n_cls + g:].flatten(0, 1), cols.repeat(batch)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0 or step == steps:
            fg = labels[idx] > 0
            acc = float((logits.argmax(-1) == labels[idx])[fg].float().mean())
            print(f"stage 0 (vision) step {step}/{steps}  loss {float(loss.detach()):.4f}  "
                  f"object-patch accuracy {acc:.3f}", flush=True)
    model.vision.eval()
    return acc


def object_questions(clip):
    """(question, target sprite) for every object-specific question the clip answers."""
    return [(qa[0], sp) for qtype in world.OBJECT_QTYPES for i, sp in enumerate(clip.sprites)
            if (qa := world.ask(clip.sprites, qtype, i))]


def align_context(model: LlamaVid, frames: dict, clips, steps: int, lr: float, batch: int, seed: int) -> float:
    """Stage 1 (ours): teach the context attention to look at the object the question names.
    Target: uniform over the patches the named object covers in each frame where it is visible;
    loss: cross-entropy of the query-averaged attention over patches. Trains the Q-Former, its
    queries and the att/key projectors (the vision encoder stays frozen). Returns the mean attention
    mass on the named object over the last batch."""
    v, head = model.config.vision, model.head
    items = [(c, q, sp) for c in clips for q, sp in object_questions(c)]
    targets = []
    for c, _, sp in items:
        on = torch.stack([patch_labels(c.sprites, float(t), v.image_size, v.patch_size) == object_class(sp)
                          for t in world.SAMPLE_TIMES]).float()                         # [8,N]
        targets.append(on / on.sum(-1, keepdim=True).clamp(min=1))
    params = [head.query, *head.qformer.parameters(), *head.att_projector.parameters(),
              *head.key_projector.parameters(), *head.ln.parameters()]
    opt = torch.optim.AdamW(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    feats_cache: dict = {}
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(step - 1, steps, lr, 0.03)
        idx = torch.randint(0, len(items), (batch,), generator=gen).tolist()
        with torch.no_grad():
            feats = torch.cat([feats_cache.setdefault(items[i][0].video, model.vision(frames[items[i][0].video]))
                               for i in idx])                                            # [B*8,N+1,C]
        ids, mask = model.qformer_tokenizer([items[i][1] for i in idx])
        ids, mask = ids.repeat_interleave(8, 0), mask.repeat_interleave(8, 0)
        text_q = head.text_queries(feats, ids, mask)                                     # [B*8,Q,C]
        patches = feats[:, 1:]
        attn = (text_q @ head.key_projector(patches).transpose(-1, -2) / patches.shape[-1] ** 0.5).softmax(-1)
        attn = attn.mean(1)                                                              # [B*8,N]
        target = torch.cat([targets[i] for i in idx])                                    # [B*8,N]
        visible = target.sum(-1) > 0
        loss = -(target * attn.clamp_min(1e-9).log()).sum(-1)[visible].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        mass = float((attn * (target > 0)).sum(-1)[visible].mean())
        if step % 20 == 0 or step == steps:
            print(f"stage 1 (context) step {step}/{steps}  loss {float(loss.detach()):.4f}  "
                  f"attention on the named object {mass:.3f}", flush=True)
    return mass


def examples_for(model: LlamaVid, data: Path, clips, all_questions: bool):
    """(example list, frames by video path): every question a clip answers (train) or its own (eval)."""
    out, frames = [], {}
    for c in clips:
        px = frames[c.video] = model.load_media(load_video(data / c.video).frames)
        qas = [(q, a) for _, q, a in world.questions(c.sprites)] if all_questions else [(c.question, c.answer)]
        qas += [(CAPTION_PROMPT, world.caption(c.sprites))] if all_questions else []
        out += [build_example(model, [("human", "<image>\n" + q), ("gpt", a)], px) for q, a in qas]
    return out, frames


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/default", help="world data and stage checkpoints")
    ap.add_argument("--out", default=str(checkpoint.DEFAULT_MODEL_DIR))
    ap.add_argument("--preset", default="default")
    ap.add_argument("--train-clips", type=int, default=3000)
    ap.add_argument("--eval-clips", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stage0-steps", type=int, default=1500, help="vision pre-training steps")
    ap.add_argument("--stage0-batch", type=int, default=64, help="frames per vision step")
    ap.add_argument("--stage1-steps", type=int, default=0, help="context-attention alignment steps (0: skip; see docs/BENCHMARKS.md)")
    ap.add_argument("--stage1-batch", type=int, default=32, help="questions per alignment step")
    ap.add_argument("--lr1", type=float, default=2e-3)
    ap.add_argument("--stage2-epochs", type=float, default=4.0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr0", type=float, default=2e-3)
    ap.add_argument("--lr2", type=float, default=2e-3)
    ap.add_argument("--head-tokens", default="both", choices=("both", "context", "content"),
                    help="ablation: which per-frame tokens the LLM gets")
    ap.add_argument("--compress", default="mean", help="content pooling: mean (n=1) | grid:k (n=k*k)")
    ap.add_argument("--vision-from", help="take the stage-0 vision encoder from this checkpoint (ablations)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 measured 3-6x faster than 2 on a 2-core machine with other work)")
    a = ap.parse_args(argv)
    t0, work = time.perf_counter(), Path(a.work)
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
    train_ex, train_frames = examples_for(model, work / "world", clips["train"], all_questions=True)
    print(f"{len(train_ex)} training examples from {len(clips['train'])} clips "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters)")
    if a.vision_from:
        model.vision.load_state_dict(checkpoint.load(a.vision_from).vision.state_dict())
    else:
        pretrain_vision(model, train_frames, clips["train"], a.stage0_steps, a.lr0, a.stage0_batch, a.seed)
    if a.stage1_steps:
        align_context(model, train_frames, clips["train"], a.stage1_steps, a.lr1, a.stage1_batch, a.seed)
    train(model, train_ex, 2, work / "stage2", lr=a.lr2, epochs=a.stage2_epochs, batch_size=a.batch_size,
          seed=a.seed, save_every=200, max_tokens=cfg.max_token)
    checkpoint.save(model, a.out)
    results = {}
    for split in ("val", "test"):
        _, frames = examples_for(model, work / "world", clips[split], all_questions=False)
        entries = json.loads((work / "world" / f"{split}.json").read_text())
        results[split] = score(predict(greedy(model), entries, work / "world", frames_cache=frames))
        print(f"{split}:\n{report(results[split])}")
    (Path(a.out) / "recipe.json").write_text(json.dumps(
        {"args": vars(a), "results": results, "minutes": round((time.perf_counter() - t0) / 60, 1)}, indent=2) + "\n")
    print(f"wrote {a.out} in {(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
