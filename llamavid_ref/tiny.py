"""Tiny LLaMA-VID models built by code (tests, demos): random weights, toy tokenizers, and a writer of
the released checkpoint layout (config.json + 2 sharded .bin + index + separate LAVIS EVA .pth)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from llamavid_ref.checkpoint import released_config_json, released_state_dict
from llamavid_ref.config import LlamaVidConfig, from_name
from llamavid_ref.model import LlamaVid
from llamavid_ref.tokenizer import LLMTokenizer, QFormerTokenizer

WORDS = ("a chat between curious user and an artificial intelligence assistant . the gives helpful , "
         "detailed polite answers to user's questions user : assistant what color is square circle "
         "triangle red green blue moves left right how many shapes are there ? \n").split(" ")


def random_init(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Every parameter random (zeros such as q_bias or the queries would hide mapping errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(1.0 + noise if name.endswith(("norm.weight", "LayerNorm.weight", "ln.weight",
                                                  "norm1.weight", "norm2.weight", "layernorm.weight"))
                    else noise)
    return model


def write_tokenizers(root: Path, llm_vocab: int, qformer_vocab: int) -> tuple[Path, Path]:
    """A WordLevel tokenizer.json for the LLM and a WordPiece vocab.txt for the Q-Former."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    root.mkdir(parents=True, exist_ok=True)
    words = sorted(set(w for w in WORDS if w.strip()) | {"<s>", "</s>", "<unk>"} - {"<s>", "</s>", "<unk>"})
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in words[: llm_vocab - 3]:
        vocab[w] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")          # joins words with spaces
    tk.save(str(root / "tokenizer.json"))
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    plain = sorted(set(w.strip().lower() for w in WORDS if w.strip() and w.strip().isalpha()))
    (root / "qformer_vocab.txt").write_text("\n".join((special + plain)[:qformer_vocab]) + "\n")
    return root / "tokenizer.json", root / "qformer_vocab.txt"


def tiny_model(tmp: Path, seed: int = 0, cfg: LlamaVidConfig | None = None) -> LlamaVid:
    cfg = cfg or from_name("tiny")
    torch.manual_seed(seed)
    model = random_init(LlamaVid(cfg), seed).eval()
    tok, vocab = write_tokenizers(Path(tmp) / "tok", cfg.llm.vocab_size, cfg.qformer.vocab_size)
    model.tokenizer = LLMTokenizer(tok, cfg.llm.bos_id, cfg.llm.eos_id)
    model.qformer_tokenizer = QFormerTokenizer(vocab, cfg.qformer.max_text_len)
    return model


def write_released(model: LlamaVid, root: Path, with_vision_copy: bool = False, fp16: bool = False) -> Path:
    """The release's layout: sharded pytorch_model-0000x-of-00002.bin + index, config.json, the LLM
    tokenizer, and ./model_zoo/LAVIS/eva_vit_g.pth holding one more block than is built."""
    root.mkdir(parents=True, exist_ok=True)
    ckpt, eva = released_state_dict(model)
    if fp16:
        ckpt = {k: v.half() for k, v in ckpt.items()}
    last = model.config.vision.depth
    for k in [k for k in eva if k.startswith("blocks.0.")]:          # the unused 40th block
        eva[k.replace("blocks.0.", f"blocks.{last}.", 1)] = torch.randn_like(eva[k])
    if with_vision_copy:
        ckpt.update({"model.vision_tower.vision_tower." + k: v for k, v in eva.items()
                     if not k.startswith(f"blocks.{last}.")})
    else:
        (root / "model_zoo/LAVIS").mkdir(parents=True, exist_ok=True)
        torch.save(eva, root / "model_zoo/LAVIS/eva_vit_g.pth")
    keys = sorted(ckpt)
    shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    weight_map = {}
    for name, ks in shards.items():
        torch.save({k: ckpt[k].clone() for k in ks}, root / name)
        weight_map.update({k: name for k in ks})
    (root / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps(released_config_json(model.config)))
    (root / "tokenizer.json").write_bytes(model.tokenizer.path.read_bytes())
    (root / "qformer_vocab.txt").write_bytes(model.qformer_tokenizer.vocab_file.read_bytes())
    return root
