"""LLaMA-VID assembly: vision -> head -> LLM, prompt assembly, generation, chat, long video.

    video [T,3,S,S] --vision--> [T,N+1,Cv] --head(Q-Former prompt)--> [T,n+1,H] --flatten--> [T*(n+1),H]
    input_ids  [bos, ..., -200, ..., ]  each -200 placeholder is replaced by ALL visual tokens of its
                                        image or video (frame-major: ctx0, cont0, ctx1, cont1, ...)
    -> inputs_embeds [1,T',H] --llm--> logits
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import FRAME_CHUNK, IMAGE_TOKEN_INDEX, LlamaVidConfig
from .head import DualTokenHead
from .llm import LlamaLM
from .preprocess import preprocess, preprocess_video
from .sampling import Rng, sample
from .templates import Conversation, question_prompt
from .vision import EvaViT

LONG_VIDEO_INTRO = "Below is a movie. Memorize the content and answer my question after watching this movie."
LONG_VIDEO_OUTRO = "Now the movie end.\n"


def chunked(fn, *tensors):
    """fn over FRAME_CHUNK-frame slices of tensors that share their first (frame) axis, concatenated."""
    n = tensors[0].shape[0]
    return torch.cat([fn(*(t[i:i + FRAME_CHUNK] for t in tensors)) for i in range(0, n, FRAME_CHUNK)])


class LlamaVid(nn.Module):
    def __init__(self, cfg: LlamaVidConfig, tokenizer=None, qformer_tokenizer=None):
        super().__init__()
        self.config = cfg
        self.vision = EvaViT(cfg.vision)
        self.head = DualTokenHead(cfg.head, cfg.qformer, cfg.vision.width, cfg.llm.hidden)
        self.llm = LlamaLM(cfg.llm)
        self.tokenizer = tokenizer                    # LLMTokenizer
        self.qformer_tokenizer = qformer_tokenizer    # QFormerTokenizer
        self.vision_cache: dict | None = None         # training with a frozen encoder: id(media) -> features

    # ---- visual tokens -------------------------------------------------------------------------
    def encode_frames(self, pixel_values, qformer_input_ids, qformer_attention_mask=None):
        """pixel_values [F,3,S,S]; Q-Former ids/mask [F,L] (one row per frame) or [1,L] -> [F,n+1,H]."""
        Fr = pixel_values.shape[0]
        if qformer_attention_mask is None:
            qformer_attention_mask = torch.ones_like(qformer_input_ids)
        if qformer_input_ids.shape[0] == 1:
            qformer_input_ids = qformer_input_ids.expand(Fr, -1)
            qformer_attention_mask = qformer_attention_mask.expand(Fr, -1)
        if qformer_input_ids.shape[0] != Fr:
            raise ValueError(f"encode_frames: expected Q-Former ids [1,L] or [{Fr},L], found {list(qformer_input_ids.shape)}")
        return chunked(lambda px, ids, mask: self.head(self.vision(px), ids, mask),
                       pixel_values, qformer_input_ids, qformer_attention_mask)

    def visual_tokens(self, images, prompts) -> list[torch.Tensor]:
        """Images [3,S,S] / videos [T,3,S,S] with one Q-Former prompt each -> one [T*(n+1),H] block
        each (frame-major), all frames encoded in one batched call."""
        if self.qformer_tokenizer is None:
            raise RuntimeError("visual_tokens needs the Q-Former tokenizer: load the model with llamavid_ref.load")
        frames = [m[None] if m.dim() == 3 else m for m in images]
        counts = torch.tensor([f.shape[0] for f in frames])
        ids, mask = self.qformer_tokenizer(list(prompts))                                # [K,L]
        ids, mask = ids.repeat_interleave(counts, 0), mask.repeat_interleave(counts, 0)  # [sum T,L]
        ids, mask = ids.to(self.device), mask.to(self.device)
        # The vision stage is question-independent: run it once per distinct media tensor.
        unique = {id(f): f for f in frames}
        feats = {k: self._vision(f) for k, f in unique.items()}
        vision_feats = torch.cat([feats[id(f)] for f in frames])                         # [sum T,N+1,Cv]
        tokens = chunked(self.head, vision_feats, ids, mask)                             # [sum T,n+1,H]
        return [t.flatten(0, 1) for t in tokens.split(counts.tolist())]

    @property
    def device(self) -> torch.device:
        return self.llm.lm_head.weight.device

    def _vision(self, frames):
        """[T,3,S,S] (moved to the model's device and float type) -> [T,N+1,Cv]; memoised per
        media tensor while vision_cache is a dict."""
        def encode(f):
            return chunked(self.vision, f.to(self.device, self.llm.lm_head.weight.dtype))
        if self.vision_cache is None:
            return encode(frames)
        if id(frames) not in self.vision_cache:       # the tensor is kept so its id stays unique
            with torch.no_grad():
                self.vision_cache[id(frames)] = (frames, encode(frames))
        return self.vision_cache[id(frames)][1]

    # ---- prompt assembly -----------------------------------------------------------------------
    def embed(self, input_ids, images=None, prompts=None, attention_mask=None):
        """input_ids [B,T] with -200 placeholders -> (inputs_embeds [B,T',H], attention_mask [B,T']).
        Placeholders take images[k] / prompts[k] in order, row by row; rows are right-padded."""
        images, prompts = list(images or []), list(prompts or [])
        n_ph = int((input_ids == IMAGE_TOKEN_INDEX).sum())
        if not (n_ph == len(images) == len(prompts)):
            raise ValueError(f"prompt assembly: expected one image and one Q-Former prompt per <image> "
                             f"placeholder; found {n_ph} placeholders, {len(images)} images, {len(prompts)} prompts")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        emb = self.llm.embed_tokens
        visual = self.visual_tokens(images, prompts) if images else []
        rows, k = [], 0
        for ids in (row[m.bool()] for row, m in zip(input_ids, attention_mask)):
            pieces, start = [], 0
            for pos in (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist():
                pieces += [emb(ids[start:pos]), visual[k]]
                start, k = pos + 1, k + 1
            pieces.append(emb(ids[start:]))
            rows.append(torch.cat(pieces))
        T = max(r.shape[0] for r in rows)
        H = self.config.llm.hidden
        embeds = torch.zeros(len(rows), T, H, dtype=rows[0].dtype, device=self.device)
        mask = torch.zeros(len(rows), T, dtype=torch.long, device=self.device)
        for i, r in enumerate(rows):
            embeds[i, :r.shape[0]], mask[i, :r.shape[0]] = r, 1
        return embeds, mask

    def forward(self, input_ids, images=None, prompts=None, attention_mask=None):
        """Logits [B,T',V] over the assembled sequence, like the release's forward."""
        embeds, mask = self.embed(input_ids, images, prompts, attention_mask)
        return self.llm(embeds, mask)[0]

    # ---- generation ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids, images=None, prompts=None, max_new_tokens=512, do_sample=False,
                 temperature=0.2, top_p=0.7, seed=0, attention_mask=None, top_k=0, repetition_penalty=1.0):
        """New token ids [B,K] (rows ending early padded with pad_id); greedy, or seeded sampling with the
        sampler of sampling.py (temperature, top-k, top-p, repetition penalty over the row's text ids and
        the generated ones), one RNG per call."""
        embeds, mask = self.embed(input_ids, images, prompts, attention_mask)
        rng = Rng(seed)
        sampling = dict(temperature=temperature if do_sample else 0.0, top_k=top_k, top_p=top_p,
                        repetition_penalty=repetition_penalty)
        rows = input_ids if attention_mask is None else [r[m.bool()] for r, m in zip(input_ids, attention_mask)]
        outs = [self._generate_row(e[m.bool()][None], [int(i) for i in ids if i >= 0], max_new_tokens, sampling, rng)
                for e, m, ids in zip(embeds, mask, rows)]
        K = max(len(o) for o in outs)
        result = torch.full((len(outs), K), self.config.llm.pad_id, dtype=torch.long)
        for i, o in enumerate(outs):
            result[i, :len(o)] = torch.tensor(o, dtype=torch.long)
        return result

    def _generate_row(self, embeds, history, max_new_tokens, sampling, rng) -> list[int]:
        limit = self.config.llm.max_positions
        T = embeds.shape[1]
        if T >= limit:
            raise ValueError(f"prompt too long: {T} tokens (text + visual) do not fit the LLM context of "
                             f"{limit} positions; use fewer frames or a shorter question")
        logits, past = self.llm(embeds)
        out: list[int] = []
        for _ in range(min(max_new_tokens, limit - T)):
            token = sample(logits[0, -1].float().cpu().numpy(), history=history + out, rng=rng, **sampling)
            out.append(token)
            if token == self.config.llm.eos_id:
                break
            nxt = self.llm.embed_tokens(torch.tensor([[token]], device=embeds.device))
            logits, past = self.llm(nxt, past=past)
        return out

    # ---- text in, text out ---------------------------------------------------------------------
    def load_media(self, media) -> torch.Tensor:
        """A video path, image path, PIL image, uint8 array ([H,W,3] image or [T,H,W,3] video) or a
        ready tensor -> pixel values ([3,S,S] image or [T,3,S,S] video)."""
        S = self.config.vision.image_size
        mean, std = self.config.image_mean, self.config.image_std
        pad = self.config.image_aspect_ratio == "pad"
        if isinstance(media, torch.Tensor):
            return media
        if isinstance(media, (str, Path)):
            from PIL import Image, UnidentifiedImageError
            try:
                return preprocess(Image.open(media), S, pad, mean, std)
            except (UnidentifiedImageError, IsADirectoryError):
                from .video import load_video
                return preprocess_video(load_video(media).frames, S, mean, std)
        if isinstance(media, np.ndarray) and media.ndim == 4:
            return preprocess_video(media, S, mean, std)
        return preprocess(media, S, pad, mean, std)

    def ask(self, media, question: str, max_new_tokens=512, **sampling) -> str:
        """One question about one image or video (path, array, PIL image or pixel tensor)."""
        ids = torch.tensor([self.tokenizer.encode_prompt(question_prompt(question, self.config.template))])
        new = self.generate(ids, [self.load_media(media)], [question], max_new_tokens=max_new_tokens, **sampling)
        return self.decode(new[0])

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.config.llm.eos_id in ids:
            ids = ids[:ids.index(self.config.llm.eos_id)]
        return self.tokenizer.decode(ids).strip()

    def long_video_inputs(self, frames: torch.Tensor, question: str, subtitles=None):
        """Long-video mode: every frame is its own <image> (Q-Former prompt = the question) followed
        by its subtitle text. frames [T,3,S,S] -> (input_ids [1,L], images, prompts)."""
        subtitles = list(subtitles) if subtitles is not None else [""] * len(frames)
        if len(subtitles) != len(frames):
            raise ValueError(f"long video: expected one subtitle per frame ({len(frames)}), found {len(subtitles)}")
        body = "".join("<image>" + s for s in subtitles)
        user = f"{LONG_VIDEO_INTRO}\n{body}\n{LONG_VIDEO_OUTRO}{question}"
        prompt = Conversation.new(self.config.template).add_user(user).add_assistant(None).prompt()
        ids = torch.tensor([self.tokenizer.encode_prompt(prompt)])
        return ids, [f[None] for f in frames], [question] * len(frames)


class Chat:
    """Multi-turn chat about one image or video. Each turn re-encodes the media with the newest
    question as the Q-Former prompt (the context token follows the question being asked)."""

    def __init__(self, model: LlamaVid, media=None):
        self.model = model
        self.media = model.load_media(media) if media is not None else None
        self.conv = Conversation.new(model.config.template)

    def ask(self, question: str, max_new_tokens=512, **sampling) -> str:
        first = not self.conv.messages
        self.conv.add_user(("<image>\n" + question) if (first and self.media is not None) else question)
        self.conv.add_assistant(None)
        ids = torch.tensor([self.model.tokenizer.encode_prompt(self.conv.prompt())])
        media = [self.media] if self.media is not None else []
        new = self.model.generate(ids, media, [question] * len(media), max_new_tokens=max_new_tokens, **sampling)
        answer = self.model.decode(new[0])
        self.conv.messages[-1] = (self.conv.template.roles[1], answer)
        return answer
