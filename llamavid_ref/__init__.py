"""PyTorch reference of LLaMA-VID: loads the released checkpoints and matches their numerics.

    model = llamavid_ref.load(path)          # released directory, project format, or None = default model
    model.ask("clip.mp4", "What happens?")   # one-shot; Chat(model, media) for multi-turn
"""
from .checkpoint import CheckpointError, load, save
from .config import LlamaVidConfig, from_name
from .model import Chat, LlamaVid

__all__ = ["load", "save", "CheckpointError", "LlamaVidConfig", "from_name", "LlamaVid", "Chat"]
