"""Prompt assembly order, greedy / sampled generation, chat, long video, templates, tokenizers."""
import numpy as np
import pytest
import torch
from PIL import Image

from llamavid_ref.config import IMAGE_TOKEN_INDEX, from_name
from llamavid_ref.model import Chat
from llamavid_ref.sampling import Rng, sample
from llamavid_ref.preprocess import expand_to_square, preprocess, to_rgb
from llamavid_ref.templates import Conversation, question_prompt
from llamavid_ref.tiny import tiny_model

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
                 "gives helpful, detailed, and polite answers to the user's questions.")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("g"), seed=5)


def test_assembly_replaces_each_placeholder_with_all_tokens_frame_major(model):
    g = torch.Generator().manual_seed(0)
    video, image = torch.randn(3, 3, 28, 28, generator=g), torch.randn(3, 28, 28, generator=g)
    ids = torch.tensor([[1, 5, IMAGE_TOKEN_INDEX, 6, 7, IMAGE_TOKEN_INDEX, 8]])
    with torch.no_grad():
        embeds, mask = model.embed(ids, [video, image], ["what color", "how many"])
        qv = model.qformer_tokenizer(["what color"])
        qi = model.qformer_tokenizer(["how many"])
        vt = model.encode_frames(video, *qv)                  # [3,2,H]
        it = model.encode_frames(image[None], *qi)            # [1,2,H]
        E = model.llm.embed_tokens.weight
    expected = torch.cat([E[[1, 5]], vt[0], vt[1], vt[2], E[[6, 7]], it[0], E[[8]]])
    assert embeds.shape == (1, 2 + 6 + 2 + 2 + 1, 32) and mask.sum() == 13
    # prompts are batched (padded to the longest), so the Q-Former matmuls differ in shape: fp32 rounding
    torch.testing.assert_close(embeds[0], expected, rtol=1e-5, atol=1e-6)
    # context token first within each frame: it differs from the content token
    assert not torch.allclose(vt[:, 0], vt[:, 1])


def test_qformer_prompt_changes_only_context_tokens(model):
    video = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        a = model.encode_frames(video, *model.qformer_tokenizer(["what color is the square"]))
        b = model.encode_frames(video, *model.qformer_tokenizer(["how many shapes"]))
    assert torch.equal(a[:, 1:], b[:, 1:])            # content tokens are question-independent
    assert not torch.allclose(a[:, 0], b[:, 0])


def test_placeholder_count_mismatch_is_an_error(model):
    ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX]])
    with pytest.raises(ValueError, match="found 2 placeholders, 1 images, 1 prompts"):
        model.embed(ids, [torch.randn(3, 28, 28)], ["q"])


def test_greedy_generate_matches_uncached_argmax_loop(model):
    video = torch.randn(4, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    ids = torch.tensor([model.tokenizer.encode_prompt(question_prompt("what color is the square ?"))])
    new = model.generate(ids, [video], ["what color is the square ?"], max_new_tokens=12)
    embeds, _ = model.embed(ids, [video], ["what color is the square ?"])
    expected = []
    with torch.no_grad():
        for _ in range(12):
            tok = int(model.llm(embeds)[0][0, -1].argmax())   # full recompute, no KV cache
            expected.append(tok)
            if tok == model.config.llm.eos_id:
                break
            embeds = torch.cat([embeds, model.llm.embed_tokens.weight[[tok]][None]], 1)
    assert new[0].tolist() == expected


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(model):
    video = torch.randn(2, 3, 28, 28)
    ids = torch.tensor([model.tokenizer.encode_prompt(question_prompt("how many shapes ?"))])
    args = (ids, [video], ["how many shapes ?"])
    a = model.generate(*args, max_new_tokens=10, do_sample=True, temperature=1.0, top_p=1.0, seed=1)
    b = model.generate(*args, max_new_tokens=10, do_sample=True, temperature=1.0, top_p=1.0, seed=1)
    greedy = model.generate(*args, max_new_tokens=10)
    nucleus = model.generate(*args, max_new_tokens=10, do_sample=True, temperature=1.0, top_p=1e-6, seed=2)
    assert torch.equal(a, b)
    assert torch.equal(nucleus, greedy)


def test_sample_respects_top_p_and_top_k():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    rng = Rng(0)
    seen = [sample(logits, 1.0, top_p=0.7, rng=rng) for _ in range(300)]
    assert set(seen) == {0, 1}                 # 0.5 + 0.3 reaches 0.7; 2 and 3 are cut
    assert 0.5 < seen.count(0) / 300 < 0.75    # 0.5 / 0.8 = 0.625
    assert {sample(logits, 1.0, top_k=3, rng=rng) for _ in range(300)} == {0, 1, 2}
    assert sample(logits, 0.0, repetition_penalty=4.0, history=[0]) == 1     # log 0.5 * 4 < log 0.3


def test_rng_is_xoshiro256ss_seeded_by_splitmix64():
    """splitmix64(0)'s first output is the published 0xe220a8397b1dcdaf; from the state {1, 2, 3, 4}
    xoshiro256** gives rotl(2 * 5, 7) * 9 = 11520, then rotl(0 * 5, 7) * 9 = 0 (worked by hand from its
    definition); a double takes the top 53 bits."""
    r = Rng(0)
    assert r.s[0] == 0xE220A8397B1DCDAF
    r.s = [1, 2, 3, 4]
    assert [r.next_u64(), r.next_u64()] == [11520, 0]
    r.s = [1, 2, 3, 4]
    assert r.next_double() == (11520 >> 11) * 2.0 ** -53


def test_prompt_longer_than_context_is_an_error(model):
    ids = torch.tensor([model.tokenizer.encode_prompt(question_prompt("what ?"))])
    video = torch.randn(300, 3, 28, 28)          # 600 visual tokens > 512 positions
    with pytest.raises(ValueError, match=r"prompt too long: \d+ tokens .* context of 512 positions"):
        model.generate(ids, [video], ["what ?"], max_new_tokens=4)


def test_chat_keeps_history_and_image_in_first_turn(model):
    chat = Chat(model, torch.randn(2, 3, 28, 28))
    first = chat.ask("what color is the square ?", max_new_tokens=3)
    chat.ask("how many shapes ?", max_new_tokens=3)
    prompt = chat.conv.prompt()
    assert prompt.startswith(VICUNA_SYSTEM + " USER: <image>\nwhat color is the square ? ASSISTANT: " + first + "</s>")
    assert prompt.count("<image>") == 1 and "USER: how many shapes ? ASSISTANT: " in prompt


def test_long_video_interleaves_subtitles(model):
    frames = torch.randn(3, 3, 28, 28)
    ids, images, prompts = model.long_video_inputs(frames, "who is red ?", ["red moves", "", "blue"])
    assert (ids == IMAGE_TOKEN_INDEX).sum() == 3 and len(images) == 3 and prompts == ["who is red ?"] * 3
    ph = (ids[0] == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
    assert ph[1] - ph[0] == 1 + len(model.tokenizer.encode("red moves"))
    assert ph[2] - ph[1] == 1
    assert model.generate(ids, images, prompts, max_new_tokens=2).shape[0] == 1
    with pytest.raises(ValueError, match="expected one subtitle per frame"):
        model.long_video_inputs(frames, "q", ["a"])


def test_vicuna_template_text():
    assert question_prompt("Why?") == VICUNA_SYSTEM + " USER: <image>\nWhy? ASSISTANT:"
    conv = Conversation.new("llava_v1").add_user("hi").add_assistant("yo").add_user("more").add_assistant(None)
    assert conv.prompt().endswith("human's questions. USER: hi ASSISTANT: yo</s>USER: more ASSISTANT:")
    with pytest.raises(KeyError, match="expected one of"):
        Conversation.new("nope")


def test_tokenizer_image_placeholder_and_left_truncation(model):
    ids = model.tokenizer.encode_prompt("a <image>\nwhat color")
    assert ids[0] == 1 and ids.count(IMAGE_TOKEN_INDEX) == 1 and ids.index(IMAGE_TOKEN_INDEX) == 2
    qt = model.qformer_tokenizer
    qt.max_length, saved = 5, qt.max_length
    try:
        ids = qt.encode("red green blue square circle")
    finally:
        qt.max_length = saved
    vocab = qt._tk.get_vocab()
    assert ids == [vocab["[CLS]"], vocab["blue"], vocab["square"], vocab["circle"], vocab["[SEP]"]]


def test_preprocess_pads_images_with_mean_colour_and_converts_modes():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    sq = expand_to_square(img)
    assert sq.size == (40, 40) and sq.getpixel((0, 0)) == (122, 116, 104) and sq.getpixel((20, 20)) == (255, 0, 0)
    px = preprocess(img, 28, pad_to_square=True)
    assert px.shape == (3, 28, 28) and px.dtype == torch.float32
    red = (1.0 - 0.48145466) / 0.26862954
    assert abs(float(px[0, 14, 14]) - red) < 1e-5
    grey16 = Image.fromarray(np.full((8, 8), 65535, np.uint16))
    assert to_rgb(grey16).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("RGBA", (4, 4), (10, 20, 30, 0))).getpixel((0, 0)) == (10, 20, 30)
    assert to_rgb(Image.new("L", (4, 4), 77)).getpixel((0, 0)) == (77, 77, 77)
    with pytest.raises(ValueError, match=r"expected uint8 \[H,W,3\], found float32 \[4, 4\]"):
        to_rgb(np.zeros((4, 4), np.float32))


def test_released_video_preset_is_two_tokens_per_frame_end_to_end(model):
    """The tiny model is a video model (compress 'mean'): T frames -> 2T visual tokens in the sequence."""
    ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, 5]])
    for T in (1, 7):
        embeds, _ = model.embed(ids, [torch.randn(T, 3, 28, 28)], ["q"])
        assert embeds.shape[1] == 2 + 2 * T
    assert from_name("tiny").tokens_per_frame == 2
