"""Vision stage export: EVA-ViT-g with the reference's weights, one graph, dynamic frame axis.

    pixel_values [frames,3,S,S] --patch conv, CLS, pos--> depth x pre-norm block --> vision_feats [frames,N+1,Cv]

The attention is written in the form OpenVINO fuses into one MHA kernel (and ORT's CPU provider runs
no slower): q, k and v as three linears, the 1/sqrt(d) scale folded into q's weight and bias, heads
split by 4-D reshape and transpose,

    x [F,T,C] -> q = x (s Wq)^T + s bq, k = x Wk^T, v = x Wv^T + bv     each [F,T,C] -> [F,h,T,d]
              -> softmax(q k^T) v [F,h,T,d] -> [F,T,C] -> proj

instead of the reference's one qkv linear and a 5-D permute (two unfused transposes and a scale
multiply per block in OpenVINO: 0.99 vs 0.82 ms/frame at bf16, docs/BENCHMARKS.md).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .common import torch_export

INPUTS, OUTPUTS = ("pixel_values",), ("vision_feats",)


class ExportVision(nn.Module):
    """llamavid_ref's EvaViT (same weights, same outputs within fp32 rounding) in the export form above.
    The q/k/v weights are split (and q scaled) here, once, so that the graph holds them as constants:
    sliced at run time they would be copied on every call and ORT could not pre-pack them."""

    def __init__(self, vit):
        super().__init__()
        self.vit = vit
        self.qkv = nn.ModuleList(self._split(block.attn) for block in vit.blocks)

    @staticmethod
    def _split(attn) -> nn.ModuleList:
        """The reference's fused qkv [3C,C] -> q (scaled, with q_bias), k (no bias: it is zero), v (v_bias)."""
        C = attn.q_bias.shape[0]
        W = attn.qkv.weight.detach()
        linears = nn.ModuleList(nn.utils.skip_init(nn.Linear, C, C, bias=b) for b in (True, False, True))
        with torch.no_grad():
            for lin, w, b in zip(linears, (W[:C] * attn.scale, W[C:2 * C], W[2 * C:]),
                                 (attn.q_bias * attn.scale, None, attn.v_bias)):
                lin.weight.copy_(w)
                if b is not None:
                    lin.bias.copy_(b)
        return linears

    def attention(self, attn, qkv, x):                              # x [F,T,C]
        Fr, T, C = x.shape

        def heads(t):                                                # [F,T,C] -> [F,h,T,d]
            return t.reshape(Fr, T, attn.heads, C // attn.heads).transpose(1, 2)

        q, k, v = (heads(lin(x)) for lin in qkv)
        out = (q @ k.transpose(-2, -1)).softmax(-1) @ v              # [F,h,T,d]
        return attn.proj(out.transpose(1, 2).reshape(Fr, T, C))

    def forward(self, pixel_values):                                 # [F,3,S,S]
        v = self.vit
        x = v.patch_embed(pixel_values)                              # [F,N,C]
        x = torch.cat([v.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + v.pos_embed
        for block, qkv in zip(v.blocks, self.qkv):
            x = x + self.attention(block.attn, qkv, block.norm1(x))
            x = x + block.mlp(block.norm2(x))
        return x                                                     # [F,N+1,C]


def export_vision(model, path: Path) -> Path:
    """model: llamavid_ref.LlamaVid -> vision.onnx at `path` (fp32)."""
    S = model.config.vision.image_size
    example = torch.randn(2, 3, S, S)
    return torch_export(ExportVision(model.vision).eval(), (example,), path, INPUTS, OUTPUTS,
                        {"pixel_values": {0: "frames"}, "vision_feats": {0: "frames"}})
