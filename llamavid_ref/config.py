"""Model configuration: nested dataclasses, named presets, and the released config.json reader.

    LlamaVidConfig
      vision   VisionConfig    EVA-ViT-g (released) or a small ViT of the same structure
      qformer  QFormerConfig   instruction-aware Q-Former (InstructBLIP style)
      head     HeadConfig      context attention + content pooling + projectors
      llm      LLMConfig       LLaMA

Sizes the released config.json does not state (vision and Q-Former widths, depths, vocab) are
filled in by checkpoint.py from the tensor shapes; head counts default to the released values.
problems(cfg) checks every size against LIMITS (and the head counts against the widths) before a model is
allocated: a config.json with absurd sizes is refused, not attempted.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_TOKEN_INDEX = -200          # the <image> placeholder id after tokenization
IMAGE_PLACEHOLDER = "<image>"
FRAME_CHUNK = 64                  # frames per vision/head call, as the release chunks its Q-Former


def _from_dict(cls, d: dict):
    """Build dataclass `cls` from `d`, ignoring unknown keys (so hub files load as they are)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class VisionConfig:
    image_size: int = 224
    patch_size: int = 14
    width: int = 1408
    depth: int = 39                 # blocks built; the released file has 40 (penultimate output)
    heads: int = 16
    mlp_dim: int = 6144             # int(1408 * 4.3637)
    eps: float = 1e-6

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:   # N (CLS not counted)
        return self.grid ** 2


@dataclass
class QFormerConfig:
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    ffn: int = 3072
    vocab_size: int = 30523         # bert-base-uncased 30522 + [DEC]
    max_positions: int = 512
    eps: float = 1e-12
    cross_attention_freq: int = 2   # cross-attention in layers 0, 2, 4, ...
    num_query: int = 32
    max_text_len: int = 256         # tokenizer truncation (from the left)


@dataclass
class HeadConfig:
    compress_type: str | None = "mean"    # None (all N patches) | "mean" | "grid:k"
    tokens: str = "both"                  # "both" (released) | "context" | "content": ablations (paper Table 4)
    projector_type: str = "mlp2x_gelu"    # "linear" | "mlpNx_gelu"
    ln_eps: float = 1e-5                  # vlm_att_ln

    def content_tokens(self, num_patches: int) -> int:
        """n, the number of content tokens per frame."""
        if self.compress_type is None:
            return num_patches
        if self.compress_type == "mean":
            return 1
        if self.compress_type.startswith("grid:"):
            return int(self.compress_type.split(":")[1]) ** 2
        raise ValueError(f"compress_type: expected None, 'mean' or 'grid:k', found {self.compress_type!r}")


@dataclass
class LLMConfig:
    vocab_size: int = 32000
    hidden: int = 4096
    layers: int = 32
    heads: int = 32
    kv_heads: int = 32
    ffn: int = 11008
    eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: float = 1.0       # linear RoPE scaling factor (16 for the long-video model)
    max_positions: int = 4096
    tie_embeddings: bool = False
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass
class LlamaVidConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    image_aspect_ratio: str = "pad"     # images padded to square with the mean colour; video frames not
    template: str = "vicuna_v1"
    max_token: int = 2048               # the context the model was trained for
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD

    @property
    def tokens_per_frame(self) -> int:
        context = self.head.tokens in ("both", "context")
        content = self.head.content_tokens(self.vision.num_patches) if self.head.tokens in ("both", "content") else 0
        return int(context) + content

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaVidConfig":
        """Inverse of to_dict (the project format); unknown keys are ignored."""
        parts = {"vision": VisionConfig, "qformer": QFormerConfig, "head": HeadConfig, "llm": LLMConfig}
        if not isinstance(d, dict):
            raise ValueError(f"config: expected an object, found {type(d).__name__}")
        for name in parts:
            if not isinstance(d.get(name, {}), dict):
                raise ValueError(f"config.{name}: expected an object, found {type(d[name]).__name__}")
        top = _from_dict(cls, {k: v for k, v in d.items() if k not in parts})
        for name, sub in parts.items():
            setattr(top, name, _from_dict(sub, d.get(name, {})))
        if isinstance(top.image_mean, list) and isinstance(top.image_std, list):
            top.image_mean, top.image_std = tuple(top.image_mean), tuple(top.image_std)
        return top

    @classmethod
    def from_released(cls, hf: dict) -> "LlamaVidConfig":
        """Read a released LLaMA-VID config.json. `model_type` ("llava") is deliberately not used."""
        m = re.search(r"(\d+)/?$", str(hf.get("image_processor", "")))     # ".../clip-patch14-336"
        size = int(m.group(1)) if m else 224
        scaling = hf.get("rope_scaling") or {}
        if not isinstance(scaling, dict) or (scaling and scaling.get("type", "linear") != "linear") \
                or type(scaling.get("factor", 1.0)) not in (int, float):
            raise ValueError(f"rope_scaling: expected null or {{'type': 'linear', 'factor': number}}, found {scaling!r}")
        heads = hf.get("num_attention_heads", 32)
        llm = LLMConfig(
            vocab_size=hf.get("vocab_size", 32000), hidden=hf.get("hidden_size", 4096),
            layers=hf.get("num_hidden_layers", 32), heads=heads,
            kv_heads=hf.get("num_key_value_heads") or heads, ffn=hf.get("intermediate_size", 11008),
            eps=hf.get("rms_norm_eps", 1e-5), rope_theta=hf.get("rope_theta", 10000.0),
            rope_scaling=float(scaling.get("factor", 1.0)) if scaling else 1.0,
            max_positions=hf.get("max_position_embeddings", 4096),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_id=hf.get("bos_token_id", 1), eos_id=hf.get("eos_token_id", 2),
            pad_id=hf.get("pad_token_id") or 0,
        )
        return cls(
            vision=VisionConfig(image_size=size, width=hf.get("mm_hidden_size", 1408)),
            qformer=QFormerConfig(num_query=hf.get("num_query", 32)),
            head=HeadConfig(compress_type=hf.get("compress_type"),
                            projector_type=hf.get("mm_projector_type", "mlp2x_gelu")),
            llm=llm,
            image_aspect_ratio=hf.get("image_aspect_ratio", "pad"),
            max_token=hf.get("max_token", 2048),
        )


# ---- validation (before anything is allocated) ---------------------------------------------------
# Integer fields: (min, max). The bounds sit far above every released LLaMA-VID (13B, 336 px, 64K positions)
# and refuse what no machine could allocate; checkpoint.py also compares the memory the model needs with
# what this machine has.
LIMITS = {
    "vision.image_size": (1, 4096), "vision.patch_size": (1, 1024), "vision.width": (1, 16384),
    "vision.depth": (1, 256), "vision.heads": (1, 1024), "vision.mlp_dim": (1, 1 << 17),
    "qformer.hidden": (1, 16384), "qformer.layers": (1, 256), "qformer.heads": (1, 1024), "qformer.ffn": (1, 1 << 17),
    "qformer.vocab_size": (1, 1 << 20), "qformer.max_positions": (1, 1 << 16), "qformer.cross_attention_freq": (1, 256),
    "qformer.num_query": (1, 4096), "qformer.max_text_len": (1, 1 << 16),
    "llm.vocab_size": (1, 1 << 20), "llm.hidden": (1, 1 << 16), "llm.layers": (1, 1024), "llm.heads": (1, 1024),
    "llm.kv_heads": (1, 1024), "llm.ffn": (1, 1 << 18), "llm.max_positions": (1, 1 << 22),
    "llm.bos_id": (0, (1 << 20) - 1), "llm.eos_id": (0, (1 << 20) - 1), "llm.pad_id": (0, (1 << 20) - 1),
    "max_token": (1, 1 << 22),
}
# Float fields: (low, high], finite.
FLOAT_LIMITS = {"vision.eps": (0, 1), "qformer.eps": (0, 1), "head.ln_eps": (0, 1), "llm.eps": (0, 1),
                "llm.rope_theta": (0, 1e12), "llm.rope_scaling": (0, 1e6)}
# (width, heads): each head count must divide its width; the LLM's heads a multiple of its KV heads.
DIVIDES = [("vision.width", "vision.heads"), ("qformer.hidden", "qformer.heads"), ("llm.hidden", "llm.heads"),
           ("llm.heads", "llm.kv_heads")]


def _get(cfg, path: str):
    obj = cfg
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def problems(cfg: LlamaVidConfig) -> list[str]:
    """One line per field of `cfg` outside its type or range (LIMITS, FLOAT_LIMITS, DIVIDES, choices)."""
    from .templates import TEMPLATES
    out = []
    for path, (lo, hi) in LIMITS.items():
        v = _get(cfg, path)
        if type(v) is not int or not lo <= v <= hi:
            out.append(f"{path}: expected an integer in [{lo}, {hi}], found {v!r}")
    for path, (lo, hi) in FLOAT_LIMITS.items():
        v = _get(cfg, path)
        if type(v) not in (int, float) or not (math.isfinite(v) and lo < v <= hi):
            out.append(f"{path}: expected a number in ({lo:g}, {hi:g}], found {v!r}")
    if out:
        return out                                    # the checks below need the sizes to be numbers
    for width, heads in DIVIDES:
        if _get(cfg, width) % _get(cfg, heads):
            out.append(f"{heads}: expected a divisor of {width} ({_get(cfg, width)}), found {_get(cfg, heads)}")
    for path in ("image_mean", "image_std"):
        v = getattr(cfg, path)
        if not (isinstance(v, (list, tuple)) and len(v) == 3 and all(type(x) in (int, float) and math.isfinite(x) for x in v)
                and (path == "image_mean" or all(x > 0 for x in v))):
            out.append(f"{path}: expected 3 finite numbers{' above 0' if path == 'image_std' else ''}, found {v!r}")
    if cfg.vision.image_size < cfg.vision.patch_size:
        out.append(f"vision.image_size: expected at least one patch ({cfg.vision.patch_size} px), found {cfg.vision.image_size}")
    compress = cfg.head.compress_type
    grid = re.fullmatch(r"grid:(\d+)", compress) if isinstance(compress, str) else None
    if not (compress in (None, "mean") or (grid and 1 <= int(grid.group(1)) <= max(cfg.vision.grid, 1))):
        out.append(f"head.compress_type: expected None, 'mean' or 'grid:k' with 1 <= k <= {cfg.vision.grid}, found {compress!r}")
    if cfg.head.tokens not in ("both", "context", "content"):
        out.append(f"head.tokens: expected 'both', 'context' or 'content', found {cfg.head.tokens!r}")
    if not (isinstance(cfg.head.projector_type, str) and re.fullmatch(r"linear|mlp([1-9]\d?)x_gelu", cfg.head.projector_type)):
        out.append(f"head.projector_type: expected 'linear' or 'mlpNx_gelu' (N < 100), found {cfg.head.projector_type!r}")
    if not isinstance(cfg.template, str) or cfg.template not in TEMPLATES:
        out.append(f"template: expected one of {sorted(TEMPLATES)}, found {cfg.template!r}")
    if not isinstance(cfg.image_aspect_ratio, str):
        out.append(f"image_aspect_ratio: expected a string, found {cfg.image_aspect_ratio!r}")
    if type(cfg.llm.tie_embeddings) is not bool:
        out.append(f"llm.tie_embeddings: expected true or false, found {cfg.llm.tie_embeddings!r}")
    for key in ("bos_id", "eos_id", "pad_id"):
        if getattr(cfg.llm, key) >= cfg.llm.vocab_size:
            out.append(f"llm.{key}: expected an id below llm.vocab_size ({cfg.llm.vocab_size}), found {getattr(cfg.llm, key)}")
    return out


def _released(size: int, compress: str | None, llm: LLMConfig, max_token: int) -> LlamaVidConfig:
    return LlamaVidConfig(vision=VisionConfig(image_size=size), head=HeadConfig(compress_type=compress),
                          llm=llm, max_token=max_token)


_LLM_7B = LLMConfig()
_LLM_13B = LLMConfig(hidden=5120, layers=40, heads=40, kv_heads=40, ffn=13824)
_LLM_7B_LONG = dataclasses.replace(_LLM_7B, rope_scaling=16.0, max_positions=65536)

PRESETS = {
    "llama-vid-7b-full-224-video-fps-1": lambda: _released(224, "mean", _LLM_7B, 2048),
    "llama-vid-7b-full-336": lambda: _released(336, None, _LLM_7B, 4096),
    "llama-vid-7b-full-224-long-video": lambda: _released(224, "mean", _LLM_7B_LONG, 65536),
    "llama-vid-13b-full-224-video-fps-1": lambda: _released(224, "mean", _LLM_13B, 2048),
    "llama-vid-13b-full-336": lambda: _released(336, None, _LLM_13B, 4096),
    # The shipped default model (llamavid_ref/recipe.py trains it on the synthetic world, 64 px clips).
    "default": lambda: LlamaVidConfig(
        vision=VisionConfig(image_size=64, patch_size=8, width=96, depth=4, heads=4, mlp_dim=192),
        qformer=QFormerConfig(hidden=64, layers=2, heads=4, ffn=128, vocab_size=256, max_positions=64,
                              num_query=8, max_text_len=48),
        head=HeadConfig(compress_type="mean"),
        llm=LLMConfig(vocab_size=512, hidden=128, layers=4, heads=4, kv_heads=4, ffn=384, max_positions=1024),
        max_token=1024,
    ),
    # Tiny: the real structure at toy sizes, for tests.
    "tiny": lambda: LlamaVidConfig(
        vision=VisionConfig(image_size=28, patch_size=7, width=32, depth=2, heads=4, mlp_dim=64),
        qformer=QFormerConfig(hidden=24, layers=2, heads=3, ffn=48, vocab_size=64, max_positions=32,
                              num_query=4),
        head=HeadConfig(compress_type="mean"),
        llm=LLMConfig(vocab_size=96, hidden=32, layers=2, heads=4, kv_heads=2, ffn=64, max_positions=512),
        max_token=512,
    ),
}


def from_name(name: str) -> LlamaVidConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]()
