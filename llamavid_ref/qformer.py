"""The instruction-aware Q-Former (InstructBLIP / LAVIS BERT), as LLaMA-VID runs it.

    queries [F,Q,D] ; word+pos(text ids) [F,L,D]  -> cat -> LayerNorm -> x [F,Q+L,D]
    per layer i:
        x = LN(x + SelfAttn(x, mask over [queries ; text]))           bidirectional
        if i % freq == 0: xq = LN(xq + CrossAttn(xq, image))           query positions only
        xq = FFN_query(xq) ; xt = FFN(xt)                              separate FFNs
    out = x[:, :Q]                                                      [F,Q,D]

Weight map from the release (prefix model.vlm_att_encoder.bert.) to ours (prefix qformer.):
    embeddings.word_embeddings / position_embeddings / LayerNorm -> same names
    encoder.layer.{i}.attention.self.{query,key,value}         -> layers.{i}.attention.{query,key,value}
    encoder.layer.{i}.attention.output.{dense,LayerNorm}       -> layers.{i}.attention.output.{...}
    encoder.layer.{i}.crossattention.self.{query,key,value}    -> layers.{i}.crossattention.{...}
    encoder.layer.{i}.crossattention.output.{dense,LayerNorm}  -> layers.{i}.crossattention.output.{...}
    encoder.layer.{i}.intermediate.dense / output.{dense,LayerNorm}      -> layers.{i}.ffn.{up,down,LayerNorm}
    encoder.layer.{i}.intermediate_query.dense / output_query.{...}      -> layers.{i}.ffn_query.{...}
(The table itself is WEIGHT_MAP in checkpoint.py.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import QFormerConfig


class AddNorm(nn.Module):
    """LayerNorm(dense(h) + residual) (BertSelfOutput)."""

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, h, residual):
        return self.LayerNorm(self.dense(h) + residual)


class BertAttention(nn.Module):
    """Multi-head attention + output dense + residual LayerNorm (BertAttention)."""

    def __init__(self, hidden: int, heads: int, eps: float, kv_width: int | None = None):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width or hidden, hidden)
        self.value = nn.Linear(kv_width or hidden, hidden)
        self.output = AddNorm(hidden, eps)

    def _split(self, x):                                             # [B,T,D] -> [B,h,T,d]
        B, T, D = x.shape
        return x.reshape(B, T, self.heads, D // self.heads).transpose(1, 2)

    def forward(self, x, kv, additive_mask=None):                    # x [B,T,D], kv [B,S,Dk]
        q, k, v = self._split(self.query(x)), self._split(self.key(kv)), self._split(self.value(kv))
        scores = q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5)     # [B,h,T,S]
        if additive_mask is not None:
            scores = scores + additive_mask
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)    # [B,T,D]
        return self.output(ctx, x)


class BertFFN(nn.Module):
    """dense -> GELU -> dense, residual LayerNorm (BertIntermediate + BertOutput)."""

    def __init__(self, hidden: int, ffn: int, eps: float):
        super().__init__()
        self.up = nn.Linear(hidden, ffn)
        self.down = nn.Linear(ffn, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x):
        return self.LayerNorm(self.down(F.gelu(self.up(x))) + x)


class QFormerLayer(nn.Module):
    def __init__(self, cfg: QFormerConfig, encoder_width: int, cross: bool):
        super().__init__()
        self.attention = BertAttention(cfg.hidden, cfg.heads, cfg.eps)
        self.crossattention = BertAttention(cfg.hidden, cfg.heads, cfg.eps, encoder_width) if cross else None
        self.ffn = BertFFN(cfg.hidden, cfg.ffn, cfg.eps)
        self.ffn_query = BertFFN(cfg.hidden, cfg.ffn, cfg.eps)

    def forward(self, x, self_mask, image, num_query: int):
        x = self.attention(x, x, self_mask)                          # [B,Q+L,D]
        xq, xt = x[:, :num_query], x[:, num_query:]
        if self.crossattention is not None:
            xq = self.crossattention(xq, image)                      # image mask is all ones
        return torch.cat([self.ffn_query(xq), self.ffn(xt)], dim=1)


class QFormer(nn.Module):
    def __init__(self, cfg: QFormerConfig, encoder_width: int):
        super().__init__()
        self.cfg = cfg
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.hidden)
        self.LayerNorm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.layers = nn.ModuleList(
            QFormerLayer(cfg, encoder_width, cross=(i % cfg.cross_attention_freq == 0))
            for i in range(cfg.layers))

    def forward(self, queries, input_ids, attention_mask, image):
        """queries [F,Q,D], input_ids/attention_mask [F,L], image [F,N+1,Cv] (already vlm_att_ln'd)."""
        Fr, L = input_ids.shape
        Q = queries.shape[1]
        text = self.word_embeddings(input_ids) + self.position_embeddings.weight[:L]   # positions from 0
        x = self.LayerNorm(torch.cat([queries, text], dim=1))                           # [F,Q+L,D]
        mask = torch.cat([attention_mask.new_ones(Fr, Q), attention_mask], dim=1)       # [F,Q+L]
        additive = (1.0 - mask[:, None, None, :].to(x.dtype)) * -10000.0               # [F,1,1,Q+L]
        for layer in self.layers:
            x = layer(x, additive, image, Q)
        return x[:, :Q]                                                                 # [F,Q,D]
