"""TensorRT-LLM for the LLM stage: the reference LlamaLM as a legacy TensorRT-LLM checkpoint with its trtllm-build
plan, and as an HF Llama checkpoint for TensorRT-LLM's PyTorch backend; both checked on CPU against the reference.

    python -m export.trtllm [--checkpoint CKPT] --out DIR [--dtype float32|float16|bfloat16] [--tp 1|2|4]
                            [--quant none|int8_wo|int4_wo] [--max-batch N] [--max-frames N] [--max-new-tokens N]

    LlamaLM --WEIGHT_MAP + fused qkv, split per rank--> DIR/trtllm/config.json, rank{r}.safetensors
            --HF names---------------------------------> DIR/hf/config.json, model.safetensors, tokenizer files
    LLMConfig + limits --make_plan--> Plan --check_plan (CPU)--> --build_command--> trtllm-build ... (DIR/engine/,
                                                                                     where TensorRT-LLM and a GPU are)
    DIR/trtllm_export.json   source model, options, plan, command, visual-token layout, file hashes (written last)

Tensor parallelism as TensorRT-LLM splits (models/llama/convert.py): q, k and v each split by rows and fused per
rank, kv heads duplicated first when there are fewer than ranks; o_proj and down_proj split by columns (their
partial outputs are summed across ranks); gate/up_proj and lm_head by rows (lm_head's vocab padded to a multiple
of tp); embedding and norms whole on every rank.

Weight-only quantization (W8A16 / W4A16): rank files keep the weights in --dtype and config.json carries
quantization.quant_algo; trtllm-build quantizes them when it loads the checkpoint (modeling_utils.preprocess_weights
-> weight_only_quantize_dict: per output channel, scale = max|w| / 2^(bits-1)) and lays them out for the GPU it
builds on. int8 tensors found in a checkpoint are loaded as they are, so they would have to be in that
GPU-specific kernel layout already, which nothing on a CPU can produce.

CPU twin: NumpyLlama runs DIR/trtllm/ as the engine computes it (every rank on its shard, partial sums
all-reduced, lm_head outputs gathered, the weight-only quantization trtllm-build applies), from ids whose
visual tokens are fake ids >= vocab_size looked up in a prompt table.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from runtime.manifest import hash_files

from .trt import Check

DTYPES = ("float32", "float16", "bfloat16")
TP_SIZES = (1, 2, 4)
QUANTS = {"none": None, "int8_wo": "W8A16", "int4_wo": "W4A16"}       # --quant -> quantization.quant_algo
QUANT_BITS = {"W8A16": 8, "W4A16": 4}
PRECISION_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "W8A16": "w8a16", "W4A16": "w4a16"}
BUILD_OPTIONS = {"fp32": ("float32", "none"), "fp16": ("float16", "none"), "int8": ("float16", "int8_wo")}
TEXT_TOKENS = 128          # prompt text next to the visual tokens: the template's system prompt, roles and question
RECORD = "trtllm_export.json"
FORMAT, FORMAT_VERSION = "llamavid-trtllm", 1

# reference LlamaLM name -> TensorRT-LLM name, tensor-parallel split (0: output rows, 1: input columns)
# q_proj, k_proj, v_proj -> transformer.layers.{}.attention.qkv.weight (fused_qkv)
WEIGHT_MAP = [
    ("embed_tokens.weight", "transformer.vocab_embedding.weight", None),
    ("layers.{}.input_layernorm.weight", "transformer.layers.{}.input_layernorm.weight", None),
    ("layers.{}.self_attn.o_proj.weight", "transformer.layers.{}.attention.dense.weight", 1),
    ("layers.{}.post_attention_layernorm.weight", "transformer.layers.{}.post_layernorm.weight", None),
    ("layers.{}.mlp.gate_proj.weight", "transformer.layers.{}.mlp.fc.weight", 0),      # HF gate_proj is "fc"
    ("layers.{}.mlp.up_proj.weight", "transformer.layers.{}.mlp.gate.weight", 0),      # and HF up_proj is "gate"
    ("layers.{}.mlp.down_proj.weight", "transformer.layers.{}.mlp.proj.weight", 1),
    ("norm.weight", "transformer.ln_f.weight", None),
    ("lm_head.weight", "lm_head.weight", 0),
]
QUANTIZED = ("attention.qkv.weight", "attention.dense.weight", "mlp.fc.weight", "mlp.gate.weight", "mlp.proj.weight")


class ConvertError(ValueError):
    """The conversion cannot go on; nothing was written. The message says what was expected and found."""


# ---- the plan: limits, prompt table, trtllm-build command (pure, from the config) --------------------------------
@dataclass(frozen=True)
class Plan:
    dtype: str
    tp: int
    quant: str
    vocab_size: int
    tokens_per_frame: int
    max_batch: int
    max_frames: int
    max_input_len: int
    max_seq_len: int
    max_prompt_embedding_table_size: int     # max_batch x tokens_per_frame x max_frames
    max_num_tokens: int                      # tokens per engine call: a whole prompt (no chunked context)


def make_plan(c, tokens_per_frame: int, dtype: str = "float16", tp: int = 1, quant: str = "none", max_batch: int = 1,
              max_frames: int | None = None, max_new_tokens: int | None = None) -> Plan:
    """c: the LLMConfig. Defaults: the context is max_positions; max_new_tokens min(512, context / 4); as many
    frames as fit the rest after TEXT_TOKENS of prompt text."""
    for name, value, allowed in (("--dtype", dtype, DTYPES), ("--tp", tp, TP_SIZES), ("--quant", quant, tuple(QUANTS))):
        if value not in allowed:
            raise ConvertError(f"{name}: expected one of {', '.join(map(str, allowed))}, found {value!r}")
    max_seq = c.max_positions
    max_input = max_seq - (max_new_tokens or min(512, max_seq // 4))
    frames = max_frames or max(1, (max_input - TEXT_TOKENS) // tokens_per_frame)
    return Plan(dtype, tp, quant, c.vocab_size, tokens_per_frame, max_batch, frames, max_input, max_seq,
                max_batch * tokens_per_frame * frames, max_input)


def check_plan(plan: Plan, c) -> list[Check]:
    """On CPU, from the config: the shapes split over tp ranks as TensorRT-LLM splits them, the precision,
    the lengths and the prompt table. c: the LLMConfig."""
    tp, kvh = plan.tp, c.kv_heads
    split = [f"{n} {v} not divisible by tp {tp}" for n, v in (("heads", c.heads), ("ffn", c.ffn)) if v % tp]
    if kvh % tp and tp % kvh:
        split.append(f"kv heads {kvh}: neither a multiple nor a divisor of tp {tp} (TensorRT-LLM duplicates kv heads "
                     f"only up to tp)")
    per_rank = f"per rank: {c.heads // tp} q heads, {max(kvh // tp, 1)} kv heads, ffn {c.ffn // tp}"
    qa = QUANTS[plan.quant]
    precision = (f"{plan.quant} ({qa}) runs 16-bit activations in TensorRT-LLM's weight-only GEMM: expected --dtype "
                 f"float16 or bfloat16, found {plan.dtype}") if qa and plan.dtype == "float32" else ""
    visual = plan.tokens_per_frame * plan.max_frames
    lengths = [msg for bad, msg in (
        (plan.max_seq_len > c.max_positions, f"max_seq_len {plan.max_seq_len} > the model's {c.max_positions} "
                                             f"positions"),
        (plan.max_input_len >= plan.max_seq_len, f"max_input_len {plan.max_input_len} leaves no new token in "
                                                 f"max_seq_len {plan.max_seq_len}"),
        (visual + TEXT_TOKENS > plan.max_input_len, f"{plan.max_frames} frames x {plan.tokens_per_frame} tokens + "
                                                    f"{TEXT_TOKENS} text tokens > max_input_len {plan.max_input_len}"),
        (plan.max_num_tokens < plan.max_input_len, f"max_num_tokens {plan.max_num_tokens} < max_input_len"),
    ) if bad]
    table = plan.max_batch * visual
    table_msg = "" if plan.max_prompt_embedding_table_size == table else (
        f"max_prompt_embedding_table_size {plan.max_prompt_embedding_table_size} != max_batch {plan.max_batch} x "
        f"{plan.tokens_per_frame} tokens per frame x {plan.max_frames} frames = {table}")
    rope = "" if c.rope_scaling >= 1.0 else f"rope_scaling {c.rope_scaling} < 1: TensorRT-LLM takes linear factors > 1"
    return [Check("split", "llm", not split, "; ".join(split) or per_rank),
            Check("precision", "llm", not precision, precision or f"{plan.dtype}, quantization {qa or 'none'}"),
            Check("lengths", "llm", not lengths, "; ".join(lengths) or (
                f"input {plan.max_input_len} (up to {plan.max_frames} frames + {TEXT_TOKENS} text tokens), "
                f"sequence {plan.max_seq_len} of {c.max_positions} positions")),
            Check("prompt table", "llm", not table_msg, table_msg or (
                f"{table} rows = {plan.max_batch} x {plan.tokens_per_frame} x {plan.max_frames}; fake ids "
                f"{plan.vocab_size}..{plan.vocab_size + visual - 1} per request")),
            Check("rope", "llm", not rope, rope or (f"linear scaling factor {c.rope_scaling}" if c.rope_scaling > 1
                                                    else "no scaling"))]


def build_command(plan: Plan, checkpoint_dir: str = "trtllm", output_dir: str = "engine") -> list[str]:
    """The trtllm-build command line (run in the conversion folder). --paged_kv_cache enable is the plugin
    switch of 0.12 (Jetson) and the deprecated, still accepted, spelling of --kv_cache_type paged in 1.x."""
    return ["trtllm-build", "--checkpoint_dir", checkpoint_dir, "--output_dir", output_dir,
            "--max_batch_size", str(plan.max_batch), "--max_input_len", str(plan.max_input_len),
            "--max_seq_len", str(plan.max_seq_len), "--max_num_tokens", str(plan.max_num_tokens),
            "--max_prompt_embedding_table_size", str(plan.max_prompt_embedding_table_size),
            "--gpt_attention_plugin", "auto", "--gemm_plugin", "auto",
            "--remove_input_padding", "enable", "--paged_kv_cache", "enable"]


def visual_tokens_layout(plan: Plan) -> dict:
    """Where the visual tokens go in a prompt, for both TensorRT-LLM flows (recorded next to the checkpoints)."""
    return {"placeholder_id": -200, "first_fake_id": plan.vocab_size, "tokens_per_frame": plan.tokens_per_frame,
            "ids": "the i-th visual token of a prompt has id vocab_size + i and is row i of the table "
                   "(runtime/backends/trtllm.py place_visual_tokens)",
            "order": "frame-major, context token first: row f*tokens_per_frame is frame f's context token, the next "
                     "tokens_per_frame-1 rows are its content tokens",
            "table": "the head stage's frame_tokens [F, tokens_per_frame, H] reshaped to [F*tokens_per_frame, H]",
            "engine_flow": "ModelRunnerCpp/ModelRunner.generate(prompt_table=[1, T, H], prompt_tasks='0')",
            "pytorch_flow": "the same ids with the table as the multimodal embedding [T, H] (hf/ checkpoint; "
                            "docs/DESIGN.md says what the PyTorch backend still needs)"}


# ---- weights and configs ---------------------------------------------------------------------------------------
def _split(t: torch.Tensor, tp: int, rank: int, dim: int | None) -> torch.Tensor:
    return t if dim is None or tp == 1 else t.chunk(tp, dim=dim)[rank]


def fused_qkv(sd: dict, i: int, c, tp: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s attention.qkv.weight [(h + 2 kvh) d / tp, H]: q, k, v each split by rows, then fused; with
    fewer kv heads than ranks each kv head is first repeated tp / kv_heads times."""
    p, d = f"layers.{i}.self_attn.", c.head_dim
    q, k, v = (sd[p + f"{n}_proj.weight"] for n in "qkv")
    if c.kv_heads < tp:
        k, v = (w.view(c.kv_heads, d, -1).repeat_interleave(tp // c.kv_heads, 0).reshape(-1, w.shape[-1])
                for w in (k, v))
    return torch.cat([_split(w, tp, rank, 0) for w in (q, k, v)])


def trtllm_weights(sd: dict, c, tp: int, rank: int, dtype: str) -> dict:
    """The reference LlamaLM state dict -> rank `rank`'s TensorRT-LLM tensors in `dtype`."""
    out = {}
    pad = -c.vocab_size % tp
    for ours, theirs, dim in WEIGHT_MAP:
        for i in (range(c.layers) if "{}" in ours else [None]):
            t = sd[ours.format(i)]
            if ours == "lm_head.weight" and pad:
                t = torch.cat([t, t.new_zeros(pad, t.shape[1])])
            out[theirs.format(i)] = _split(t, tp, rank, dim)
    for i in range(c.layers):
        out[f"transformer.layers.{i}.attention.qkv.weight"] = fused_qkv(sd, i, c, tp, rank)
    to = getattr(torch, dtype)
    return {k: v.detach().to(to).contiguous() for k, v in sorted(out.items())}


def trtllm_config(c, plan: Plan) -> dict:
    """config.json of the legacy TensorRT-LLM checkpoint (the fields LLaMAConfig.from_hugging_face fills)."""
    return {"architecture": "LlamaForCausalLM", "dtype": plan.dtype, "logits_dtype": "float32",
            "vocab_size": c.vocab_size, "max_position_embeddings": c.max_positions, "hidden_size": c.hidden,
            "num_hidden_layers": c.layers, "num_attention_heads": c.heads, "num_key_value_heads": c.kv_heads,
            "head_size": c.head_dim, "intermediate_size": c.ffn, "hidden_act": "silu", "norm_epsilon": c.eps,
            "position_embedding_type": "rope_gpt_neox", "rotary_base": c.rope_theta,
            "rotary_scaling": {"type": "linear", "factor": c.rope_scaling} if c.rope_scaling != 1.0 else None,
            "mlp_bias": False, "attn_bias": False, "tie_word_embeddings": False, "use_parallel_embedding": False,
            "embedding_sharding_dim": 0, "mapping": {"world_size": plan.tp, "tp_size": plan.tp, "pp_size": 1},
            "quantization": {"quant_algo": QUANTS[plan.quant], "kv_cache_quant_algo": None}}


def hf_config(c, dtype: str) -> dict:
    """config.json of an HF LlamaForCausalLM (rope in the keys the released checkpoints use)."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
            "hidden_size": c.hidden, "intermediate_size": c.ffn, "num_hidden_layers": c.layers,
            "num_attention_heads": c.heads, "num_key_value_heads": c.kv_heads, "head_dim": c.head_dim,
            "hidden_act": "silu", "rms_norm_eps": c.eps, "rope_theta": c.rope_theta,
            "rope_scaling": {"type": "linear", "factor": c.rope_scaling} if c.rope_scaling != 1.0 else None,
            "max_position_embeddings": c.max_positions, "attention_bias": False, "mlp_bias": False,
            "tie_word_embeddings": False, "bos_token_id": c.bos_id, "eos_token_id": c.eos_id,
            "pad_token_id": c.pad_id, "torch_dtype": dtype}


def llm_fingerprint(sd: dict) -> str:
    """sha256 over the LLM's tensors (names, shapes, fp32 bytes): which model a conversion came from."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().float().contiguous()
        h.update(f"{k}:{list(t.shape)}\n".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def write_conversion(model, d: Path, plan: Plan) -> list[str]:
    """Write d/trtllm/ and d/hf/ for `model` (a LlamaVid). -> the files written, relative to d."""
    from safetensors.torch import save_file
    c = model.config.llm
    sd = model.llm.state_dict()
    (d / "trtllm").mkdir(parents=True)
    (d / "hf").mkdir()
    for rank in range(plan.tp):
        save_file(trtllm_weights(sd, c, plan.tp, rank, plan.dtype), str(d / f"trtllm/rank{rank}.safetensors"))
    (d / "trtllm/config.json").write_text(json.dumps(trtllm_config(c, plan), indent=2) + "\n")
    to = getattr(torch, plan.dtype)
    hf = {("" if k.startswith("lm_head") else "model.") + k: v.detach().to(to).contiguous() for k, v in sd.items()}
    save_file(hf, str(d / "hf/model.safetensors"), metadata={"format": "pt"})
    (d / "hf/config.json").write_text(json.dumps(hf_config(c, plan.dtype), indent=2) + "\n")
    tok = model.tokenizer.path
    shutil.copyfile(tok, d / "hf" / tok.name)
    (d / "hf/tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer" if tok.suffix == ".model" else "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True, "legacy": True},
        indent=2))
    (d / "hf/generation_config.json").write_text(json.dumps(
        {"bos_token_id": c.bos_id, "eos_token_id": c.eos_id, "pad_token_id": c.pad_id}, indent=2))
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())


# ---- on-disk check: every rank file holds the tensors TensorRT-LLM's LLaMA expects ---------------------------------
def expected_tensors(cfg: dict, rank: int) -> dict:
    """TensorRT-LLM name -> shape of rank `rank`'s tensors, from the checkpoint's config.json."""
    tp, H, d, L = cfg["mapping"]["tp_size"], cfg["hidden_size"], cfg["head_size"], cfg["num_hidden_layers"]
    q, kv = cfg["num_attention_heads"] // tp, max(cfg["num_key_value_heads"] // tp, 1)
    ffn, V = cfg["intermediate_size"] // tp, cfg["vocab_size"]
    out = {"transformer.vocab_embedding.weight": [V, H], "transformer.ln_f.weight": [H],
           "lm_head.weight": [(V + -V % tp) // tp, H]}
    for i in range(L):
        p = f"transformer.layers.{i}."
        out.update({p + "input_layernorm.weight": [H], p + "post_layernorm.weight": [H],
                    p + "attention.qkv.weight": [(q + 2 * kv) * d, H], p + "attention.dense.weight": [H, q * d],
                    p + "mlp.fc.weight": [ffn, H], p + "mlp.gate.weight": [ffn, H], p + "mlp.proj.weight": [H, ffn]})
    return out


def safetensors_header(path: Path) -> dict:
    """name -> {dtype, shape} from a safetensors file's header (no tensor is read)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def check_checkpoint(root: Path) -> list[Check]:
    """root/trtllm: config.json and every rank{r}.safetensors hold the names, shapes and dtype TensorRT-LLM expects."""
    cfg = json.loads((Path(root) / "config.json").read_text())
    want_dtype = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[cfg["dtype"]]
    out = []
    for rank in range(cfg["mapping"]["world_size"]):
        path = Path(root) / f"rank{rank}.safetensors"
        if not path.is_file():
            out.append(Check("checkpoint", "llm", False, f"{path.name}: expected, found no file"))
            continue
        have, want = safetensors_header(path), expected_tensors(cfg, rank)
        problems = [f"missing {sorted(set(want) - set(have))[:3]}"] if set(want) - set(have) else []
        problems += [f"unexpected {sorted(set(have) - set(want))[:3]}"] if set(have) - set(want) else []
        problems += [f"{n}: expected {s} {want_dtype}, found {have[n]['shape']} {have[n]['dtype']}" for n, s in want.items()
                     if n in have and (have[n]["shape"], have[n]["dtype"]) != (s, want_dtype)]
        out.append(Check("checkpoint", "llm", not problems, f"{path.name}: " + ("; ".join(problems[:4]) or
                                                                              f"{len(want)} tensors as expected")))
    return out


# ---- CPU twin: the engine's arithmetic in numpy (float64) -------------------------------------------------------
def weight_only_ints(w: np.ndarray, bits: int) -> np.ndarray:
    """w [out, in] -> the integers trtllm-build stores: per output channel w / (max|w| / 2^(bits-1)), rounded half
    away from zero (C round) and clipped to the signed range."""
    scale = np.abs(w).max(1, keepdims=True) / 2.0 ** (bits - 1)
    x = np.divide(w, scale, out=np.zeros_like(w), where=scale > 0)
    return np.clip(np.sign(x) * np.floor(np.abs(x) + 0.5), -2 ** (bits - 1), 2 ** (bits - 1) - 1)


def weight_only(w: np.ndarray, bits: int, dtype: torch.dtype) -> np.ndarray:
    """What the engine multiplies by: those integers times the per-channel scale, stored in the weight dtype."""
    scale = np.abs(w).max(1, keepdims=True) / 2.0 ** (bits - 1)
    return weight_only_ints(w, bits) * torch.from_numpy(scale).to(dtype).double().numpy()


class NumpyLlama:
    """A legacy TensorRT-LLM LLaMA checkpoint run on CPU the way the engine runs it.

        ids (fake ids >= vocab_size: prompt table rows) -> x [T,H]
        per layer: h = rms(x); x += sum over ranks r of attn_r(h) @ dense_r^T     (all-reduce)
                   h = rms(x); x += sum over ranks of (silu(h fc_r^T) * h gate_r^T) proj_r^T
        logits = concat over ranks of rms(x) lm_head_r^T, padded vocab dropped
    """

    def __init__(self, root: Path):
        from safetensors.torch import load_file
        root = Path(root)
        self.cfg = cfg = json.loads((root / "config.json").read_text())
        self.tp = cfg["mapping"]["tp_size"]
        algo = (cfg.get("quantization") or {}).get("quant_algo")
        self.ranks = []
        for r in range(self.tp):
            w = {}
            for k, t in load_file(str(root / f"rank{r}.safetensors")).items():
                w[k] = t.double().numpy()
                if algo and k.endswith(QUANTIZED):
                    w[k] = weight_only(w[k], QUANT_BITS[algo], t.dtype)
            self.ranks.append(w)

    def embed(self, ids, table=None) -> np.ndarray:
        """ids [T] -> [T,H]: vocabulary rows, prompt table rows for ids >= vocab_size (task 0)."""
        V, emb = self.cfg["vocab_size"], self.ranks[0]["transformer.vocab_embedding.weight"]
        ids = np.asarray(ids)
        x = emb[np.minimum(ids, V - 1)].copy()
        if (ids >= V).any():
            x[ids >= V] = np.asarray(table, np.float64)[ids[ids >= V] - V]
        return x

    def _rope(self, T: int):
        d = self.cfg["head_size"]
        scaling = (self.cfg.get("rotary_scaling") or {}).get("factor", 1.0)
        inv = 1.0 / self.cfg["rotary_base"] ** (np.arange(0, d, 2) / d)
        f = (np.arange(T) / scaling)[:, None] * inv                                    # [T,d/2]
        return np.cos(np.concatenate([f, f], 1)), np.sin(np.concatenate([f, f], 1))

    def _rms(self, x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.cfg["norm_epsilon"]) * w

    def _attention(self, h, w, p, cos, sin):
        """One rank's heads: [T,H] -> its partial attention output [T,H]."""
        T, d = h.shape[0], self.cfg["head_size"]
        qh, kvh = self.cfg["num_attention_heads"] // self.tp, max(self.cfg["num_key_value_heads"] // self.tp, 1)
        qkv = h @ w[p + "attention.qkv.weight"].T
        q, k, v = (qkv[:, a * d:b * d].reshape(T, -1, d).transpose(1, 0, 2)
                   for a, b in ((0, qh), (qh, qh + kvh), (qh + kvh, qh + 2 * kvh)))
        rot = lambda t: t * cos + np.concatenate([-t[..., d // 2:], t[..., :d // 2]], -1) * sin   # noqa: E731
        q, k = rot(q), rot(k)
        k, v = np.repeat(k, qh // kvh, 0), np.repeat(v, qh // kvh, 0)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(d) + np.triu(np.full((T, T), -np.inf), 1)
        a = np.exp(s - s.max(-1, keepdims=True))
        o = (a / a.sum(-1, keepdims=True)) @ v                                          # [qh,T,d]
        return o.transpose(1, 0, 2).reshape(T, -1) @ w[p + "attention.dense.weight"].T

    def forward(self, ids, table=None) -> np.ndarray:
        """ids [T] (fake ids >= vocab_size for the prompt table's rows) -> logits [T, vocab_size] (float64)."""
        x = self.embed(ids, table)
        cos, sin = self._rope(x.shape[0])
        silu = lambda t: t / (1 + np.exp(-t))                                            # noqa: E731
        r0 = self.ranks[0]
        for i in range(self.cfg["num_hidden_layers"]):
            p = f"transformer.layers.{i}."
            h = self._rms(x, r0[p + "input_layernorm.weight"])
            x = x + sum(self._attention(h, w, p, cos, sin) for w in self.ranks)
            h = self._rms(x, r0[p + "post_layernorm.weight"])
            x = x + sum((silu(h @ w[p + "mlp.fc.weight"].T) * (h @ w[p + "mlp.gate.weight"].T))
                        @ w[p + "mlp.proj.weight"].T for w in self.ranks)
        h = self._rms(x, r0["transformer.ln_f.weight"])
        return np.concatenate([h @ w["lm_head.weight"].T for w in self.ranks], 1)[:, :self.cfg["vocab_size"]]



# ---- writing: staged, never over another model's conversion -----------------------------------------------------
SUBDIRS = ("trtllm", "hf", "engine")


def manifest_variant(plan: Plan, prefix: str, files: list[str], built_with: dict | None) -> dict:
    """The llm stage's trtllm variant for a conversion in folder `prefix` (relative to the manifest's root)."""
    p = prefix + "/" if prefix else ""
    return {"file": p + "trtllm/config.json", "backend": "trtllm",
            "precision": PRECISION_NAMES[QUANTS[plan.quant] or plan.dtype], "dtype": plan.dtype, "quant": plan.quant,
            "flow": "engine", "build_dir": prefix or ".", "checkpoint": p + "trtllm", "hf": p + "hf",
            "engine": p + "engine" if built_with else None, "built_with": built_with, "plan": asdict(plan),
            "build_command": build_command(plan), "visual_tokens": visual_tokens_layout(plan),
            "extra_files": [p + f for f in files if f != "trtllm/config.json"],
            "note": "TensorRT-LLM engine flow (<= 1.2.x, v0.12.0-jetson); hf/ is for the PyTorch backend (>= 1.3)"}


def write_staged(model, d: Path, plan: Plan, engine: bool, log=print) -> tuple[list[str], dict | None]:
    """d/trtllm, d/hf and (engine=True: trtllm-build here) d/engine, written in d/.trtllm-staging and moved in
    place only when all of them are: a failure leaves d as it was. -> (files relative to d, built_with or None)."""
    staging = d / ".trtllm-staging"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        write_conversion(model, staging, plan)
        built_with = build_engine(staging, plan, log) if engine else None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for sub in SUBDIRS:
        shutil.rmtree(d / sub, ignore_errors=True)
        if (staging / sub).is_dir():
            (staging / sub).replace(d / sub)
    shutil.rmtree(staging)
    return sorted(str(p.relative_to(d)) for sub in SUBDIRS for p in (d / sub).rglob("*") if p.is_file()), built_with


def _refuse_other_model(out: Path, fingerprint: str, name: str):
    rec = out / RECORD
    if rec.is_file():
        prev = json.loads(rec.read_text()).get("model", {})
        if prev.get("llm_sha256") != fingerprint:
            raise ConvertError(f"{out} holds the TensorRT-LLM conversion of another model ({prev.get('name')!r}, LLM "
                               f"sha256 {str(prev.get('llm_sha256'))[:12]}...), expected {name!r} (sha256 "
                               f"{fingerprint[:12]}...); nothing was written: choose another --out")
    elif any((out / sub).exists() for sub in SUBDIRS):
        raise ConvertError(f"{out}: expected no {'/, '.join(SUBDIRS)}/ folders without {RECORD} (written by python -m "
                           f"export.trtllm), found {sorted(s for s in SUBDIRS if (out / s).exists())}; nothing was "
                           f"written: choose another --out")


def convert(model, out, dtype: str = "float16", tp: int = 1, quant: str = "none", max_batch: int = 1,
            max_frames: int | None = None, max_new_tokens: int | None = None, name: str = "model",
            engine: bool = False, log=print) -> dict:
    """`model` (a LlamaVid) -> out/trtllm, out/hf (and out/engine with engine=True) and out/trtllm_export.json,
    which is written last and returned. Refuses a plan that fails its checks and a folder holding another
    model's conversion, before writing anything."""
    out, c = Path(out), model.config.llm
    plan = make_plan(c, model.config.tokens_per_frame, dtype, tp, quant, max_batch, max_frames, max_new_tokens)
    failed = [ch for ch in check_plan(plan, c) if not ch.ok]
    if failed:
        raise ConvertError(f"TensorRT-LLM plan for {name}: " + "; ".join(f"{ch.name}: {ch.message}" for ch in failed)
                           + "; nothing was written")
    fingerprint = llm_fingerprint(model.llm.state_dict())
    _refuse_other_model(out, fingerprint, name)
    out.mkdir(parents=True, exist_ok=True)
    files, built_with = write_staged(model, out, plan, engine, log)
    record = {"format": FORMAT, "format_version": FORMAT_VERSION,
              "model": {"name": name, "llm_sha256": fingerprint, "llm": asdict(c),
                        "tokens_per_frame": model.config.tokens_per_frame},
              "variant": manifest_variant(plan, "", files, built_with), "files": hash_files(out, files)}
    tmp = out / (RECORD + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(out / RECORD)
    return record


# ---- the engine (TensorRT-LLM + a GPU) ------------------------------------------------------------------------------
def engine_missing() -> str | None:
    """Why trtllm-build cannot build an engine here (TensorRT-LLM or its engine flow, the trtllm-build command
    or a CUDA device missing), or None."""
    from runtime.backends.trtllm import TrtllmLLM
    why = TrtllmLLM.missing()
    if why is None and shutil.which("trtllm-build") is None:
        why = "TensorRT-LLM imports but its trtllm-build command is not on PATH"
    return why


def build_engine(root: Path, plan: Plan, log=print) -> dict:
    """trtllm-build in root: root/trtllm -> root/engine (through root/.engine.tmp; a failure leaves no engine).
    -> built_with: the TensorRT-LLM version and the GPU's SM."""
    from kernels.cuda_available import compute_capability
    from runtime.backends.trtllm import _import_tensorrt_llm
    tmp = root / ".engine.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = build_command(plan, output_dir=tmp.name)
    log(f"[trtllm] {' '.join(cmd)}")
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if proc.returncode != 0 or not (tmp / "config.json").is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-5:]) or "no output"
        raise ConvertError(f"trtllm-build failed (exit {proc.returncode}, no engine written): {tail}")
    shutil.rmtree(root / "engine", ignore_errors=True)
    tmp.replace(root / "engine")
    return {"tensorrt_llm": _import_tensorrt_llm().__version__, "sm": compute_capability()}


def describe(plan: Plan, checks: list[Check]) -> str:
    lines = [f"TensorRT-LLM plan: {plan.dtype}, tp {plan.tp}, quant {plan.quant}; batch {plan.max_batch}, "
             f"{plan.max_frames} frames x {plan.tokens_per_frame} tokens, input {plan.max_input_len}, "
             f"sequence {plan.max_seq_len}, prompt table {plan.max_prompt_embedding_table_size} rows"]
    lines += [f"{'ok  ' if c.ok else 'FAIL'} {c.name:<12} {c.message}" for c in checks]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.trtllm", description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the built-in default model)")
    ap.add_argument("--out", required=True, help="output folder: trtllm/, hf/, trtllm_export.json (and engine/)")
    ap.add_argument("--dtype", choices=DTYPES, default="float16")
    ap.add_argument("--tp", type=int, choices=TP_SIZES, default=1, help="tensor-parallel ranks")
    ap.add_argument("--quant", choices=tuple(QUANTS), default="none", help="weight-only quantization")
    ap.add_argument("--max-batch", type=int, default=1)
    ap.add_argument("--max-frames", type=int, default=None, help="default: as many as fit the context")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: min(512, context / 4)")
    a = ap.parse_args(argv)
    import llamavid_ref
    from llamavid_ref.checkpoint import CheckpointError
    why = engine_missing()
    try:
        model = llamavid_ref.load(a.checkpoint)
        name = Path(a.checkpoint).resolve().name if a.checkpoint else "llamavid-default"
        record = convert(model, a.out, a.dtype, a.tp, a.quant, a.max_batch, a.max_frames, a.max_new_tokens, name,
                         engine=why is None)
    except (ConvertError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    v = record["variant"]
    plan = Plan(**v["plan"])
    print(describe(plan, check_plan(plan, model.config.llm) + check_checkpoint(Path(a.out) / "trtllm")))
    print(f"wrote {a.out}/trtllm ({plan.tp} rank file(s)), {a.out}/hf, {a.out}/{RECORD}")
    if v["engine"]:
        print(f"built {a.out}/engine with TensorRT-LLM {v['built_with']['tensorrt_llm']}")
    else:
        print(f"engine: not built here ({why}); on a machine with TensorRT-LLM and a GPU: "
              f"cd {a.out} && {' '.join(v['build_command'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
