"""The pipeline: an artifact directory -> answers, driven only by manifest.json; each stage runs on the
fastest backend here that the manifest has a variant for (TensorRT engines, ONNX Runtime CUDA, OpenVINO
or CPU).

    media --load/preprocess--> pixel_values [T,3,S,S] --|vision|--> vision_feats [T,N+1,Cv]
    question --Q-Former tokenizer--> ids/mask [1,L] --|head|--> frame_tokens [T,n+1,H]   (frame-major)
    prompt text --LLM tokenizer--> ids with -200 --embed table + visual tokens--> inputs_embeds [1,P,H]
    --|llm| prefill--> logits --sample--> token --|llm| decode (KV cache in place)--> ... eos
      (prefill runs on the llm's "prefill" variant where one runs here; its KV cache is copied into the decoder's)

    p = Pipeline.open("artifacts/model")              # validates the manifest and every file hash
    p.ask("clip.mp4", "What happens?")                # -> str
    for piece in p.ask_stream(image, "What is it?"): print(piece, end="")
    chat = p.chat("clip.mp4"); chat.ask("..."); chat.ask("...")   # multi-turn
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from runtime.manifest import ManifestError, read_manifest

from .backends import available_backends, choose_variant, open_backend
from .backends.tensorrt import check_built_with


def frame_chunk(manifest: dict, chosen: dict) -> int:
    """Frames per vision/head call: the manifest's frame_chunk, or fewer where a chosen engine's optimisation
    profile stops below it (an engine variant records its profile: input -> min/opt/max shapes)."""
    limits = [manifest["runtime"]["frame_chunk"]]
    for stage in ("vision", "head"):
        inputs = manifest["stages"][stage]["inputs"]
        for name, dims in chosen[stage].get("profile", {}).items():
            if "frames" in inputs[name]["shape"]:
                limits.append(dims["max"][inputs[name]["shape"].index("frames")])
    return min(limits)


class Pipeline:
    def __init__(self, root: Path, manifest: dict, stages: dict, chosen: dict):
        from llamavid_ref.tokenizer import LLMTokenizer, QFormerTokenizer
        self.root, self.manifest, self.stages, self.chosen = root, manifest, stages, chosen
        self.frame_chunk = frame_chunk(manifest, chosen)
        m = manifest
        ids = m["special_ids"]
        self.bos, self.eos, self.image_id = ids["bos"], ids["eos"], ids["image"]
        self.tokenizer = LLMTokenizer(root / m["tokenizers"]["llm"], ids["bos"], ids["eos"])
        self.qformer_tokenizer = QFormerTokenizer(root / m["tokenizers"]["qformer"], m["tokenizers"]["qformer_max_length"])
        self.embed_table = np.load(root / m["llm"]["embeddings"], mmap_mode="r")        # [V,H]
        self.context = m["llm"]["context"]
        self.kv_layout = m["llm"]["kv_layout"]
        io = m["stages"]["llm"]
        self.past_names = [n for n in io["inputs"] if n.startswith("past_key_values.")]
        self.present_names = [n for n in io["outputs"] if n.startswith("present.")]
        self._kv: list[np.ndarray] = []          # shared layout: one [1,kvh,capacity,d] buffer per name

    @classmethod
    def open(cls, root, backend: str | None = None, threads: int | None = None, verify_hashes: bool = True,
             spin: bool = True, precision: str | None = None) -> "Pipeline":
        """Validate root/manifest.json (version, stages, hashes) and open each stage on the first backend
        (fastest first, or `backend`) that runs one of its variants, checked against the manifest's tensors;
        an engine built by another TensorRT or for another GPU is refused.
        spin=False: idle ORT threads sleep (for sharing the process with other compute, e.g. benchmarks).
        precision: run only that precision's variants; ORT's CPU provider then also runs the ort-cuda
        graphs (to measure fp16 accuracy on a machine without a GPU)."""
        root = Path(root)
        manifest = read_manifest(root, verify_hashes)
        available = [backend] if backend else available_backends()
        stages, chosen, backends = {}, {}, {}
        # (key, manifest stage, variant role): the llm's prefill graph is optional, every stage is not
        for key, name, role in (("vision", "vision", None), ("head", "head", None), ("llm", "llm", None),
                                ("llm_prefill", "llm", "prefill")):
            v = choose_variant(manifest["stages"][name]["variants"], available, precision, role)
            if v is None and role is None:
                have = sorted({(x["backend"], x["precision"]) for x in manifest["stages"][name]["variants"]})
                raise RuntimeError(f"stage {name}: expected a variant for backend {available}"
                                   f"{f' in {precision}' if precision else ''}, found only {have}")
            if v is None:
                continue
            if v["backend"] not in available:                 # an ort-cuda graph on the CPU provider
                v = {**v, "backend": "ort-cpu"}
            try:
                if "built_with" in v:
                    check_built_with(root / v["file"], v["built_with"])
                if v["backend"] not in backends:              # one backend object (one CUDA stream) per backend
                    backends[v["backend"]] = open_backend(v["backend"], threads, spin)
                stages[key] = backends[v["backend"]].open_stage(root / v["file"], io=manifest["stages"][name])
            except ValueError as e:
                raise ManifestError(f"artifacts {root}: stage {key}: {e}") from e
            chosen[key] = v
        return cls(root, manifest, stages, chosen)

    def describe(self) -> str:
        return ", ".join(f"{s.replace('_', ' ')}: {v['file']} {v['precision']} on {v['backend']}"
                         for s, v in self.chosen.items())

    # ---- media -> visual tokens -----------------------------------------------------------------
    def load_media(self, media) -> np.ndarray:
        """A video path, image path, PIL image, uint8 array ([H,W,3] image or [T,H,W,3] video) or ready
        pixel values ([3,S,S] / [T,3,S,S] float32) -> pixel values [T,3,S,S] float32."""
        from llamavid_ref.preprocess import preprocess, preprocess_video
        p = self.manifest["preprocess"]
        S, mean, std, pad = p["image_size"], p["mean"], p["std"], p["image_aspect_ratio"] == "pad"
        if isinstance(media, np.ndarray) and media.dtype == np.float32:
            px = media[None] if media.ndim == 3 else media
        elif hasattr(media, "numpy") and not isinstance(media, np.ndarray):          # a torch tensor
            return self.load_media(media.detach().float().numpy())
        elif isinstance(media, (str, Path)):
            from PIL import Image, UnidentifiedImageError
            try:
                img = Image.open(media)
            except (UnidentifiedImageError, IsADirectoryError, FileNotFoundError):
                from llamavid_ref.video import load_video
                px = preprocess_video(load_video(media, fps=p["video_fps"]).frames, S, mean, std).numpy()
            else:
                px = preprocess(img, S, pad, mean, std).numpy()[None]
        elif isinstance(media, np.ndarray) and media.ndim == 4:
            px = preprocess_video(media, S, mean, std).numpy()
        else:
            px = preprocess(media, S, pad, mean, std).numpy()[None]
        if px.ndim != 4 or px.shape[1:] != (3, S, S):
            raise ValueError(f"pixel values: expected [T,3,{S},{S}] float32, found {list(px.shape)}")
        return np.ascontiguousarray(px, dtype=np.float32)

    def visual_tokens(self, pixel_values: np.ndarray, qformer_prompt: str) -> np.ndarray:
        """[T,3,S,S] + one Q-Former prompt -> [T*(n+1),H], frame-major (ctx0, cont0, ctx1, ...)."""
        ids, mask = (t.numpy() for t in self.qformer_tokenizer([qformer_prompt]))          # [1,L]
        out = []
        for i in range(0, len(pixel_values), self.frame_chunk):
            px = pixel_values[i:i + self.frame_chunk]
            feats = self.stages["vision"].run({"pixel_values": px})["vision_feats"]
            out.append(self.stages["head"].run({"vision_feats": feats, "qformer_ids": ids,
                                                "qformer_mask": mask})["frame_tokens"])
        tokens = np.concatenate(out)
        return tokens.reshape(-1, tokens.shape[-1])

    # ---- prompt ---------------------------------------------------------------------------------
    def prompt_text(self, messages: list[tuple[str, str | None]]) -> str:
        """messages [(role index 0|1, text or None)] -> the template's text (the reference's Conversation)."""
        p = self.manifest["prompt"]
        out = p["system"] + p["sep"]
        for i, (role, text) in enumerate(messages):
            name = p["roles"][role]
            out += f"{name}: {text}" + (p["sep"], p["sep2"])[i % 2] if text else f"{name}:"
        return out

    def encode_prompt(self, prompt: str) -> list[int]:
        """BOS + each chunk between placeholders, the image id for each placeholder."""
        ids = [self.bos]
        for i, chunk in enumerate(prompt.split(self.manifest["prompt"]["image_placeholder"])):
            if i:
                ids.append(self.image_id)
            if chunk:
                ids += self.tokenizer.encode(chunk)
        return ids

    def embed(self, ids: list[int], visual: np.ndarray | None) -> np.ndarray:
        """ids with at most one image placeholder -> inputs_embeds [1,P,H]."""
        ids = np.asarray(ids)
        where = np.flatnonzero(ids == self.image_id)
        if len(where) != (0 if visual is None else 1):
            raise ValueError(f"prompt assembly: expected {0 if visual is None else 1} image placeholder(s), "
                             f"found {len(where)}")
        if visual is None:
            return self.embed_table[ids][None].astype(np.float32)
        k = where[0]
        return np.concatenate([self.embed_table[ids[:k]], visual, self.embed_table[ids[k + 1:]]])[None].astype(np.float32)

    # ---- generation -----------------------------------------------------------------------------
    def generate(self, embeds: np.ndarray, max_new_tokens=512, do_sample=False, temperature=0.2, top_p=0.7,
                 seed=0) -> Iterator[int]:
        """inputs_embeds [1,P,H] -> new token ids, one at a time (greedy or seeded top-p, as the reference)."""
        import torch
        from llamavid_ref.model import sample_next
        P = embeds.shape[1]
        if P >= self.context:
            raise ValueError(f"prompt too long: {P} tokens (text + visual) do not fit the LLM context of "
                             f"{self.context} positions; use fewer frames or a shorter question")
        steps = min(max_new_tokens, self.context - P)
        if steps <= 0:
            return
        rng = torch.Generator().manual_seed(seed)
        logits = self.llm_step(embeds, P, P + steps)
        step_embed = np.empty((1, 1, embeds.shape[2]), np.float32)
        for i in range(steps):
            token = sample_next(torch.from_numpy(logits[0, -1]), do_sample, temperature, top_p, rng)
            yield token
            if token == self.eos or i == steps - 1:
                return
            step_embed[0, 0] = self.embed_table[token]
            logits = self.llm_step(step_embed, P + i + 1, P + steps)

    def llm_step(self, embeds: np.ndarray, total: int, capacity: int) -> np.ndarray:
        """One LLM call: embeds [1,T,H] at positions total-T..total-1 -> logits [1,1,V]. A call with
        T == total starts a new sequence of at most `capacity` positions; it runs on the prefill graph
        when the manifest has one that runs here."""
        if total == embeds.shape[1]:
            self._new_sequence(capacity)
            if "llm_prefill" in self.stages:
                return self._run_prefill(embeds)
        run = self._run_shared if self.kv_layout == "shared" else self._run_concat
        return run(embeds, total)

    def _new_sequence(self, capacity: int):
        """An empty KV cache: concat layout, empty pasts; shared layout, buffers of `capacity` positions
        (kept from the last answer when large enough: positions beyond `total` are masked out)."""
        if self.kv_layout == "concat":
            self._past = self._empty_past()
        elif not self._kv or self._kv[0].shape[2] < capacity:
            kvh, d = self.manifest["llm"]["kv_heads"], self.manifest["llm"]["head_dim"]
            self._kv = [np.zeros((1, kvh, capacity, d), np.float32) for _ in self.past_names]
            self._mask = np.ones((1, capacity), np.int64)
            self._logits = np.empty((1, 1, self.manifest["llm"]["vocab_size"]), np.float32)

    def _empty_past(self) -> list[np.ndarray]:
        """A zero-length past [1,kvh,0,d] per past input (the plain graph's start of a sequence)."""
        kvh, d = self.manifest["llm"]["kv_heads"], self.manifest["llm"]["head_dim"]
        return [np.zeros((1, kvh, 0, d), np.float32) for _ in self.past_names]

    def _run_prefill(self, embeds) -> np.ndarray:
        """The prefill graph (plain: empty past in, present [1,kvh,T,d] out); its cache becomes the decoder's."""
        T = embeds.shape[1]
        out = self.stages["llm_prefill"].run({"inputs_embeds": embeds, "attention_mask": np.ones((1, T), np.int64),
                                              **dict(zip(self.past_names, self._empty_past()))})
        present = [out[n] for n in self.present_names]
        if self.kv_layout == "shared":
            for buf, kv in zip(self._kv, present):
                buf[:, :, :T] = kv
        else:
            self._past = present
        return out["logits"]

    def _run_shared(self, embeds, total: int) -> np.ndarray:
        """Fused graph: the KV buffers are allocated once per answer and bound as past and present."""
        feeds = {"inputs_embeds": embeds, "attention_mask": self._mask[:, :total], **dict(zip(self.past_names, self._kv))}
        outs = {"logits": self._logits, **dict(zip(self.present_names, self._kv))}
        return self.stages["llm"].run(feeds, outs)["logits"]

    def _run_concat(self, embeds, total: int) -> np.ndarray:
        """Plain graph: present = concat(past, new) is fed back as the next past."""
        feeds = {"inputs_embeds": embeds, "attention_mask": np.ones((1, total), np.int64),
                 **dict(zip(self.past_names, self._past))}
        out = self.stages["llm"].run(feeds)
        self._past = [out[n] for n in self.present_names]
        return out["logits"]

    def _stream(self, embeds, **sampling) -> Iterator[str]:
        """Token ids -> text pieces whose concatenation is the final decoded, stripped answer."""
        ids, emitted = [], ""
        for token in self.generate(embeds, **sampling):
            if token == self.eos:
                break
            ids.append(token)
            text = self.tokenizer.decode(ids).strip()
            if text.startswith(emitted) and not text.endswith("\ufffd"):     # hold back partial UTF-8
                yield text[len(emitted):]
                emitted = text
        text = self.tokenizer.decode(ids).strip()
        if text.startswith(emitted) and len(text) > len(emitted):
            yield text[len(emitted):]

    # ---- text in, text out ----------------------------------------------------------------------
    def ask_stream(self, media, question: str, max_new_tokens=512, **sampling) -> Iterator[str]:
        """One question about one image or video (None: text only) -> text pieces as they are generated."""
        return self.chat(media).ask_stream(question, max_new_tokens, **sampling)

    def ask(self, media, question: str, max_new_tokens=512, **sampling) -> str:
        return "".join(self.ask_stream(media, question, max_new_tokens, **sampling))

    def chat(self, media=None) -> "ChatSession":
        return ChatSession(self, media)


class ChatSession:
    """Multi-turn chat about one image or video; each turn re-encodes the media with the newest question
    as the Q-Former prompt (as the reference's Chat)."""

    def __init__(self, pipeline: Pipeline, media=None):
        self.p = pipeline
        self.pixels = pipeline.load_media(media) if media is not None else None
        self.messages: list[tuple[int, str | None]] = []

    def ask_stream(self, question: str, max_new_tokens=512, **sampling) -> Iterator[str]:
        p = self.p
        first = not self.messages
        media = first and self.pixels is not None
        self.messages += [(0, (p.manifest["prompt"]["media_prefix"] + question) if media else question), (1, None)]
        visual = p.visual_tokens(self.pixels, question) if self.pixels is not None else None
        embeds = p.embed(p.encode_prompt(p.prompt_text(self.messages)), visual)
        answer = ""
        try:
            for piece in p._stream(embeds, max_new_tokens=max_new_tokens, **sampling):
                answer += piece
                yield piece
        finally:
            self.messages[-1] = (1, answer)

    def ask(self, question: str, max_new_tokens=512, **sampling) -> str:
        return "".join(self.ask_stream(question, max_new_tokens, **sampling))
