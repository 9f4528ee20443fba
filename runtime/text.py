"""The runtime's own tokenizers (the `tokenizers` library, sentencepiece for tokenizer.model files; no
torch), giving the reference's ids (llamavid_ref.tokenizer), and the streaming detokenizer.

    prompt text --LLMTokenizer.encode_prompt--> [bos, ids..., image_id, ids...]   (chunks between
        placeholders encoded on their own; special tokens split out of the text)
    question --QFormerTokenizer--> ids, mask int64 [K,L]   (WordPiece, lower-cased, [CLS] ... [SEP],
        truncated from the LEFT to max_length, padded with 0 to the longest)
    generated ids --StreamDecoder--> text pieces whose concatenation is the stripped answer
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np


class LLMTokenizer:
    """tokenizer.json (HF tokenizers) or tokenizer.model (sentencepiece, the released LLaMA files), encoding
    like the release's HF LlamaTokenizer (legacy): special tokens written in the text are split out and
    every other chunk is encoded on its own (sentencepiece adds its dummy prefix to each chunk)."""

    def __init__(self, path: str | Path, bos_id: int, eos_id: int):
        self.path = Path(path)
        self.bos_id, self.eos_id = bos_id, eos_id
        if not self.path.is_file():
            raise FileNotFoundError(f"LLM tokenizer: expected a tokenizer.json or tokenizer.model file at "
                                    f"{self.path}, found none")
        self._sp = self._tk = None
        if self.path.suffix == ".model":
            import sentencepiece
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
            self.vocab_size = self._sp.get_piece_size()
            specials = {self._sp.id_to_piece(i): i for i in (bos_id, eos_id, self._sp.unk_id())}
            self._specials = specials
            self._split = re.compile("(" + "|".join(map(re.escape, specials)) + ")")
        else:
            from tokenizers import Tokenizer
            self._tk = Tokenizer.from_file(str(self.path))     # splits its added (special) tokens itself
            self.vocab_size = self._tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, bos: bool = False) -> list[int]:
        ids = [self.bos_id] if bos else []
        if self._tk is not None:
            return ids + self._tk.encode(text, add_special_tokens=False).ids
        for chunk in self._split.split(text):
            if chunk in self._specials:
                ids.append(self._specials[chunk])
            elif chunk:
                ids += self._sp.encode(chunk)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Token ids -> text; negative ids (placeholders) are skipped, special tokens dropped."""
        ids = [int(i) for i in ids if int(i) >= 0]
        return self._sp.decode(ids) if self._sp is not None else self._tk.decode(ids)

    def encode_prompt(self, prompt: str, placeholder: str, image_id: int) -> list[int]:
        """BOS + each chunk between placeholders encoded on its own, image_id for each placeholder."""
        ids = [self.bos_id]
        for i, chunk in enumerate(prompt.split(placeholder)):
            if i:
                ids.append(image_id)
            if chunk:
                ids += self.encode(chunk)
        return ids


class QFormerTokenizer:
    """bert-base-uncased style WordPiece from a vocab.txt: lower-cased, [CLS] ... [SEP], the question
    truncated from the LEFT so that its end (usually the actual question) survives."""

    def __init__(self, vocab_file: str | Path, max_length: int):
        from tokenizers.implementations import BertWordPieceTokenizer
        self.vocab_file = Path(vocab_file)
        if not self.vocab_file.is_file():
            raise FileNotFoundError(f"Q-Former vocab: expected a WordPiece vocab.txt at {self.vocab_file}, found none")
        if max_length < 2:
            raise ValueError(f"Q-Former max_length: expected >= 2 (room for [CLS] and [SEP]), found {max_length}")
        entries = set(self.vocab_file.read_text(encoding="utf-8").splitlines())
        missing = [t for t in ("[CLS]", "[SEP]") if t not in entries]
        if missing:
            raise ValueError(f"Q-Former vocab {self.vocab_file}: expected [CLS] and [SEP] entries, found no "
                             f"{' or '.join(missing)}")
        self._tk = BertWordPieceTokenizer(str(self.vocab_file), lowercase=True)
        self.max_length = max_length
        self.cls_id, self.sep_id = self._tk.token_to_id("[CLS]"), self._tk.token_to_id("[SEP]")
        self.vocab_size = self._tk.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        body = self._tk.encode(text, add_special_tokens=False).ids
        body = body[max(0, len(body) - (self.max_length - 2)):]          # truncation from the left
        return [self.cls_id, *body, self.sep_id]

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """-> ids, mask: int64 [len(texts), longest], padded with 0."""
        rows = [self.encode(t) for t in texts]
        longest = max(len(r) for r in rows)
        ids = np.zeros((len(rows), longest), np.int64)
        mask = np.zeros((len(rows), longest), np.int64)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
            mask[i, :len(r)] = 1
        return ids, mask


class StreamDecoder:
    """Generated ids -> text pieces as they arrive. The concatenation of the pieces is the final decoded,
    stripped answer (decode(all ids).strip()): a piece is emitted only when the decoded text so far extends
    what was emitted and does not end in a partial UTF-8 character (U+FFFD), so a multi-byte character split
    over several tokens comes out whole, and trailing white space waits for the text that follows it.

        d = StreamDecoder(tokenizer)
        for token in tokens:            # the caller stops at eos (not pushed)
            print(d.push(token), end="")
        print(d.finish())
    """

    def __init__(self, tokenizer: LLMTokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids).strip()
        if text.startswith(self.emitted) and not text.endswith("\ufffd"):
            piece, self.emitted = text[len(self.emitted):], text
            return piece
        return ""

    def finish(self) -> str:
        """What is left once generation ends (a held-back tail, even one that is not valid UTF-8)."""
        text = self.tokenizer.decode(self.ids).strip()
        if text.startswith(self.emitted) and len(text) > len(self.emitted):
            piece, self.emitted = text[len(self.emitted):], text
            return piece
        return ""


def stream_text(tokenizer: LLMTokenizer, tokens: Iterable[int], eos_id: int) -> Iterator[str]:
    """Token ids (up to eos_id, not included) -> non-empty text pieces, as StreamDecoder emits them."""
    decoder = StreamDecoder(tokenizer)
    for token in tokens:
        if token == eos_id:
            break
        if piece := decoder.push(token):
            yield piece
    if piece := decoder.finish():
        yield piece
