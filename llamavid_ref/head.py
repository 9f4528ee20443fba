"""Head stage: the dual-token generator that turns one frame into n+1 LLM tokens.

 vision_feats [F,N+1,Cv] ──ln──> Q-Former(queries, qformer ids/mask) ─> [F,Q,D] ─att_projector─> text_q [F,Q,Cv]
      │                                                                                      │
      └─[:,1:]─> patches [F,N,Cv] ──key_projector──> keys [F,N,Cv] ─────────────────────────┤
                      │                                                       context_attention
                      │                          ctx [F,1,Cv] <── mean_q softmax_N(text_q keys^T / sqrt(Cv)) patches
                      │                           └─val_projector─> context token [F,1,H]
                      └─pool (mean | grid:k | none)─> [F,n,Cv] ─mm_projector─> content tokens [F,n,H]
 frame_tokens = cat(context, content) [F,n+1,H]       context FIRST; with "mean" n = 1: 2 tokens per frame

Weight map (release -> ours, prefix model. -> head.):
    vlm_att_query                  -> query            [1,Q,D]
    vlm_att_ln                     -> ln               [Cv]
    vlm_att_projector              -> att_projector    [Cv,D]
    vlm_att_key_projector          -> key_projector    [Cv,Cv]
    vlm_att_val_projector          -> val_projector    [H,Cv]
    mm_projector.{0,2}             -> mm_projector.{0,2}
    vlm_att_encoder.bert.*         -> qformer.*        (table in qformer.py)
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from .config import HeadConfig, QFormerConfig
from .qformer import QFormer


def context_attention(text_q: torch.Tensor, keys: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """text_q [F,Q,C], keys [F,N,C], patches [F,N,C] -> [F,1,C]; exactly the released formula."""
    scores = text_q @ keys.transpose(-1, -2) / (patches.shape[-1] ** 0.5)   # [F,Q,N]
    return (scores.softmax(-1) @ patches).mean(1, keepdim=True)              # [F,1,C]


def pool_content(patches: torch.Tensor, compress_type: str | None) -> torch.Tensor:
    """patches [F,N,C] -> [F,n,C]: None keeps all N, 'mean' -> 1, 'grid:k' -> k*k (avg_pool2d)."""
    if compress_type is None:
        return patches
    if compress_type == "mean":
        return patches.mean(dim=1, keepdim=True)
    Fr, N, C = patches.shape
    side, k = int(N ** 0.5), int(compress_type.split(":")[1])
    stride = side // k
    grid = patches.reshape(Fr, side, side, C).permute(0, 3, 1, 2)           # [F,C,s,s]
    pooled = F.avg_pool2d(grid, kernel_size=stride, stride=stride)           # [F,C,k,k]
    return pooled.permute(0, 2, 3, 1).flatten(1, 2)                          # [F,k*k,C]


def build_projector(kind: str, c_in: int, hidden: int) -> nn.Module:
    """LLaVA's projector family: 'linear' or 'mlp{depth}x_gelu' (Linear, then (GELU, Linear) x depth-1)."""
    if kind == "linear":
        return nn.Linear(c_in, hidden)
    m = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if not m:
        raise ValueError(f"mm_projector_type: expected 'linear' or 'mlpNx_gelu', found {kind!r}")
    layers: list[nn.Module] = [nn.Linear(c_in, hidden)]
    for _ in range(int(m.group(1)) - 1):
        layers += [nn.GELU(), nn.Linear(hidden, hidden)]
    return nn.Sequential(*layers)


class DualTokenHead(nn.Module):
    def __init__(self, cfg: HeadConfig, qcfg: QFormerConfig, vision_width: int, llm_hidden: int):
        super().__init__()
        self.cfg = cfg
        self.query = nn.Parameter(torch.zeros(1, qcfg.num_query, qcfg.hidden))
        self.ln = nn.LayerNorm(vision_width, eps=cfg.ln_eps)
        self.qformer = QFormer(qcfg, vision_width)
        self.att_projector = nn.Linear(qcfg.hidden, vision_width)
        self.key_projector = nn.Linear(vision_width, vision_width)
        self.val_projector = nn.Linear(vision_width, llm_hidden)
        self.mm_projector = build_projector(cfg.projector_type, vision_width, llm_hidden)

    def text_queries(self, vision_feats, qformer_ids, qformer_mask):
        """-> text_q [F,Q,Cv]: the instruction-conditioned queries in vision width."""
        queries = self.query.expand(vision_feats.shape[0], -1, -1)
        q_out = self.qformer(queries, qformer_ids, qformer_mask, self.ln(vision_feats))   # [F,Q,D]
        return self.att_projector(q_out)

    def forward(self, vision_feats, qformer_ids, qformer_mask):
        """vision_feats [F,N+1,Cv], qformer_ids/mask [F,L] -> frame_tokens [F,n+1,H]."""
        patches = vision_feats[:, 1:]                                             # [F,N,Cv]
        content = self.mm_projector(pool_content(patches, self.cfg.compress_type))  # [F,n,H]
        if self.cfg.tokens == "content":                                          # ablation: no context token
            return content
        text_q = self.text_queries(vision_feats, qformer_ids, qformer_mask)       # [F,Q,Cv]
        ctx = self.val_projector(context_attention(text_q, self.key_projector(patches), patches))  # [F,1,H]
        return ctx if self.cfg.tokens == "context" else torch.cat([ctx, content], dim=1)  # [F,n+1,H]
