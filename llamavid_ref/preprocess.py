"""CLIP preprocessing as the release runs it (CLIPImageProcessor, 224 or 336).

    image (any PIL mode / HxWx3 uint8) -> RGB -> [pad to square with the mean colour: images only]
      -> resize shortest side to S (PIL bicubic) -> center crop S x S -> /255 -> (x - mean) / std
      -> pixel_values [3,S,S] float32
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .config import CLIP_MEAN, CLIP_STD


def to_rgb(image) -> Image.Image:
    """Any PIL image or uint8 array -> 8-bit RGB. Grey, palette, RGBA (alpha dropped) and 16-bit or
    32-bit integer / float images are converted; anything else is an error naming the mode."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image array: expected uint8 [H,W,3], found {image.dtype} {list(image.shape)}")
        return Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"image: expected a PIL image or uint8 [H,W,3] array, found {type(image).__name__}")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(a.max()), 1.0)
        image = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode not in ("RGB", "L", "LA", "P", "PA", "RGBA", "RGBX", "CMYK", "YCbCr", "1", "LAB", "HSV"):
        raise ValueError(f"image: expected an RGB, grey, palette or 8/16-bit image, found mode {image.mode!r}")
    return image.convert("RGB")


def expand_to_square(image: Image.Image, mean=CLIP_MEAN) -> Image.Image:
    """Pad the shorter side symmetrically with the mean colour (LLaVA's expand2square)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new("RGB", (side, side), tuple(int(x * 255) for x in mean))
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def preprocess(image, size: int, pad_to_square: bool, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """One image or video frame -> [3,S,S] float32."""
    image = to_rgb(image)
    if pad_to_square:
        image = expand_to_square(image, mean)
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    image = image.resize((size, new_long) if w <= h else (new_long, size), Image.BICUBIC)
    w, h = image.size
    top, left = (h - size) // 2, (w - size) // 2
    a = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    a = (a - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(a.transpose(2, 0, 1).copy())


def preprocess_video(frames: np.ndarray, size: int, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """uint8 [T,H,W,3] -> [T,3,S,S]; video frames are not padded to square (as released)."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"video frames: expected uint8 [T>0,H,W,3], found {frames.dtype} {list(frames.shape)}")
    return torch.stack([preprocess(f, size, False, mean, std) for f in frames])
