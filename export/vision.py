"""Vision stage export: EVA-ViT-g as the reference runs it, one graph, dynamic frame axis.

    pixel_values [frames,3,S,S] --patch conv, CLS, pos--> depth x pre-norm block --> vision_feats [frames,N+1,Cv]
"""
from __future__ import annotations

from pathlib import Path

import torch

from .common import torch_export

INPUTS, OUTPUTS = ("pixel_values",), ("vision_feats",)


def export_vision(model, path: Path) -> Path:
    """model: llamavid_ref.LlamaVid -> vision.onnx at `path` (fp32)."""
    S = model.config.vision.image_size
    example = torch.randn(2, 3, S, S)
    return torch_export(model.vision, (example,), path, INPUTS, OUTPUTS,
                        {"pixel_values": {0: "frames"}, "vision_feats": {0: "frames"}})
