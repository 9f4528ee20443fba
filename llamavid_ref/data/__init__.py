"""Training and evaluation data: the synthetic video-QA world and LLaVA-style JSON conversations."""
from llamavid_ref.data.world import ANSWERS, QTYPES, Clip, Sprite, generate, make_split

__all__ = ["ANSWERS", "QTYPES", "Clip", "Sprite", "generate", "make_split"]
