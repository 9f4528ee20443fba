"""LLM stage: LLaMA (HF LlamaForCausalLM numerics), taking input embeddings and a KV cache.

    inputs_embeds [B,T,H] --layers x (x += attn(rms(x)); x += mlp(rms(x)))--> rms --> lm_head --> logits [B,T,V]

RoPE uses the HF half-rotation layout (the released q/k weights are permuted for it); linear RoPE
scaling divides positions by `rope_scaling` (16 for the long-video model). Grouped-query
attention (kv_heads < heads) is supported for other Llama-architecture LLMs.
Parameter names are HF's without the leading "model." (table in checkpoint.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import LLMConfig

KVCache = list  # per layer: (k [B,kvh,S,d], v [B,kvh,S,d])


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(cfg: LLMConfig, position_ids: torch.Tensor, dtype: torch.dtype = torch.float32):
    """position_ids [B,T] -> cos, sin [B,T,d]: computed in fp32 on the ids' device, returned in
    `dtype` (the activations' type, as HF's rotary embedding does)."""
    d = cfg.head_dim
    exponents = torch.arange(0, d, 2, dtype=torch.float32, device=position_ids.device) / d
    inv_freq = 1.0 / (cfg.rope_theta ** exponents)
    pos = position_ids.float() / cfg.rope_scaling                                  # linear scaling
    freqs = pos[..., None] * inv_freq                                              # [B,T,d/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):                                                      # x [B,h,T,d]
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden, cfg.heads * d, bias=False)
        self.k_proj = nn.Linear(cfg.hidden, cfg.kv_heads * d, bias=False)
        self.v_proj = nn.Linear(cfg.hidden, cfg.kv_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.heads * d, cfg.hidden, bias=False)

    def forward(self, x, cos, sin, mask, past):
        B, T, _ = x.shape
        h, kvh, d = self.cfg.heads, self.cfg.kv_heads, self.cfg.head_dim
        q = self.q_proj(x).view(B, T, h, d).transpose(1, 2)                        # [B,h,T,d]
        k = self.k_proj(x).view(B, T, kvh, d).transpose(1, 2)                      # [B,kvh,T,d]
        v = self.v_proj(x).view(B, T, kvh, d).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # [B,kvh,S,d]
        present = (k, v)
        if kvh != h:
            k, v = k.repeat_interleave(h // kvh, dim=1), v.repeat_interleave(h // kvh, dim=1)
        scores = (q @ k.transpose(-1, -2)) / (d ** 0.5) + mask                     # [B,h,T,S]
        out = scores.float().softmax(-1).to(q.dtype) @ v                           # [B,h,T,d]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, h * d)), present


class MLP(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden, cfg.ffn, bias=False)
        self.up_proj = nn.Linear(cfg.hidden, cfg.ffn, bias=False)
        self.down_proj = nn.Linear(cfg.ffn, cfg.hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden, cfg.eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden, cfg.eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, past):
        a, present = self.self_attn(self.input_layernorm(x), cos, sin, mask, past)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), present


def causal_mask(attention_mask: torch.Tensor, T: int, dtype) -> torch.Tensor:
    """attention_mask [B,S] (1 = real token, S = past + T) -> additive [B,1,T,S]."""
    B, S = attention_mask.shape
    device = attention_mask.device
    q_pos = torch.arange(S - T, S, device=device)[:, None]                          # [T,1]
    allowed = (torch.arange(S, device=device)[None, :] <= q_pos)[None, None] & attention_mask[:, None, None, :].bool()
    return torch.zeros(B, 1, T, S, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


class LlamaLM(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden, cfg.eps)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, inputs_embeds, attention_mask=None, position_ids=None, past: KVCache | None = None,
                last_only: bool = False):
        """inputs_embeds [B,T,H]; attention_mask [B,past+T]; position_ids [B,T] -> (logits [B,T,V], present);
        last_only: logits [B,1,V] of the last position (norm and lm_head skip the others)."""
        B, T, _ = inputs_embeds.shape
        past_len = past[0][0].shape[2] if past else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, past_len + T, dtype=torch.long, device=inputs_embeds.device)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past_len:]
        cos, sin = rope_cos_sin(self.cfg, position_ids, inputs_embeds.dtype)
        mask = causal_mask(attention_mask, T, inputs_embeds.dtype)
        x, present = inputs_embeds, []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, cos, sin, mask, past[i] if past else None)
            present.append(kv)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x)), present
