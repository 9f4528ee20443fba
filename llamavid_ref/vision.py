"""Vision stage: EVA-ViT-g as LLaMA-VID releases it (BLIP-2 / LAVIS variant).

    pixel_values [F,3,S,S] --patch_embed--> [F,N,C] --cat CLS, + pos_embed--> [F,N+1,C]
        --depth x (x += attn(norm1(x)); x += mlp(norm2(x)))--> vision_feats [F,N+1,C]

No final norm, CLS kept. 39 of the released file's 40 blocks are built (penultimate layer).
Parameter names are LAVIS's own (eva_vit_g.pth), so the weight map is the identity.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig


class EvaAttention(nn.Module):
    """Fused qkv without bias + separate q_bias and v_bias (the k bias is zero)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (width // heads) ** -0.5
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:            # x [B,T,C]
        B, T, C = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias)                     # [B,T,3C]
        q, k, v = qkv.reshape(B, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # 3 x [B,h,T,d]
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1)  # [B,h,T,T]
        return self.proj((attn @ v).transpose(1, 2).reshape(B, T, C))


class EvaMlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))                         # exact (erf) GELU


class EvaBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.attn = EvaAttention(cfg.width, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = EvaMlp(cfg.width, cfg.mlp_dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x):                                            # [B,3,S,S]
        return self.proj(x).flatten(2).transpose(1, 2)               # [B,N,C]


class EvaViT(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.width))
        self.blocks = nn.ModuleList(EvaBlock(cfg) for _ in range(cfg.depth))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # [F,3,S,S]
        S = self.cfg.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, S, S):
            raise ValueError(f"vision: expected pixel_values [F,3,{S},{S}], found {list(pixel_values.shape)}")
        x = self.patch_embed(pixel_values)                            # [F,N,C]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x                                                      # [F,N+1,C]


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """[1,1+g*g,C] -> [1,1+grid*grid,C]: bicubic in fp32 on the patch grid, CLS untouched (as LAVIS)."""
    old = int(round((pos_embed.shape[1] - 1) ** 0.5))
    if old == grid:
        return pos_embed
    cls, grid_tokens = pos_embed[:, :1], pos_embed[:, 1:]
    C = pos_embed.shape[-1]
    g = grid_tokens.float().reshape(1, old, old, C).permute(0, 3, 1, 2)
    g = F.interpolate(g, size=(grid, grid), mode="bicubic", align_corners=False)
    g = g.permute(0, 2, 3, 1).reshape(1, grid * grid, C).to(pos_embed.dtype)
    return torch.cat([cls, g], dim=1)
