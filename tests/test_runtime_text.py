"""runtime.text against the reference's tokenizers (llamavid_ref.tokenizer): identical ids on the default
model's tokenizer.json and Q-Former vocab and on a sentencepiece .model trained here, the streaming
detokenizer's pieces joining to the stripped answer, clear errors, and no torch behind it."""
import io
from pathlib import Path

import numpy as np
import pytest
import sentencepiece

from llamavid_ref import tokenizer as ref
from llamavid_ref.config import IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX
from runtime.text import LLMTokenizer, QFormerTokenizer, StreamDecoder, stream_text
from test_runtime_media import run_without_torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "llamavid_ref" / "default_model"

TEXTS = [
    "", " ", "a", "hello world", "  two leading spaces", "trailing space ", "tabs\tand\nnew lines\n\n",
    "What color is the square ?", "HOW MANY SHAPES ARE THERE?", "it's 3.14 - 42% (approx.) [x] {y} #z @w",
    "héllo wörld, ça va? naïve façade", "日本語のテキストです。", "Ünïcödé ÅÆØ ß ẞ", "emoji 🙂👍🏽 and ✓ ✗ ★",
    "<s>", "</s>", "<unk>", "a <s> b </s> c", "<s><s></s>", "x</s>", "<image>", "<image>\nwhat happens?",
    "A chat between a curious user and an artificial intelligence assistant. USER: <image>\nhow many? ASSISTANT:",
    "a<image>b<image>c", "<image><image>", "<im age> <IMAGE> <image", "\u200b zero width \u00a0 nbsp",
    "word " * 300, "🙂" * 50, "the square moves left then right then left " * 20,
]


def random_texts(count, seed):
    g = np.random.default_rng(seed)
    alphabet = list("abcxyz ABC  .,?!'-\n\t0123456789éüß日本🙂<>/s") + ["<s>", "</s>", "<image>", "<unk>"]
    return ["".join(g.choice(alphabet, int(g.integers(0, 40)))) for _ in range(count)]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A byte-fallback BPE sentencepiece model (unk 0, <s> 1, </s> 2 as LLaMA's) trained on a few lines."""
    corpus = [f"the quick brown fox jumps over the lazy dog {i} times" for i in range(200)]
    corpus += ["héllo wörld 日本語 テキスト 🙂 what color is the square ? how many shapes are there ?"] * 20
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model, vocab_size=400,
                                             byte_fallback=True, model_type="bpe", minloglevel=2)
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


@pytest.fixture(scope="module", params=["tokenizer.json", "tokenizer.model"])
def pair(request, sp_model):
    """(ours, reference) on the same LLM tokenizer file, bos 1 / eos 2."""
    path = DEFAULT / "tokenizer.json" if request.param == "tokenizer.json" else sp_model
    return LLMTokenizer(path, 1, 2), ref.LLMTokenizer(path, 1, 2)


def test_llm_ids_equal_the_reference(pair):
    ours, theirs = pair
    assert ours.vocab_size == theirs.vocab_size
    for text in TEXTS + random_texts(300, 0):
        ids = ours.encode(text)
        assert ids == theirs.encode(text), text
        assert ours.encode(text, bos=True) == theirs.encode(text, bos=True) == [1, *ids]
        assert ours.encode_prompt(text, IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX) == theirs.encode_prompt(text), text
        assert ours.decode(ids) == theirs.decode(ids)


def test_llm_decode_equals_the_reference_on_any_ids(pair):
    ours, theirs = pair
    g = np.random.default_rng(1)
    for _ in range(300):
        ids = g.integers(-200, ours.vocab_size, int(g.integers(0, 30))).tolist()     # negatives are skipped
        assert ours.decode(ids) == theirs.decode(ids)
        assert ours.decode(np.asarray(ids, np.int64)) == theirs.decode(ids)


def test_placeholders_become_the_image_id(pair):
    ours, _ = pair
    ids = ours.encode_prompt("a <image>\nwhat color", "<image>", -200)
    assert ids[0] == 1 and ids.count(-200) == 1 and ids[1:ids.index(-200)] == ours.encode("a ")
    assert ours.encode_prompt("<image><image>", "<image>", -7) == [1, -7, -7]
    assert ours.encode_prompt("", "<image>", -200) == [1]


def test_special_tokens_in_the_text_are_split_out(pair):
    ours, _ = pair
    assert ours.encode("</s>") == [2] and ours.encode("<s>") == [1]
    assert ours.encode("a</s>b") == ours.encode("a") + [2] + ours.encode("b")


def bert_vocab(tmp_path):
    """A bert-base-uncased-like vocab: the specials, whole words and ## pieces."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "what", "color", "is", "the", "square",
             "how", "many", "shapes", "are", "there", "?", ".", ",", "red", "green", "blue", "circle", "moves",
             "left", "right", "a", "b", "c", "sq", "##uare", "##s", "##ed", "##ing", "caf", "##e", "naive"]
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(words) + "\n")
    return path


QUESTIONS = ["What color is the square ?", "", "how many shapes are there?", "RED GREEN BLUE", "Café naïve",
             "squares moved left, circles moving right.", "日本語 🙂", "[CLS] [SEP] [MASK]", "what " * 300,
             "red green blue square circle " * 60, "?" * 600]


@pytest.mark.parametrize("vocab", ["default", "bert"])
@pytest.mark.parametrize("max_length", [2, 5, 48, 256, 512])
def test_qformer_ids_and_mask_equal_the_reference(tmp_path, vocab, max_length):
    path = DEFAULT / "qformer_vocab.txt" if vocab == "default" else bert_vocab(tmp_path)
    ours, theirs = QFormerTokenizer(path, max_length), ref.QFormerTokenizer(path, max_length)
    assert ours.vocab_size == theirs.vocab_size and (ours.cls_id, ours.sep_id) == (theirs.cls_id, theirs.sep_id)
    for batch in [[q] for q in QUESTIONS + random_texts(50, 2)] + [QUESTIONS, QUESTIONS[:3]]:
        ids, mask = ours(batch)
        ref_ids, ref_mask = theirs(batch)
        assert ids.dtype == mask.dtype == np.int64 and ids.shape == mask.shape == tuple(ref_ids.shape)
        assert np.array_equal(ids, ref_ids.numpy()) and np.array_equal(mask, ref_mask.numpy()), batch
        assert ids.shape[1] <= max_length


def test_qformer_truncates_from_the_left(tmp_path):
    tk = QFormerTokenizer(bert_vocab(tmp_path), 5)
    v = tk._tk.get_vocab()
    assert tk.encode("red green blue square circle") == [v["[CLS]"], v["blue"], v["square"], v["circle"], v["[SEP]"]]
    assert QFormerTokenizer(bert_vocab(tmp_path), 2).encode("red green") == [v["[CLS]"], v["[SEP]"]]
    ids, mask = tk(["red", "red green blue square circle"])
    assert ids.tolist() == [[v["[CLS]"], v["red"], v["[SEP]"], 0, 0], tk.encode("red green blue square circle")]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1] * 5]


def test_tokenizer_files_are_checked(tmp_path):
    with pytest.raises(FileNotFoundError, match="LLM tokenizer: expected a tokenizer.json or tokenizer.model file at"):
        LLMTokenizer(tmp_path / "tokenizer.json", 1, 2)
    with pytest.raises(FileNotFoundError, match="Q-Former vocab: expected a WordPiece vocab.txt at .*, found none"):
        QFormerTokenizer(tmp_path / "vocab.txt", 48)
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\nred\n")
    with pytest.raises(ValueError, match=r"expected \[CLS\] and \[SEP\] entries, found no \[CLS\] or \[SEP\]"):
        QFormerTokenizer(tmp_path / "vocab.txt", 48)
    with pytest.raises(ValueError, match="max_length: expected >= 2"):
        QFormerTokenizer(bert_vocab(tmp_path), 1)


def test_stream_pieces_join_to_the_stripped_answer(pair):
    ours, _ = pair
    g = np.random.default_rng(3)
    answers = [[i for i in ours.encode(t) if i != 2] for t in TEXTS + random_texts(100, 4)]   # eos ends answers
    answers += [g.integers(3, ours.vocab_size, int(g.integers(1, 40))).tolist() for _ in range(200)]
    for ids in answers:
        final = ours.decode(ids).strip()
        pieces = list(stream_text(ours, ids + [2, 7, 7], eos_id=2))          # stops at eos
        assert "".join(pieces) == final and all(pieces)
        d = StreamDecoder(ours)
        assert "".join([d.push(i) for i in ids] + [d.finish()]) == final


def test_stream_holds_back_partial_characters(pair):
    ours, _ = pair
    ids = ours.encode("ok 🙂 日本")              # byte-level pieces: the emoji spans several tokens
    d = StreamDecoder(ours)
    pieces = [d.push(i) for i in ids]
    assert "".join(pieces) == "ok 🙂 日本" and not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p) >= 3     # emitted as it goes, not all at the end
    assert d.finish() == ""


def test_text_needs_no_torch(sp_model):
    out = run_without_torch(f"""
text = load('text')
d = 'llamavid_ref/default_model/'
a = text.LLMTokenizer(d + 'tokenizer.json', 1, 2).encode_prompt('<image>\\nhi', '<image>', -200)
b = text.LLMTokenizer({str(sp_model)!r}, 1, 2).encode('the fox')
ids, mask = text.QFormerTokenizer(d + 'qformer_vocab.txt', 48)(['what color ?'])
assert not any(m.split('.')[0] in ('torch', 'llamavid_ref', 'export') for m in sys.modules)
print(a[:2], len(b) > 0, ids.dtype, mask.shape[0])
""")
    assert out.strip() == "[1, -200] True int64 1"
