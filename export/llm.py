"""LLM stage export: a LLaMA decoder taking inputs_embeds and a KV cache, and the text embedding table.

Two graphs with the same inputs and outputs; build.py keeps the faster ("fused", measured in
docs/BENCHMARKS.md), the other stays for comparison and for backends without ORT's contrib ops:

  "fused"  built node by node with ORT's CPU/CUDA contrib ops; the KV cache is one buffer per layer
           of max_seq positions that the runtime binds as both past and present (nothing is copied
           or grown per token).
  "plain"  torch.onnx.export of the reference LlamaLM; present = concat(past, new) each step.

inputs   inputs_embeds [batch,seq,H] f32, attention_mask [batch,total] i64 (total = past + seq),
         past_key_values.{i}.key|value [batch,kv_heads,past_seq,d] f32 (fused: past_seq = max_seq)
outputs  logits [batch,1,V] f32 (the LAST position only: generation never needs the others),
         present.{i}.key|value [batch,kv_heads,present_seq,d]   (fused: present_seq = max_seq)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from runtime.manifest import kv_names

from .common import OPSET, save_model, torch_export

FORMS = ("fused", "plain")
MS = "com.microsoft"


def save_embeddings(model, path: Path) -> Path:
    """The text embedding table [V,H] float32 as .npy (the runtime embeds text ids with it)."""
    np.save(path, model.llm.embed_tokens.weight.detach().float().numpy())
    return Path(path)


# ---- plain: torch.onnx.export of the reference ------------------------------------------------------
class _PlainDecoder(nn.Module):
    def __init__(self, llm):
        super().__init__()
        self.llm = llm

    def forward(self, inputs_embeds, attention_mask, *past_flat):
        past = [(past_flat[i], past_flat[i + 1]) for i in range(0, len(past_flat), 2)]
        logits, present = self.llm(inputs_embeds, attention_mask, None, past, last_only=True)
        return (logits, *[t for kv in present for t in kv])


def export_llm_plain(model, path: Path) -> Path:
    c = model.config.llm
    past_names, present_names = kv_names(c.layers)
    B, T, P = 1, 3, 2
    past = [torch.randn(B, c.kv_heads, P, c.head_dim) for _ in past_names]
    args = (torch.randn(B, T, c.hidden), torch.ones(B, P + T, dtype=torch.long), *past)
    axes = {"inputs_embeds": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
            "logits": {0: "batch"}}
    axes.update({n: {0: "batch", 2: "past_seq"} for n in past_names})
    axes.update({n: {0: "batch", 2: "total"} for n in present_names})
    return torch_export(_PlainDecoder(model.llm).eval(), args, path,
                        ["inputs_embeds", "attention_mask", *past_names], ["logits", *present_names], axes)


# ---- fused: ORT contrib ops, built node by node ---------------------------------------------------
class _Graph:
    """Collects nodes and initializers; names nodes hierarchically (/model/layers.0/attn/...)."""

    def __init__(self):
        self.nodes, self.inits = [], []

    def weight(self, name: str, t) -> str:
        a = t.detach().float().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(a), name))
        return name

    def op(self, op_type: str, inputs, name: str, outputs: int | list = 1, domain: str = "", **attrs):
        outs = [f"{name}/out{i}" for i in range(outputs)] if isinstance(outputs, int) else outputs
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name, domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs


def rope_cache(c, max_seq: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [max_seq, d/2]: the reference's rope_cos_sin for positions 0..max_seq-1 (linear scaling)."""
    d = c.head_dim
    inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = (torch.arange(max_seq, dtype=torch.float32) / c.rope_scaling)[:, None] * inv_freq
    return freqs.cos().numpy(), freqs.sin().numpy()


#  attention_mask [B,total] --ReduceSum-1--> seqlens_k [B] i32 ; Shape[1] --> total_seq_len i32
#  inputs_embeds x [B,T,H]
#   layer i:  h = RMSNorm(x)            (i = 0: SimplifiedLayerNormalization;
#                                         i > 0: SkipSimplifiedLayerNormalization(mlp, residual) -> h, residual)
#             qkv = h @ Wqkv            [B,T,(heads + 2 kv_heads) d]   (q, k, v packed in one MatMul)
#             a, present.k, present.v = GroupQueryAttention(qkv, past.k, past.v, seqlens_k, total, cos, sin)
#                                        rotary inside (half layout), causal, shared past/present buffer
#             h, residual = SkipSimplifiedLayerNormalization(a @ Wo, residual)
#             mlp = (QuickGelu_alpha1(h @ Wg) * (h @ Wu)) @ Wd       (QuickGelu with alpha 1 is SiLU)
#  last position: Slice [:, -1:] of mlp and residual -> SkipSimplifiedLayerNormalization -> @ lm_head -> logits [B,1,V]
def build_llm_fused(model, path: Path, max_seq: int | None = None) -> Path:
    c = model.config.llm
    max_seq = max_seq or c.max_positions
    d, g = c.head_dim, _Graph()
    past_names, present_names = kv_names(c.layers)
    cos, sin = rope_cache(c, max_seq)
    g.weight("cos_cache", cos), g.weight("sin_cache", sin)
    g.weight("one", np.array([1], np.int64)), g.weight("minus_one", np.array([-1], np.int64))
    g.weight("big", np.array([np.iinfo(np.int64).max], np.int64))
    total = g.op("ReduceSum", ["attention_mask", "one"], "/model/mask/sum", keepdims=0)
    seqlens = g.op("Cast", [g.op("Sub", [total, "one"], "/model/mask/sub")], "/model/mask/seqlens_k",
                   to=TensorProto.INT32)
    shape = g.op("Shape", ["attention_mask"], "/model/mask/shape")
    total_len = g.op("Cast", [g.op("Gather", [shape, g.weight("axis1", np.array(1, np.int64))],
                                   "/model/mask/total")], "/model/mask/total_len", to=TensorProto.INT32)
    eps = float(c.eps)
    x, residual, mlp = "inputs_embeds", None, None
    for i, layer in enumerate(model.llm.layers):
        p, at = f"/model/layers.{i}", layer.self_attn
        w_in = g.weight(f"layers.{i}.input_layernorm.weight", layer.input_layernorm.weight)
        if i == 0:
            h, residual = g.op("SimplifiedLayerNormalization", [x, w_in], f"{p}/input_layernorm",
                               axis=-1, epsilon=eps, stash_type=1), x
        else:
            h, residual = g.op("SkipSimplifiedLayerNormalization", [mlp, residual, w_in], f"{p}/input_layernorm",
                               outputs=[f"{p}/input_layernorm/out0", "", "", f"{p}/residual0"],
                               domain=MS, epsilon=eps)[::3]
        wqkv = torch.cat([at.q_proj.weight, at.k_proj.weight, at.v_proj.weight]).T
        qkv = g.op("MatMul", [h, g.weight(f"layers.{i}.attn.qkv_proj.weight", wqkv)], f"{p}/attn/qkv_proj/MatMul")
        a = g.op("GroupQueryAttention", [qkv, "", "", past_names[2 * i], past_names[2 * i + 1], seqlens, total_len,
                                         "cos_cache", "sin_cache"], f"{p}/attn/GroupQueryAttention",
                 outputs=[f"{p}/attn/out", present_names[2 * i], present_names[2 * i + 1]], domain=MS,
                 num_heads=c.heads, kv_num_heads=c.kv_heads, do_rotary=1, rotary_interleaved=0,
                 scale=float(d) ** -0.5)[0]
        o = g.op("MatMul", [a, g.weight(f"layers.{i}.attn.o_proj.weight", at.o_proj.weight.T)], f"{p}/attn/o_proj/MatMul")
        w_post = g.weight(f"layers.{i}.post_attention_layernorm.weight", layer.post_attention_layernorm.weight)
        h, residual = g.op("SkipSimplifiedLayerNormalization", [o, residual, w_post], f"{p}/post_attention_layernorm",
                           outputs=[f"{p}/post_attention_layernorm/out0", "", "", f"{p}/residual1"],
                           domain=MS, epsilon=eps)[::3]
        m = layer.mlp
        gate = g.op("MatMul", [h, g.weight(f"layers.{i}.mlp.gate_proj.weight", m.gate_proj.weight.T)], f"{p}/mlp/gate_proj/MatMul")
        up = g.op("MatMul", [h, g.weight(f"layers.{i}.mlp.up_proj.weight", m.up_proj.weight.T)], f"{p}/mlp/up_proj/MatMul")
        act = g.op("Mul", [g.op("QuickGelu", [gate], f"{p}/mlp/act", domain=MS, alpha=1.0), up], f"{p}/mlp/Mul")
        mlp = g.op("MatMul", [act, g.weight(f"layers.{i}.mlp.down_proj.weight", m.down_proj.weight.T)], f"{p}/mlp/down_proj/MatMul")
    last = [g.op("Slice", [t, "minus_one", "big", "one"], f"/model/last/{k}") for k, t in (("mlp", mlp), ("residual", residual))]
    hn = g.op("SkipSimplifiedLayerNormalization", [*last, g.weight("norm.weight", model.llm.norm.weight)],
              "/model/norm", domain=MS, epsilon=eps)
    g.op("MatMul", [hn, g.weight("lm_head.weight", model.llm.lm_head.weight.T)], "/lm_head/MatMul", outputs=["logits"])

    f32 = TensorProto.FLOAT
    kv_shape = ["batch", c.kv_heads, "max_seq", d]
    inputs = [helper.make_tensor_value_info("inputs_embeds", f32, ["batch", "seq", c.hidden]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
              *[helper.make_tensor_value_info(n, f32, kv_shape) for n in past_names]]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", 1, c.vocab_size]),
               *[helper.make_tensor_value_info(n, f32, kv_shape) for n in present_names]]
    graph = helper.make_graph(g.nodes, "llamavid_llm", inputs, outputs, g.inits)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)])
    return save_model(onnx_model, path)


def export_llm(model, path: Path, form: str = "fused", max_seq: int | None = None) -> Path:
    if form not in FORMS:
        raise ValueError(f"llm form: expected one of {FORMS}, found {form!r}")
    return build_llm_fused(model, path, max_seq) if form == "fused" else export_llm_plain(model, path)
