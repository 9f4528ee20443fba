"""Training and evaluation data: the synthetic video-QA world and LLaVA-style JSON conversations.

Names are imported on first use, so `python -m llamavid_ref.data.world` runs the module only once.
"""
import importlib

_EXPORTS = {
    "llava_json": ["GPT", "HUMAN", "MEDIA_TOKEN", "LlavaJsonError", "Sample", "load_llava_json", "parse_entry",
                   "place_media"],
    "world": ["ANSWERS", "QTYPES", "Clip", "Sprite", "caption", "generate", "make_split", "questions"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_MODULE_OF)


def __getattr__(name):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
