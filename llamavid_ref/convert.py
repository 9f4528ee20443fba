"""python -m llamavid_ref.convert SRC DST: a released checkpoint (or any loadable one) -> project format."""
from __future__ import annotations

import argparse
import sys

from .checkpoint import load_or_exit, save


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("src", help="released LLaMA-VID checkpoint directory (or a project-format one)")
    ap.add_argument("dst", help="output directory (config.json, model.safetensors, tokenizer files)")
    ap.add_argument("--vision-tower", help="EVA-ViT-g file; default: mm_vision_tower resolved next to SRC")
    ap.add_argument("--qformer-vocab", help="bert-base-uncased vocab.txt for the Q-Former tokenizer")
    ap.add_argument("--vision-heads", type=int, default=16)
    ap.add_argument("--qformer-heads", type=int, default=12)
    a = ap.parse_args(argv)
    model = load_or_exit(a.src, vision_tower=a.vision_tower, qformer_vocab=a.qformer_vocab,
                         vision_heads=a.vision_heads, qformer_heads=a.qformer_heads)
    try:
        out = save(model, a.dst)
    except OSError as e:
        print(f"error: {a.dst}: expected a folder to write the checkpoint in, could not write it ({e})", file=sys.stderr)
        return 2
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out} ({n / 1e6:.1f}M parameters, {model.config.tokens_per_frame} tokens per frame)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
