"""The C core's decode loop against the Python loop it replaced and against ONNX Runtime alone, side by side
(python -m runtime.bench --artifacts DIR --core, or --released-shapes --part core for the 7B LLM's shapes).

    core       Session.next(): the C core samples, embeds the token and calls the llm stage (ORT through the
               extension's python backend: cached IO bindings on the core's buffers)
    python     the per-token loop of the Python pipeline before the C core: the embedding row copied into a
               step buffer, every tensor bound anew, the arg max (numpy here: it took torch's, a little slower)
    ort alone  run_with_iobinding on one binding, only the attention mask rebound per token: the floor any
               runtime on this graph pays

Each round runs every system once (alternating, same machine state); figures are medians over rounds. The
core's own clock splits its time into stage calls and the rest; "outside ORT" is 1 - ort alone / core.
"""
from __future__ import annotations

import statistics
import time

import numpy as np

from . import _llamavid


def _prompt_rows(pipe, prompt_len: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((prompt_len, pipe.info["hidden"])).astype(np.float32) * 0.1


def core_decode(pipe, prompt_len: int, steps: int) -> dict:
    """Seconds for `steps` greedy tokens through Session.next (no stop token), and the core's split."""
    sampler = _llamavid.Sampler(pipe.info["vocab_size"])
    with pipe.session(prompt_len + steps + 2) as s:
        s.set_stop([])
        s.prompt(np.asarray([pipe.image_id], np.int32), embeds=_prompt_rows(pipe, prompt_len))
        s.next(sampler)
        before = s.stats()
        t = time.perf_counter()
        for _ in range(steps):
            s.next(sampler)
        seconds = time.perf_counter() - t
        after = s.stats()
    api = after["api_seconds"] - before["api_seconds"]
    stage = sum(after["stage_seconds"]) - sum(before["stage_seconds"])
    return {"seconds": seconds, "api_seconds": api, "stage_seconds": stage}


def python_decode(pipe, prompt_len: int, steps: int) -> dict:
    """The pre-core Python pipeline's decode loop on the same llm stage (shared KV layout)."""
    m, llm = pipe.manifest["llm"], pipe.stages["llm"]
    cap, H, V = prompt_len + steps + 2, pipe.info["hidden"], pipe.info["vocab_size"]
    kv = [np.zeros((1, m["kv_heads"], cap, m["head_dim"]), np.float32) for _ in m["past_names"]]
    mask, logits = np.ones((1, cap), np.int64), np.empty((1, 1, V), np.float32)
    table = np.load(pipe.root / m["embeddings"], mmap_mode="r")

    def run(embeds, total):
        feeds = {"inputs_embeds": embeds, "attention_mask": mask[:, :total], **dict(zip(m["past_names"], kv))}
        return llm.infer(feeds, {"logits": logits, **dict(zip(m["present_names"], kv))})["logits"]

    out = run(_prompt_rows(pipe, prompt_len)[None], prompt_len)
    step = np.empty((1, 1, H), np.float32)
    t = time.perf_counter()
    for i in range(steps):
        step[0, 0] = table[int(out[0, -1].argmax())]
        out = run(step, prompt_len + i + 1)
    return {"seconds": time.perf_counter() - t}


def ort_decode(pipe, prompt_len: int, steps: int) -> dict:
    """ONNX Runtime alone: one binding, the mask rebound per token, the same step input every time."""
    m, session = pipe.manifest["llm"], pipe.stages["llm"].session
    cap, V = prompt_len + steps + 2, pipe.info["vocab_size"]
    kv = [np.zeros((1, m["kv_heads"], cap, m["head_dim"]), np.float32) for _ in m["past_names"]]
    mask, logits = np.ones((1, cap), np.int64), np.empty((1, 1, V), np.float32)
    step = _prompt_rows(pipe, 1)[None]
    b = session.io_binding()
    for name, a in [("inputs_embeds", step), *zip(m["past_names"], kv)]:
        b.bind_input(name, "cpu", 0, a.dtype, a.shape, a.ctypes.data)
    for name, a in [("logits", logits), *zip(m["present_names"], kv)]:
        b.bind_output(name, "cpu", 0, a.dtype, a.shape, a.ctypes.data)
    t = time.perf_counter()
    for i in range(steps):
        b.bind_input("attention_mask", "cpu", 0, np.int64, (1, prompt_len + i + 1), mask.ctypes.data)
        session.run_with_iobinding(b)
    return {"seconds": time.perf_counter() - t}


SYSTEMS = {"core": core_decode, "python": python_decode, "ort alone": ort_decode}


def bench_core(pipe, prompt_len: int = 64, steps: int = 64, rounds: int = 7) -> dict:
    if pipe.manifest["llm"]["kv_layout"] != "shared":
        raise ValueError("bench --core: expected the fused decoder (kv_layout shared), found "
                         f"{pipe.manifest['llm']['kv_layout']!r}")
    runs = {k: [] for k in SYSTEMS}
    for fn in SYSTEMS.values():                   # warm-up
        fn(pipe, prompt_len, 4)
    for _ in range(rounds):
        for k, fn in SYSTEMS.items():
            runs[k].append(fn(pipe, prompt_len, steps))
    med = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
    core = runs["core"]
    return {
        "prompt_len": prompt_len, "steps": steps, "rounds": rounds, "stages": pipe.describe(),
        "tok_s": {k: steps / v for k, v in med.items()},
        "core_vs_python": statistics.median(p["seconds"] / c["seconds"] for c, p in zip(core, runs["python"])),
        "core_outside_stages": statistics.median(1 - c["stage_seconds"] / c["api_seconds"] for c in core),
        "core_outside_ort": statistics.median(1 - o["seconds"] / c["seconds"] for c, o in zip(core, runs["ort alone"])),
        "us_per_token_outside_ort": statistics.median((c["seconds"] - o["seconds"]) / steps * 1e6
                                                      for c, o in zip(core, runs["ort alone"])),
    }


def report_core(r: dict) -> str:
    t = r["tok_s"]
    return "\n".join([
        f"decode, {r['steps']} tokens after {r['prompt_len']} positions, medians of {r['rounds']} alternating rounds "
        f"({r['stages']})", "",
        "| system | tokens/s |", "|---|---|", *[f"| {k} | {v:.1f} |" for k, v in t.items()], "",
        f"core vs the Python loop (per-round ratio, median): {r['core_vs_python']:.2f}x",
        f"core time outside stage calls (the core's clock): {100 * r['core_outside_stages']:.2f}%",
        f"core time outside ONNX Runtime (vs ort alone): {100 * r['core_outside_ort']:.2f}% "
        f"({r['us_per_token_outside_ort']:.1f} us per token)"])
