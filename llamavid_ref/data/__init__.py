"""Training and evaluation data: the synthetic video-QA world and LLaVA-style JSON conversations."""
from llamavid_ref.data.llava_json import (GPT, HUMAN, MEDIA_TOKEN, LlavaJsonError, Sample, load_llava_json,
                                          parse_entry, place_media)
from llamavid_ref.data.world import ANSWERS, QTYPES, Clip, Sprite, caption, generate, make_split, questions

__all__ = [
    "GPT", "HUMAN", "MEDIA_TOKEN", "LlavaJsonError", "Sample", "load_llava_json", "parse_entry", "place_media",
    "ANSWERS", "QTYPES", "Clip", "Sprite", "caption", "generate", "make_split", "questions",
]
