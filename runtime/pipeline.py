"""The pipeline: an artifact directory -> answers, a thin layer over the C core (runtime/csrc, the
runtime._llamavid extension). Python decodes media and tokenizes; the core lays out the prompt, runs the
stages through the backends, keeps the KV cache and samples.

    media --runtime.media--> pixel values [T,3,S,S]        question --runtime.text--> Q-Former ids [1,L]
    prompt text --runtime.text--> ids with the image id where the visual tokens go
    core session: prompt(ids, pixels, Q-Former ids)  frames --|vision|--|head|--> 2 tokens a frame, text ids
                  --embedding table--> inputs_embeds --|llm|--> KV cache, logits;  next(sampler) ... eos

    p = Pipeline.open("artifacts/model")              # validates the manifest and every file hash
    p.ask("clip.mp4", "What happens?")                # -> str; safe from many threads at once
    for piece in p.ask_stream(image, "What is it?"): print(piece, end="")
    chat = p.chat("clip.mp4"); chat.ask("..."); chat.ask("...")   # multi-turn

Each stage runs on the fastest backend here that the manifest has a variant for (TensorRT engines, ONNX
Runtime CUDA, OpenVINO or CPU). One opened Pipeline serves any number of threads: each answer takes a core
session (its own KV cache and buffers) from a pool, so answers never share state.
"""
from __future__ import annotations

import hashlib
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from . import _llamavid, media, text
from .backends import available_backends, choose_variant, open_backend
from .backends.tensorrt import native_backend
from .manifest import ManifestError, read_manifest

STAGE_KEYS = (("vision", "vision", None), ("head", "head", None), ("llm", "llm", None), ("llm_prefill", "llm", "prefill"))
MIN_SESSION = 256            # positions of the smallest pooled session


def check_question(question: str, placeholder: str) -> str:
    """The question as the pipeline takes it, or ValueError saying what is wrong with it."""
    try:
        question.encode("utf-8")
    except UnicodeEncodeError as e:                  # undecodable argv / stdin bytes arrive as surrogates
        raise ValueError(f"question: expected UTF-8 text, found bytes that are not UTF-8 at character {e.start + 1}; "
                         f"check the terminal's encoding") from None
    if not question.strip():
        raise ValueError("question: expected a question, found an empty one (leave it out for an interactive chat)")
    if placeholder in question:
        raise ValueError(f"question: expected plain text, found the image placeholder {placeholder!r}: the video or "
                         f"image goes before the question by itself; remove {placeholder!r} from the question")
    return question


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


def _open_trtllm(root: Path, manifest: dict, backend: str | None):
    """(TrtllmLLM, its variant) when the llm stage has a TensorRT-LLM engine that runs here (TensorRT-LLM and a
    GPU present; no backend forced), else None. One-shot answers then decode there; streams keep their warm KV
    cache in the core (TensorRT-LLM's engine flow has no KV cache a caller can append to and roll back)."""
    if backend is not None:
        return None
    from .backends.trtllm import TrtllmLLM
    for v in manifest["stages"]["llm"]["variants"]:
        if v["backend"] == "trtllm" and TrtllmLLM.missing(root, v) is None:
            return TrtllmLLM.open(root, v, manifest["llm"]), v
    return None


class Pipeline:
    def __init__(self, root: Path, manifest: dict, stages: dict, chosen: dict, native=(),
                 manifest_sha256: str | None = None):
        """stages: the Python stage objects; native: [(library, options)] of the core's backends in shared
        libraries, which open the chosen variants that no Python stage runs (TensorRT engines);
        manifest_sha256: the manifest.json the core must find (the one validated here)."""
        self.root, self.manifest, self.stages, self.chosen = root, manifest, stages, chosen
        self.frame_chunk = frame_chunk(manifest, chosen)
        self.core = _llamavid.Model(str(root), {k: (chosen[k]["index"], s) for k, s in stages.items()},
                                    native=list(native), manifest_sha256=manifest_sha256)
        self.info = self.core.info
        m, ids = manifest, manifest["special_ids"]
        self.bos, self.eos, self.image_id = ids["bos"], ids["eos"], ids["image"]
        self.context = m["llm"]["context"]
        self.kv_layout = m["llm"]["kv_layout"]
        self.tokenizer = text.LLMTokenizer(root / m["tokenizers"]["llm"], ids["bos"], ids["eos"])
        self.qformer_tokenizer = text.QFormerTokenizer(root / m["tokenizers"]["qformer"], m["tokenizers"]["qformer_max_length"])
        self._idle: list = []                   # core sessions not in use
        self.trtllm = None                      # the LLM on TensorRT-LLM where it runs here (_open_trtllm)
        self._lock = threading.Lock()

    @classmethod
    def open(cls, root, backend: str | None = None, threads: int | None = None, verify_hashes: bool = True,
             spin: bool = True, precision: str | None = None, manifest_sha256: str | None = None) -> "Pipeline":
        """Validate root/manifest.json (version, stages, hashes) and open each stage on the first backend
        (fastest first, or `backend`) that runs one of its variants, checked against the manifest's tensors;
        engines run on the core's TensorRT backend (C++), which refuses one built by another TensorRT or for
        another GPU.
        spin=False: idle ORT threads sleep (for sharing the process with other compute, e.g. benchmarks).
        precision: run only that precision's variants; ORT's CPU provider then also runs the ort-cuda
        graphs (to measure fp16 accuracy on a machine without a GPU).
        manifest_sha256: the pinned sha256 of manifest.json (tamper-evident deployments). Either way the C core
        checks that the manifest it parses is the one validated here."""
        root = Path(root)
        if manifest_sha256 is None and (root / "manifest.json").is_file():
            manifest_sha256 = hashlib.sha256((root / "manifest.json").read_bytes()).hexdigest()
        manifest = read_manifest(root, verify_hashes, manifest_sha256)
        available = [backend] if backend else available_backends()
        stages, chosen, backends = {}, {}, {}
        for key, name, role in STAGE_KEYS:        # the llm's prefill graph is optional, every stage is not
            variants = manifest["stages"][name]["variants"]
            v = choose_variant(variants, available, precision, role)
            if v is None and role is None:
                have = sorted({(x["backend"], x["precision"]) for x in variants})
                raise RuntimeError(f"stage {name}: expected a variant for backend {available}"
                                   f"{f' in {precision}' if precision else ''}, found only {have}")
            if v is None:
                continue
            v = chosen[key] = {**v, "index": variants.index(v)}
            if v["backend"] not in available:                 # an ort-cuda graph on the CPU provider
                v["backend"] = "ort-cpu"
            if v["backend"] == "tensorrt":                    # an engine: opened by the core's TensorRT backend
                continue
            try:
                if v["backend"] not in backends:              # one backend object per backend
                    backends[v["backend"]] = open_backend(v["backend"], threads, spin)
                stages[key] = backends[v["backend"]].open_stage(root / v["file"], io=manifest["stages"][name])
            except ValueError as e:
                raise ManifestError(f"artifacts {root}: stage {key}: {e}") from e
        trtllm = _open_trtllm(root, manifest, backend)
        engines = any(v["backend"] == "tensorrt" for v in chosen.values())
        try:
            pipe = cls(root, manifest, stages, chosen, [native_backend(precision)] if engines else [],
                       manifest_sha256.lower())
        except ValueError as e:                              # the core refuses the manifest
            raise ManifestError(str(e)) from e
        if trtllm:
            pipe.trtllm, pipe.chosen["llm"] = trtllm
        return pipe

    def describe(self) -> str:
        return ", ".join(f"{s.replace('_', ' ')}: {v['file']} {v['precision']} on {v['backend']}"
                         for s, v in self.chosen.items())

    # ---- media and text ----------------------------------------------------------------------------------
    def load_media(self, media_) -> np.ndarray:
        """A video path, image path, PIL image, uint8 array ([H,W,3] image or [T,H,W,3] video) or ready pixel
        values ([3,S,S] / [T,3,S,S] float32; any array-like, e.g. a CPU tensor) -> pixel values [T,3,S,S] float32."""
        if not isinstance(media_, (np.ndarray, str, Path, Image.Image)) and hasattr(media_, "__array__"):
            media_ = np.asarray(media_)
        p = self.manifest["preprocess"]
        return media.load_media(media_, p["image_size"], p["mean"], p["std"], p["image_aspect_ratio"] == "pad",
                                p["video_fps"])

    def prompt_text(self, messages: list[tuple[int, str | None]]) -> str:
        """messages [(role index 0|1, text or None)] -> the template's text (the reference's Conversation)."""
        p = self.manifest["prompt"]
        out = p["system"] + p["sep"]
        for i, (role, content) in enumerate(messages):
            name = p["roles"][role]
            out += f"{name}: {content}" + (p["sep"], p["sep2"])[i % 2] if content else f"{name}:"
        return out

    def encode_prompt(self, prompt: str) -> list[int]:
        """BOS + each chunk between placeholders, the image id for each placeholder."""
        return self.tokenizer.encode_prompt(prompt, self.manifest["prompt"]["image_placeholder"], self.image_id)

    # ---- core sessions -------------------------------------------------------------------------------------
    @contextmanager
    def session(self, positions: int):
        """A core session of at least `positions` positions, from the pool (made when none fits), reset."""
        with self._lock:
            fits = [s for s in self._idle if s.kv_info()["capacity"] >= positions]
            s = min(fits, key=lambda s: s.kv_info()["capacity"]) if fits else None
            if s is not None:
                self._idle.remove(s)
        if s is None:
            n = min(self.context, max(MIN_SESSION, 1 << max(positions - 1, 1).bit_length()))
            s = _llamavid.Session(self.core, n_ctx=n, frame_chunk=self.frame_chunk)
        s.reset()
        try:
            yield s
        finally:
            with self._lock:
                self._idle.append(s)

    def close(self):
        """Free the pooled sessions' buffers now (they are freed with the pipeline otherwise)."""
        with self._lock:
            for s in self._idle:
                s.close()
            self._idle.clear()

    # ---- generation ----------------------------------------------------------------------------------------
    def generate(self, ids: list[int], pixels: np.ndarray | None = None, question: str = "", max_new_tokens=512,
                 do_sample=False, temperature=0.2, top_p=0.7, top_k=0, repetition_penalty=1.0, seed=0,
                 embeds: np.ndarray | None = None) -> Iterator[int]:
        """Prompt ids (the image id where the visual tokens go) + the media's pixel values (encoded with
        `question` as the Q-Former prompt) or ready visual rows `embeds` [R,H] -> new token ids, one at a time,
        eos last if generated (greedy, or seeded sampling: runtime/csrc/llamavid.h documents the sampler)."""
        ids = np.asarray(ids, np.int32)
        n_visual = 0 if pixels is None and embeds is None else (
            len(embeds) if embeds is not None else len(pixels) * self.info["tokens_per_frame"])
        P = len(ids) - int((ids == self.image_id).sum()) + n_visual
        if P >= self.context:
            raise ValueError(f"prompt too long: {P} tokens (text + visual) do not fit the LLM context of "
                             f"{self.context} positions; use fewer frames or a shorter question")
        steps = min(max_new_tokens, self.context - P)
        if steps <= 0:
            return
        q = dict(zip(("qformer_ids", "qformer_mask"), self.qformer_tokenizer([question]))) if pixels is not None else {}
        if self.trtllm is not None:
            yield from self._generate_trtllm(ids, pixels, embeds, q, steps, dict(
                do_sample=do_sample, temperature=temperature, top_p=top_p, seed=seed))
            return
        sampler = _llamavid.Sampler(self.info["vocab_size"], temperature if do_sample else 0.0, top_k, top_p,
                                    repetition_penalty, seed)
        with self.session(P + steps) as s:
            s.prompt(ids, pixels, embeds=embeds, **q)
            for _ in range(steps):
                token = s.next(sampler)
                if token < 0:
                    return
                yield token
                if token == self.eos:
                    return

    def _generate_trtllm(self, ids, pixels, embeds, q, steps: int, sampling: dict) -> Iterator[int]:
        """The LLM on TensorRT-LLM: the frames' tokens from the core's vision and head (embeddings out), placed as
        a prompt table behind fake ids; TensorRT-LLM's own sampler (greedy answers are the same as the core's)."""
        from .backends.trtllm import place_visual_tokens
        if pixels is not None:
            embeds = np.empty((len(pixels), self.info["tokens_per_frame"], self.info["hidden"]), np.float32)
            with self.session(1) as s:
                s.encode(pixels, q["qformer_ids"], q["qformer_mask"], embeds)
            embeds = embeds.reshape(-1, self.info["hidden"])
        placed, table = place_visual_tokens(ids.tolist(), embeds, self.info["vocab_size"], self.image_id)
        yield from self.trtllm.generate(placed, table if embeds is not None else None, steps, [self.eos], sampling)

    def answer_stream(self, ids: list[int], pixels, question: str, **sampling) -> Iterator[str]:
        """generate() as text pieces whose concatenation is the final decoded, stripped answer."""
        return text.stream_text(self.tokenizer, self.generate(ids, pixels, question, **sampling), self.eos)

    # ---- text in, text out ---------------------------------------------------------------------------------
    def ask_stream(self, media_, question: str, max_new_tokens=512, **sampling) -> Iterator[str]:
        """One question about one image or video (None: text only) -> text pieces as they are generated."""
        return self.chat(media_).ask_stream(question, max_new_tokens, **sampling)

    def ask(self, media_, question: str, max_new_tokens=512, **sampling) -> str:
        return "".join(self.ask_stream(media_, question, max_new_tokens, **sampling))

    def chat(self, media_=None) -> "ChatSession":
        return ChatSession(self, media_)

    def stream(self, **options):
        """A live stream on this pipeline: frames pushed into a warm KV cache, questions at any time
        (runtime/stream.py documents the options). Several streams may run at once, each its own session."""
        from .stream import Stream
        return Stream(self, **options)


class ChatSession:
    """Multi-turn chat about one image or video; each turn re-encodes the media with the newest question
    as the Q-Former prompt (as the reference's Chat). A video file too long for one prompt is decoded frame by
    frame into a stream (Pipeline.stream: a sliding window of its frames, the last ones recomputed with each
    question), and each question is answered on its own there."""

    def __init__(self, pipeline: Pipeline, media_=None):
        self.p, self.pixels, self.stream = pipeline, None, None
        self.messages: list[tuple[int, str | None]] = []
        if isinstance(media_, (str, Path)) and media.is_video_file(media_):
            self._open_video(media_)
        elif media_ is not None:
            self.pixels = pipeline.load_media(media_)

    def _open_video(self, path):
        """Frames as they are decoded (never held at source size); past what one prompt holds, into a stream."""
        p, pre = self.p, self.p.manifest["preprocess"]
        fits = (p.context - 256) // p.info["tokens_per_frame"]      # room for the text and the answer
        frames, times = [], []
        decoded = media.iter_video(path, pre["image_size"], pre["mean"], pre["std"], pre["video_fps"])
        for px, t in decoded:
            frames.append(px)
            times.append(t)
            if len(frames) > fits:
                self.stream = p.stream(focus_frames=min(8, p.frame_chunk))
                for f, ft in zip(frames, times):
                    self.stream.push(f, ft)
                frames = None
                for px2, t2 in decoded:
                    self.stream.push(px2, t2)
                self.stream.flush()
                return
        if not frames:
            raise media.VideoError(f"{path}: expected at least one decodable frame, found none")
        self.pixels = np.stack(frames)

    def ask_stream(self, question: str, max_new_tokens=512, **sampling) -> Iterator[str]:
        check_question(question, self.p.manifest["prompt"]["image_placeholder"])
        if self.stream is not None:
            yield from self.stream.ask(question, max_new_tokens, **sampling)
            return
        p = self.p
        first = not self.messages
        media_ = first and self.pixels is not None
        self.messages += [(0, (p.manifest["prompt"]["media_prefix"] + question) if media_ else question), (1, None)]
        ids = p.encode_prompt(p.prompt_text(self.messages))
        answer = ""
        try:
            for piece in p.answer_stream(ids, self.pixels, question, max_new_tokens=max_new_tokens, **sampling):
                answer += piece
                yield piece
        finally:
            self.messages[-1] = (1, answer)

    def ask(self, question: str, max_new_tokens=512, **sampling) -> str:
        return "".join(self.ask_stream(question, max_new_tokens, **sampling))
