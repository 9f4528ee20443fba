"""Head stage export: Q-Former, context attention, content pooling and projectors, one graph.

 vision_feats [F,N+1,Cv] ─ln─> Q-Former(queries ; qformer_ids/mask [1,L]) ─att_projector─> text_q [F,Q,Cv]
      └─[:,1:]─> patches [F,N,Cv]                                                            │
            │        ┌─ "keys" form (the reference):   keys = key_projector(patches)           │
            │        │   ctx = mean_Q softmax_N(text_q keys^T * scale) patches                 │
            ├────────┤                                                                          │
            │        └─ "folded" form: queries = text_q W_key  (the key bias cancels in softmax_N)
            │            ctx = mean_Q softmax_N(queries patches^T * scale) patches   <- plugin form
            │                                     ctx [F,1,Cv] ─val_projector─> context token [F,1,H]
            └─pool(mean | grid:k | none)─> [F,n,Cv] ─mm_projector─> content tokens [F,n,H]
 frame_tokens = cat(context, content) [F,n+1,H]                        scale = 1/sqrt(Cv)

One question for all the frames of a call (qformer_ids/mask [1,L]; the reference takes [F,L] with equal
rows), so the Q-Former runs per question what does not depend on the frame (question_qformer):

    layer 0's self-attention and text FFN     on [1,Q+L,D]: once per call, not per frame (layer 0 is
                                              always a cross-attention layer: from there on queries are [F,Q,D])
    the last layer                            self-attention and FFN for the Q query rows only (the
                                              reference computes the text rows too, then drops them)

head.onnx holds a standard-op form (build.py: HEAD_FORM); head_trt.onnx holds the folded form with the context
attention as ONE node for the TensorRT plugin (kernels/context_attention):
    llamavid::ContextAttention(queries [F,Q,C], patches [F,N,C]; scale) -> context [F,1,C]
    attributes plugin_version "1", plugin_namespace "llamavid".
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from llamavid_ref.head import context_attention, pool_content

from .common import torch_export

INPUTS, OUTPUTS = ("vision_feats", "qformer_ids", "qformer_mask"), ("frame_tokens",)
FORMS = ("keys", "folded", "plugin")
PLUGIN = {"op_type": "ContextAttention", "domain": "llamavid", "plugin_version": "1", "plugin_namespace": "llamavid"}


def folded_context_attention(queries: torch.Tensor, patches: torch.Tensor, scale: float) -> torch.Tensor:
    """queries [F,Q,C] (= text_q @ W_key), patches [F,N,C] -> [F,1,C]: the plugin's semantics."""
    return ((queries @ patches.transpose(-1, -2)) * scale).softmax(-1).matmul(patches).mean(1, keepdim=True)


class _ContextAttentionNode(torch.autograd.Function):
    """Runs the folded math in torch; exports as the single llamavid::ContextAttention node."""

    @staticmethod
    def forward(ctx, queries, patches, scale: float):
        return folded_context_attention(queries, patches, scale)

    @staticmethod
    def symbolic(g, queries, patches, scale: float):
        out = g.op(f"{PLUGIN['domain']}::{PLUGIN['op_type']}", queries, patches, scale_f=scale,
                   plugin_version_s=PLUGIN["plugin_version"], plugin_namespace_s=PLUGIN["plugin_namespace"])
        return out.setType(queries.type().with_sizes([None, 1, None]))


def question_qformer(qf, queries, input_ids, attention_mask, image):
    """llamavid_ref's QFormer.forward for one question shared by every frame: queries [1,Q,D], input_ids /
    attention_mask [1,L], image [F,N+1,Cv] -> [F,Q,D], the reference's output for ids repeated F times."""
    Q, L = queries.shape[1], input_ids.shape[1]
    text = qf.word_embeddings(input_ids) + qf.position_embeddings.weight[:L]          # [1,L,D]
    x = qf.LayerNorm(torch.cat([queries, text], dim=1))                               # [1,Q+L,D]
    mask = torch.cat([attention_mask.new_ones(1, Q), attention_mask], dim=1)
    additive = (1.0 - mask[:, None, None, :].to(x.dtype)) * -10000.0                 # [1,1,1,Q+L]
    last = len(qf.layers) - 1
    for i, layer in enumerate(qf.layers):
        if i == last:                                        # text rows are dropped after the last layer
            xq = layer.attention(x[:, :Q], x, additive)                               # [B,Q,D]
        else:
            x = layer.attention(x, x, additive)
            xq = x[:, :Q]
        if layer.crossattention is not None:                 # from here on every frame differs
            xq = layer.crossattention(xq.expand(image.shape[0], -1, -1), image)     # [F,Q,D]
        xq = layer.ffn_query(xq)
        if i == last:
            return xq                                                                 # [F,Q,D]
        xt = layer.ffn(x[:, Q:])                                                      # [B,L,D]
        x = torch.cat([xq, xt.expand(xq.shape[0], -1, -1)], dim=1)                   # B: 1, then F


class ExportHead(nn.Module):
    """The reference head with one question per call and the context attention in one of FORMS (same
    weights, same outputs)."""

    def __init__(self, head, form: str):
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"head form: expected one of {FORMS}, found {form!r}")
        self.head, self.form = head, form

    def forward(self, vision_feats, qformer_ids, qformer_mask):               # ids/mask [1,L]
        h = self.head
        patches = vision_feats[:, 1:]                                             # [F,N,Cv]
        content = h.mm_projector(pool_content(patches, h.cfg.compress_type))     # [F,n,H]
        if h.cfg.tokens == "content":                                             # ablation: no context token
            return content
        q_out = question_qformer(h.qformer, h.query, qformer_ids, qformer_mask, h.ln(vision_feats))
        text_q = h.att_projector(q_out)                                           # [F,Q,Cv]
        if self.form == "keys":
            ctx = context_attention(text_q, h.key_projector(patches), patches)
        else:
            queries = text_q @ h.key_projector.weight                             # [F,Q,Cv]
            scale = h.ln.normalized_shape[0] ** -0.5                               # 1/sqrt(Cv)
            attend = _ContextAttentionNode.apply if self.form == "plugin" else folded_context_attention
            ctx = attend(queries, patches, scale)                                  # [F,1,Cv]
        ctx = h.val_projector(ctx)                                                # [F,1,H]
        return ctx if h.cfg.tokens == "context" else torch.cat([ctx, content], dim=1)   # [F,n+1,H]


def export_head(model, path: Path, form: str = "keys") -> Path:
    """model: llamavid_ref.LlamaVid -> head.onnx (form "keys" or "folded") or head_trt.onnx (form "plugin")."""
    cfg = model.config
    F, L = 2, 5
    feats = torch.randn(F, cfg.vision.num_patches + 1, cfg.vision.width)
    ids = torch.randint(0, cfg.qformer.vocab_size, (1, L))
    mask = torch.ones(1, L, dtype=torch.long)
    axes = {"vision_feats": {0: "frames"}, "qformer_ids": {1: "text"}, "qformer_mask": {1: "text"},
            "frame_tokens": {0: "frames"}}
    return torch_export(ExportHead(model.head, form).eval(), (feats, ids, mask), path, INPUTS, OUTPUTS, axes)
