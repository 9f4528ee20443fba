"""Checkpoint loading: released LLaMA-VID directories and the project's own format.

    load(path)
      ├─ project format   config.json {"format": "llamavid-deploy"} + model.safetensors + tokenizer files
      └─ released layout  config.json + pytorch_model*.bin (+ index) | model*.safetensors (+ index)
                          vision tower: the file named by mm_vision_tower (LAVIS eva_vit_g.pth, all
                          blocks but the last are built) or the model.vision_tower.vision_tower.* copy
                          Q-Former vocab: the checkpoint's qformer_vocab.txt or a given path

Nothing is fetched from the network, and nothing in a checkpoint can run code: tensors are read
with safetensors or torch.load(weights_only=True). Nothing is allocated before it is checked:

    config.json (a JSON object) -> config sizes within config.LIMITS, head counts dividing the widths
    -> tensors read (shards named by an index must lie inside the checkpoint) -> sizes from shapes checked again
    -> the model built on the meta device: every tensor present, none unexpected, each of the right shape and
       a floating-point dtype -> the fp32 model's bytes compared with this machine's available memory
    -> the model allocated and loaded
"""
from __future__ import annotations

import json
import re
import shutil
import sys
import zipfile
from pathlib import Path, PurePosixPath

import torch

from .config import LlamaVidConfig, QFormerConfig, VisionConfig, problems
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
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)    # what weights may be stored as

_COMPILED = [(re.compile("^" + re.escape(src).replace(r"\{\}", r"(\d+)")), dst) for src, dst in WEIGHT_MAP]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says what was expected and what was found."""


def map_name(released: str, eva_file: bool = False) -> str:
    for pattern, dst in (_COMPILED[-1:] if eva_file else _COMPILED[:-1]):
        m = pattern.match(released)
        if m:
            return dst.format(*m.groups()) + released[m.end():]
    raise CheckpointError(f"unexpected tensor {released!r}: no LLaMA-VID module has it")


# ---- reading files -------------------------------------------------------------------------------
_JSON_TYPES = {list: "a JSON array", str: "a JSON string", int: "a JSON number", float: "a JSON number",
               bool: "a JSON boolean", type(None): "null"}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: expected a JSON object, found unreadable JSON ({str(e)[:200]})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {_JSON_TYPES.get(type(data), type(data).__name__)}")
    return data


def _inside(root: Path, rel) -> Path:
    """root/rel when rel is a relative path that stays inside root (symlinks resolved), else CheckpointError."""
    if not isinstance(rel, str) or not rel or "\\" in rel or PurePosixPath(rel).is_absolute() \
            or ".." in PurePosixPath(rel).parts or not (root / rel).resolve().is_relative_to(root.resolve()):
        raise CheckpointError(f"checkpoint {root}: expected a file name inside the checkpoint, found {rel!r}")
    return root / rel


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"weights: expected the file {path}, found nothing there")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"weights {path}: expected a safetensors file, found unreadable data ({e})") from e
    try:     # the zip format of torch.save is mapped, the legacy format is read whole
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"weights {path}: expected a tensor-only torch file (weights_only=True), "
                              f"could not read it: {first}") from e
    for key in ("model", "state_dict"):                 # LAVIS files may nest the state dict
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise CheckpointError(f"weights {path}: expected a dict of tensors, found {type(sd).__name__}")
    return sd


def _read_released_weights(root: Path) -> dict[str, torch.Tensor]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = root / index_name
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index}: expected \"weight_map\": {{tensor name: shard file}}, found "
                                      f"{_JSON_TYPES.get(type(weight_map), 'an empty or mixed object')}")
            sd = {}
            for shard in sorted(set(weight_map.values())):
                sd.update(_read_file(_inside(root, shard)))
            return sd
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (root / name).is_file():
            return _read_file(root / name)
    raise CheckpointError(f"checkpoint {root}: expected model.safetensors, pytorch_model.bin or a "
                          f"*.index.json with shards, found {sorted(p.name for p in root.iterdir())}")


# ---- sizes from shapes ---------------------------------------------------------------------------
def _indices(sd: dict, prefix: str, suffix: str = "") -> list[int]:
    """The layer numbers i of the names that start with prefix + "i." + suffix, sorted."""
    pattern = re.compile(re.escape(prefix) + r"(\d{1,9})\." + re.escape(suffix))
    return sorted({int(m.group(1)) for k in sd if (m := pattern.match(k))})


def _count(sd: dict, prefix: str) -> int:
    idx = _indices(sd, prefix)
    return idx[-1] + 1 if idx else 0


def _need(sd: dict, key: str, ndim: int) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"missing tensor {key!r} (needed to size the model)")
    if sd[key].ndim != ndim:
        raise CheckpointError(f"tensor {key!r}: expected {ndim} dimensions, found shape {list(sd[key].shape)}")
    return sd[key]


def vision_config_from(sd: dict, image_size: int, heads: int) -> VisionConfig:
    """sd uses our names ("vision." prefix)."""
    width = _need(sd, "vision.cls_token", 3).shape[-1]                       # [1,1,C]
    return VisionConfig(image_size=image_size, patch_size=_need(sd, "vision.patch_embed.proj.weight", 4).shape[-1],
                        width=width, depth=_count(sd, "vision.blocks."), heads=heads,
                        mlp_dim=_need(sd, "vision.blocks.0.mlp.fc1.weight", 2).shape[0])


def qformer_config_from(sd: dict, heads: int) -> QFormerConfig:
    query = _need(sd, "head.query", 3)                                           # [1,Q,D]
    cross = _indices(sd, "head.qformer.layers.", "crossattention.")
    layers = _count(sd, "head.qformer.layers.")
    return QFormerConfig(
        hidden=query.shape[-1], num_query=query.shape[1], layers=layers, heads=heads,
        ffn=_need(sd, "head.qformer.layers.0.ffn.up.weight", 2).shape[0],
        vocab_size=_need(sd, "head.qformer.word_embeddings.weight", 2).shape[0],
        max_positions=_need(sd, "head.qformer.position_embeddings.weight", 2).shape[0],
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


def _load_released(root: Path, hf: dict, cfg: LlamaVidConfig, vision_tower, vision_heads, qformer_heads):
    """cfg: read from config.json; its vision and Q-Former sizes are replaced by those of the tensors."""
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
    meta = _read_json(root / "config.json")
    released = meta.get("format") != FORMAT
    try:
        if not released:
            if meta.get("format_version") != FORMAT_VERSION:
                raise CheckpointError(f"checkpoint {root}: expected project format version {FORMAT_VERSION}, "
                                      f"found {meta.get('format_version')}")
            cfg = LlamaVidConfig.from_dict(meta.get("config"))
        else:
            cfg = LlamaVidConfig.from_released(meta)
            cfg.vision.heads, cfg.qformer.heads = vision_heads, qformer_heads
    except CheckpointError:
        raise
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint {root}: config.json: {e}") from e
    _check_config(cfg, root, released)                  # before any tensor is read
    if released:
        cfg, sd = _load_released(root, meta, cfg, vision_tower, vision_heads, qformer_heads)
        _check_config(cfg, root, released)              # the sizes read from the tensors
    else:
        sd = _read_file(root / "model.safetensors")
    model = _allocate(cfg, sd, root)
    try:
        model.tokenizer = LLMTokenizer.find(root, cfg.llm.bos_id, cfg.llm.eos_id)
        model.qformer_tokenizer = QFormerTokenizer(find_qformer_vocab(root, qformer_vocab), cfg.qformer.max_text_len)
    except OSError:
        raise
    except Exception as e:                              # the tokenizers library raises plain Exception
        raise CheckpointError(f"checkpoint {root}: tokenizer: expected a readable tokenizer file, found {e}") from e
    return model.to(device=device, dtype=dtype).eval()


def load_or_exit(path=None, **kw) -> LlamaVid:
    """load() for command lines: a checkpoint that cannot be loaded ends the program with its one-line
    error (exit status 2) instead of a traceback."""
    try:
        return load(path, **kw)
    except (CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _check_config(cfg: LlamaVidConfig, root: Path, released: bool) -> None:
    found = problems(cfg)
    if found:
        hint = ""
        if released and any(p.startswith(("vision.heads", "qformer.heads")) for p in found):
            hint = ("; a released checkpoint does not record its head counts: pass vision_heads=N / qformer_heads=N "
                    "(--vision-heads / --qformer-heads)")
        raise CheckpointError(f"checkpoint {root}: {len(found)} problem(s) in its configuration: "
                              f"{'; '.join(found[:6])}{' ...' if len(found) > 6 else ''}{hint}")


def available_memory() -> int | None:
    """Bytes this process may still allocate: MemAvailable, capped by a cgroup (v2) memory limit; None if unknown."""
    have = None
    try:
        with open("/proc/meminfo") as f:
            have = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            left = int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
            have = left if have is None else min(have, left)
    except (OSError, ValueError):
        pass
    return have


class _ShapesOnly(torch.overrides.TorchFunctionMode):
    """Skips normal_ while a model is built on the meta device: only shapes are needed, and loading normal_'s
    meta kernel takes seconds."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") == "normal_":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def _is_grid(n: int) -> bool:
    return n > 0 and round(n ** 0.5) ** 2 == n


def _allocate(cfg: LlamaVidConfig, sd: dict, root: Path) -> LlamaVid:
    """Strict: every tensor present, none unexpected, every shape right, floating point only, and the fp32
    model within this machine's memory, all checked on the meta device before the model is allocated."""
    with torch.device("meta"), _ShapesOnly():
        expected = LlamaVid(cfg).state_dict()
    if cfg.llm.tie_embeddings:
        sd.pop("llm.lm_head.weight", None)
        expected.pop("llm.lm_head.weight")
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {root}: missing tensors {missing[:10]}"
                              f"{' ...' if len(missing) > 10 else ''}; unexpected tensors {unexpected[:10]}")
    for k, t in sd.items():
        if t.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"checkpoint {root}: tensor {k!r}: expected floating-point weights (float16, "
                                  f"bfloat16, float32 or float64), found {str(t.dtype).removeprefix('torch.')}")
    need, have = 4 * sum(t.numel() for t in expected.values()), available_memory()
    if have is not None and need > have:
        raise CheckpointError(f"checkpoint {root}: expected a model that fits in this machine's available memory "
                              f"({have / 2**30:.3g} GiB), found one that needs {need / 2**30:.3g} GiB in fp32 "
                              f"({need // 4:,} parameters); load it on a machine with more memory")
    pos, want = sd.get("vision.pos_embed"), expected["vision.pos_embed"].shape          # [1,1+g*g,C]
    if pos is not None and pos.ndim == 3 and pos.shape[::2] == want[::2] and _is_grid(pos.shape[1] - 1):
        sd["vision.pos_embed"] = interpolate_pos_embed(pos.float(), cfg.vision.grid)   # 224 px table -> 336 px
    for k, t in expected.items():
        if tuple(sd[k].shape) != tuple(t.shape):
            raise CheckpointError(f"checkpoint {root}: tensor {k!r}: expected shape {list(t.shape)}, "
                                  f"found {list(sd[k].shape)}")
    model = LlamaVid(cfg)
    model.load_state_dict(sd, strict=not cfg.llm.tie_embeddings)       # copies convert to the model's fp32
    return model


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


