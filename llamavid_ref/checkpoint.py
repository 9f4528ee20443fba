"""Checkpoint loading: released LLaMA-VID directories and the project's own format.

    load(path)
      ├─ project format   config.json {"format": "llamavid-deploy"} + model.safetensors + tokenizer files
      └─ released layout  config.json + pytorch_model*.bin (+ index) | model*.safetensors (+ index)
                          vision tower: the file named by mm_vision_tower (LAVIS eva_vit_g.pth, all
                          blocks but the last are built) or the model.vision_tower.vision_tower.* copy
                          Q-Former vocab: the checkpoint's qformer_vocab.txt or a given path

Nothing is fetched from the network, and nothing in a checkpoint can run code: tensors are read
with safetensors or torch.load(weights_only=True).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from .config import LlamaVidConfig, QFormerConfig, VisionConfig
from .model import LlamaVid
from .tokenizer import LLMTokenizer, QFormerTokenizer, find_qformer_vocab
from .vision import interpolate_pos_embed

FORMAT, FORMAT_VERSION = "llamavid-deploy", 1
DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"

# Released name prefix -> our name prefix; {} is a layer index. The rest of the name is kept.
_BERT = "model.vlm_att_encoder.bert."
_QL = "head.qformer.layers.{}."
WEIGHT_MAP = [
    ("model.embed_tokens.", "llm.embed_tokens."),
    ("model.layers.{}.", "llm.layers.{}."),
    ("model.norm.", "llm.norm."),
    ("lm_head.", "llm.lm_head."),
    ("model.vlm_att_query", "head.query"),
    ("model.vlm_att_ln.", "head.ln."),
    ("model.vlm_att_projector.", "head.att_projector."),
    ("model.vlm_att_key_projector.", "head.key_projector."),
    ("model.vlm_att_val_projector.", "head.val_projector."),
    ("model.mm_projector.", "head.mm_projector."),
    (_BERT + "embeddings.", "head.qformer."),
    (_BERT + "encoder.layer.{}.attention.self.", _QL + "attention."),
    (_BERT + "encoder.layer.{}.attention.output.", _QL + "attention.output."),
    (_BERT + "encoder.layer.{}.crossattention.self.", _QL + "crossattention."),
    (_BERT + "encoder.layer.{}.crossattention.output.", _QL + "crossattention.output."),
    (_BERT + "encoder.layer.{}.intermediate.dense.", _QL + "ffn.up."),
    (_BERT + "encoder.layer.{}.output.dense.", _QL + "ffn.down."),
    (_BERT + "encoder.layer.{}.output.LayerNorm.", _QL + "ffn.LayerNorm."),
    (_BERT + "encoder.layer.{}.intermediate_query.dense.", _QL + "ffn_query.up."),
    (_BERT + "encoder.layer.{}.output_query.dense.", _QL + "ffn_query.down."),
    (_BERT + "encoder.layer.{}.output_query.LayerNorm.", _QL + "ffn_query.LayerNorm."),
    ("model.vision_tower.vision_tower.", "vision."),
    ("", "vision."),                       # a LAVIS EVA file: its names are ours
]
# Released tensors that are buffers or unused, dropped without complaint.
IGNORED = [r"\.position_ids$", r"rotary_emb\.inv_freq$"]

_COMPILED = [(re.compile("^" + re.escape(src).replace(r"\{\}", r"(\d+)")), dst) for src, dst in WEIGHT_MAP]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says what was expected and what was found."""


def map_name(released: str, eva_file: bool = False) -> str:
    for pattern, dst in (_COMPILED[-1:] if eva_file else _COMPILED[:-1]):
        m = pattern.match(released)
        if m:
            return dst.format(*m.groups()) + released[m.end():]
    raise CheckpointError(f"unexpected tensor {released!r}: no LLaMA-VID module has it")


# ---- reading tensors -----------------------------------------------------------------------------
def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"weights: expected the file {path}, found nothing there")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"weights {path}: expected a safetensors file, found unreadable data ({e})") from e
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"weights {path}: expected a tensor-only torch file (weights_only=True), "
                              f"could not read it: {str(e).splitlines()[0]}") from e
    for key in ("model", "state_dict"):                 # LAVIS files may nest the state dict
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"weights {path}: expected a dict of tensors, found {type(sd).__name__}")
    return sd


def _read_released_weights(root: Path) -> dict[str, torch.Tensor]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = root / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            sd = {}
            for shard in shards:
                sd.update(_read_file(root / shard))
            return sd
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (root / name).is_file():
            return _read_file(root / name)
    raise CheckpointError(f"checkpoint {root}: expected model.safetensors, pytorch_model.bin or a "
                          f"*.index.json with shards, found {sorted(p.name for p in root.iterdir())}")


# ---- sizes from shapes ---------------------------------------------------------------------------
def _count(sd: dict, prefix: str) -> int:
    idx = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


def _need(sd: dict, key: str) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"missing tensor {key!r} (needed to size the model)")
    return sd[key]


def vision_config_from(sd: dict, image_size: int, heads: int) -> VisionConfig:
    """sd uses our names ("vision." prefix)."""
    width = _need(sd, "vision.cls_token").shape[-1]
    return VisionConfig(image_size=image_size, patch_size=_need(sd, "vision.patch_embed.proj.weight").shape[-1],
                        width=width, depth=_count(sd, "vision.blocks."), heads=heads,
                        mlp_dim=_need(sd, "vision.blocks.0.mlp.fc1.weight").shape[0])


def qformer_config_from(sd: dict, heads: int) -> QFormerConfig:
    query = _need(sd, "head.query")                                           # [1,Q,D]
    cross = sorted({int(k.split(".")[3]) for k in sd if ".crossattention." in k and k.startswith("head.qformer.layers.")})
    layers = _count(sd, "head.qformer.layers.")
    return QFormerConfig(
        hidden=query.shape[-1], num_query=query.shape[1], layers=layers, heads=heads,
        ffn=_need(sd, "head.qformer.layers.0.ffn.up.weight").shape[0],
        vocab_size=_need(sd, "head.qformer.word_embeddings.weight").shape[0],
        max_positions=_need(sd, "head.qformer.position_embeddings.weight").shape[0],
        cross_attention_freq=(cross[1] - cross[0]) if len(cross) > 1 else max(layers, 1))


# ---- released layout -----------------------------------------------------------------------------
def _eva_file(root: Path, hf: dict, override) -> Path | None:
    if override is not None:
        if not Path(override).is_file():
            raise CheckpointError(f"vision tower: expected the EVA-ViT-g file at {override}, found no file")
        return Path(override)
    rel = hf.get("mm_vision_tower")
    if not rel or not str(rel).endswith((".pth", ".pt", ".bin", ".safetensors")):
        return None
    for base in (root, root.parent, Path.cwd()):
        if (base / rel).is_file():
            return base / rel
    return None


def _load_released(root: Path, hf: dict, vision_tower, vision_heads, qformer_heads):
    raw = _read_released_weights(root)
    sd = {}
    for k, v in raw.items():
        if not any(re.search(p, k) for p in IGNORED):
            sd[map_name(k)] = v
    eva = _eva_file(root, hf, vision_tower)
    has_copy = any(k.startswith("vision.") for k in sd)
    if eva is not None:                      # the release's own choice: the file wins over the copy
        sd = {k: v for k, v in sd.items() if not k.startswith("vision.")}
        file_sd = {map_name(k, eva_file=True): v for k, v in _read_file(eva).items()}
        built = _count(file_sd, "vision.blocks.") - 1          # penultimate layer: drop the last block
        sd.update({k: v for k, v in file_sd.items() if not k.startswith(f"vision.blocks.{built}.")})
    elif not has_copy:
        raise CheckpointError(
            f"vision tower: config.json names mm_vision_tower={hf.get('mm_vision_tower')!r}, not found "
            f"relative to {root}, its parent or the working directory, and the checkpoint has no "
            "model.vision_tower.vision_tower.* copy; pass vision_tower=PATH (--vision-tower)")
    cfg = LlamaVidConfig.from_released(hf)
    cfg.vision = vision_config_from(sd, cfg.vision.image_size, vision_heads)
    cfg.qformer = qformer_config_from(sd, qformer_heads)
    return cfg, sd


# ---- public API ----------------------------------------------------------------------------------
def load(path=None, *, vision_tower=None, qformer_vocab=None, vision_heads: int = 16,
         qformer_heads: int = 12, dtype: torch.dtype = torch.float32, device=None) -> LlamaVid:
    """Load a released LLaMA-VID checkpoint directory, a project-format directory, or (path=None)
    the default model shipped with the package. Returns the model in eval mode, in `dtype` on
    `device` (None: the CPU), e.g. load(path, device="cuda", dtype=torch.float16)."""
    root = Path(path) if path is not None else DEFAULT_MODEL_DIR
    if not (root / "config.json").is_file():
        what = "nothing" if not root.exists() else ("a file" if root.is_file() else
                                                    f"a directory holding {sorted(p.name for p in root.iterdir())[:8]}")
        hint = " (the default model is not built yet: see docs/DESIGN.md)" if path is None else ""
        raise CheckpointError(f"checkpoint {root}: expected a directory with config.json, found {what}{hint}")
    meta = json.loads((root / "config.json").read_text())
    if meta.get("format") == FORMAT:
        if meta.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"checkpoint {root}: expected project format version {FORMAT_VERSION}, "
                                  f"found {meta.get('format_version')}")
        cfg = LlamaVidConfig.from_dict(meta["config"])
        sd = _read_file(root / "model.safetensors")
    else:
        cfg, sd = _load_released(root, meta, vision_tower, vision_heads, qformer_heads)
    model = LlamaVid(cfg)
    _load_state(model, sd, root)
    model.tokenizer = LLMTokenizer.find(root, cfg.llm.bos_id, cfg.llm.eos_id)
    model.qformer_tokenizer = QFormerTokenizer(find_qformer_vocab(root, qformer_vocab), cfg.qformer.max_text_len)
    return model.to(device=device, dtype=dtype).eval()


def _load_state(model: LlamaVid, sd: dict, root: Path) -> None:
    """Strict: every tensor present, none unexpected, every shape right; fp32 on load."""
    expected = model.state_dict()
    if model.config.llm.tie_embeddings:
        sd.pop("llm.lm_head.weight", None)
        expected.pop("llm.lm_head.weight")
    if "vision.pos_embed" in sd:
        sd["vision.pos_embed"] = interpolate_pos_embed(sd["vision.pos_embed"].float(), model.config.vision.grid)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {root}: missing tensors {missing[:10]}"
                              f"{' ...' if len(missing) > 10 else ''}; unexpected tensors {unexpected[:10]}")
    for k, t in expected.items():
        if tuple(sd[k].shape) != tuple(t.shape):
            raise CheckpointError(f"checkpoint {root}: tensor {k!r}: expected shape {list(t.shape)}, "
                                  f"found {list(sd[k].shape)}")
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=not model.config.llm.tie_embeddings)


def save(model: LlamaVid, dst) -> Path:
    """Write the project format: config.json, model.safetensors, LLM tokenizer file, qformer_vocab.txt."""
    from safetensors.torch import save_file
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.llm.tie_embeddings:
        sd.pop("llm.lm_head.weight")
    save_file(sd, str(dst / "model.safetensors"))
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": model.config.to_dict()}
    (dst / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    if model.tokenizer is not None:
        shutil.copyfile(model.tokenizer.path, dst / model.tokenizer.path.name)
    if model.qformer_tokenizer is not None:
        shutil.copyfile(model.qformer_tokenizer.vocab_file, dst / "qformer_vocab.txt")
    return dst


def released_config_json(cfg: LlamaVidConfig) -> dict:
    """The config.json fields a released checkpoint carries for `cfg` (used to write test checkpoints)."""
    llm = cfg.llm
    d = {"architectures": ["LlavaLlamaAttForCausalLM"], "model_type": "llava",
         "hidden_size": llm.hidden, "intermediate_size": llm.ffn, "num_hidden_layers": llm.layers,
         "num_attention_heads": llm.heads, "num_key_value_heads": llm.kv_heads, "vocab_size": llm.vocab_size,
         "rms_norm_eps": llm.eps, "max_position_embeddings": llm.max_positions, "bos_token_id": llm.bos_id,
         "eos_token_id": llm.eos_id, "pad_token_id": llm.pad_id, "tie_word_embeddings": llm.tie_embeddings,
         "rope_scaling": {"type": "linear", "factor": llm.rope_scaling} if llm.rope_scaling != 1.0 else None,
         "mm_vision_tower": "./model_zoo/LAVIS/eva_vit_g.pth", "mm_hidden_size": cfg.vision.width,
         "image_processor": f"./llamavid/processor/clip-patch14-{cfg.vision.image_size}",
         "mm_projector_type": cfg.head.projector_type, "mm_vision_select_layer": -2,
         "mm_vision_select_feature": "patch", "bert_type": "qformer_pretrain", "num_query": cfg.qformer.num_query,
         "compress_type": cfg.head.compress_type, "image_aspect_ratio": cfg.image_aspect_ratio,
         "max_token": cfg.max_token, "torch_dtype": "float16"}
    return d


def released_state_dict(model: LlamaVid) -> tuple[dict, dict]:
    """Our state dict in the released names: (checkpoint tensors, LAVIS EVA file tensors)."""
    pairs = sorted(WEIGHT_MAP[:-2], key=lambda p: -len(p[1]))          # longest of our prefixes first
    inverse = [(re.compile("^" + re.escape(dst).replace(r"\{\}", r"(\d+)")), src) for src, dst in pairs]
    ckpt, eva = {}, {}
    for k, v in model.state_dict().items():
        if k.startswith("vision."):
            eva[k[len("vision."):]] = v
            continue
        for pattern, src in inverse:
            m = pattern.match(k)
            if m:
                ckpt[src.format(*m.groups()) + k[m.end():]] = v
                break
    return ckpt, eva


