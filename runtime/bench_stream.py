"""Streams measured (python -m runtime.bench --artifacts DIR --stream [--data WORLD --split val|test]):

    accuracy   the synthetic world's clips answered one-shot and as streams (frames pushed one by one, then the
               question): warm tier only, and warm + focus over the last K frames (replacing or following their
               warm copies), per question type; the ingest instruction's candidates too (choose on val)
    ttft       time to the first answer token after 60 and after 3,600 pushed frames, alternating rounds
    ingest     frames/s of decode + resize + vision + head + KV append on one thread, from a video file
    soak       10,000 frames: resident memory after warm-up and at the end; KV bytes against what the window
               holds (positions x bytes per position)
    memory     bytes per hour of video at 1 fps (2 tokens a frame) for this model and the released 7B
"""
from __future__ import annotations

import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from . import media

FOCUS_CONFIGS = {"warm only": dict(focus_frames=0), "warm + focus 2": dict(focus_frames=2),
                 "warm + focus 4": dict(focus_frames=4), "warm + focus 8": dict(focus_frames=8),
                 "warm + focus 8 (after warm)": dict(focus_frames=8, focus_replace=False)}
INGESTS = ["what is happening in this video ?", "describe the video .", "what shapes are there ?", ""]  # on val


def _entries(data: Path, split: str, limit: int | None):
    import json
    entries = json.loads((Path(data) / f"{split}.json").read_text())[:limit]
    return [(e.get("qtype", "all"), e["conversations"][0]["value"].replace("<image>", "").strip(),
             e["conversations"][1]["value"], Path(data) / e["video"]) for e in entries]


def accuracy(pipe, data: Path, normalise, split: str = "val", limit: int | None = None, configs=None,
             ingests=None) -> dict:
    """{config: {"overall", "per_type", "same_as_one_shot"}}; configs: name -> Pipeline.stream options;
    normalise(answer) -> the form answers are compared in (the evaluation's, llamavid_ref.evaluate.normalise)."""
    p = pipe.manifest["preprocess"]
    configs = dict(configs or FOCUS_CONFIGS)
    for ingest in ingests or []:
        configs[f"warm only, ingest {ingest!r}"] = dict(focus_frames=0, ingest=ingest)
    hits, counts, same = defaultdict(lambda: defaultdict(int)), defaultdict(int), defaultdict(int)
    for qtype, question, gold, path in _entries(data, split, limit):
        px, ts = media.load_video(path, p["image_size"], p["mean"], p["std"], p["video_fps"])
        answers = {"one-shot": pipe.ask(px, question, max_new_tokens=8)}
        for name, options in configs.items():
            s = pipe.stream(**options)
            for f, t in zip(px, ts):
                s.push(f, t)
            answers[name] = s.answer(question, 8)
            s.close()
        counts[qtype] += 1
        for name, a in answers.items():
            hits[name][qtype] += normalise(a) == normalise(gold)
            same[name] += a == answers["one-shot"]
    n = sum(counts.values())
    return {name: {"overall": sum(h.values()) / n, "per_type": {q: h[q] / counts[q] for q in sorted(counts)},
                   "same_as_one_shot": same[name] / n} for name, h in hits.items()} | {"n_per_type": dict(counts)}


def report_accuracy(r: dict) -> str:
    types = sorted(r["n_per_type"])
    rows = [f"| {name} | " + " | ".join(f"{100 * v['per_type'][q]:.1f}" for q in types) +
            f" | **{100 * v['overall']:.1f}** | {100 * v['same_as_one_shot']:.1f} |"
            for name, v in r.items() if name != "n_per_type"]
    header = " | ".join(f"{q} ({r['n_per_type'][q]})" for q in types)
    return "\n".join([f"| system | {header} | overall % | same answer as one-shot % |",
                      "|" + "---|" * (len(types) + 3), *rows])


def _frames(pipe, n: int, seed: int = 0) -> np.ndarray:
    S = pipe.manifest["preprocess"]["image_size"]
    return np.random.default_rng(seed).standard_normal((n, 3, S, S)).astype(np.float32)


def ttft(pipe, counts=(60, 3600), rounds: int = 7, question: str = "How many shapes are there?", **options) -> dict:
    """Median seconds to the first answer token after each count of pushed frames (streams filled first, then
    questions asked in alternating rounds)."""
    frames = _frames(pipe, 256)
    streams = {}
    for n in counts:
        s = pipe.stream(**options)
        for i in range(n):
            s.push(frames[i % len(frames)], float(i))
        s.flush()
        streams[n] = s
    times = {n: [] for n in counts}
    for _ in range(rounds + 1):                      # the first round warms up
        for n, s in streams.items():
            t = time.perf_counter()
            answer = s.ask(question, 4)
            next(answer, None)
            times[n].append(time.perf_counter() - t)
            list(answer)
    out = {n: statistics.median(v[1:]) for n, v in times.items()}
    info = {n: s.info() for n, s in streams.items()}
    return {"ttft_s": out, "ratio": out[max(counts)] / out[min(counts)], "held": {n: i["frames_held"] for n, i in info.items()},
            "position": {n: i["position"] for n, i in info.items()}}


def ingest_rate(pipe, write_video, frames: int = 2000, size: int | None = None) -> dict:
    """frames/s of decode + resize + vision + head + append from a video file (one thread: the pipeline opened
    with threads=1), every frame kept; and the core's split of the time. write_video(path, uint8 [T,H,W,3], fps)
    makes the clip (llamavid_ref.video.write_video: H.264)."""
    S = size or pipe.manifest["preprocess"]["image_size"]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clip.mp4"
        write_video(path, rng.integers(0, 256, (frames, S, S, 3), dtype=np.uint8), fps=30)
        p = pipe.manifest["preprocess"]
        s = pipe.stream()
        t = time.perf_counter()
        for px, ts in media.iter_video(path, p["image_size"], p["mean"], p["std"], fps=1000.0):
            s.push(px, ts)
        s.flush()
        seconds = time.perf_counter() - t
    stats = s.core.stats()
    return {"frames": frames, "source_px": S, "frames_per_s": frames / seconds,
            "vision_s": stats["stage_seconds"][0], "head_s": stats["stage_seconds"][1],
            "llm_s": stats["stage_seconds"][2] + stats["stage_seconds"][3], "total_s": seconds}


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def soak(pipe, frames: int = 10000, warm: int = 1000, ask_every: int = 1000) -> dict:
    s = pipe.stream()
    batch = _frames(pipe, 64, seed=1)
    rss = {}
    for i in range(frames):
        s.push(batch[i % 64], float(i))
        if (i + 1) % ask_every == 0:
            s.answer("How many shapes are there?", 4)
        if i + 1 == warm:
            rss["warm"] = _rss_mib()
    s.flush()
    rss["end"] = _rss_mib()
    info = s.info()
    m = pipe.manifest["llm"]
    per_position = 2 * m["layers"] * m["kv_heads"] * m["head_dim"] * 4
    return {"frames": frames, "rss_mib": rss, "rss_growth": rss["end"] / rss["warm"] - 1, "info": info,
            "kv_over_minimum": info["kv_bytes"] / (info["position"] * per_position)}


def memory_per_hour(manifest: dict) -> dict:
    """KV bytes for an hour at 1 fps (3,600 frames x tokens per frame) at fp32 and fp16, this model and the
    released 7B (32 layers, 32 KV heads of 128)."""
    m = manifest["llm"]
    positions = 3600 * manifest["model"]["tokens_per_frame"]
    out = {}
    for name, (layers, kvh, d) in {"this model": (m["layers"], m["kv_heads"], m["head_dim"]),
                                   "released 7B": (32, 32, 128)}.items():
        per = 2 * layers * kvh * d
        out[name] = {"positions": positions, "fp32_gib": positions * per * 4 / 2 ** 30,
                     "fp16_gib": positions * per * 2 / 2 ** 30}
    return out


def report(r: dict) -> str:
    lines = []
    if "accuracy" in r:
        lines += ["accuracy (" + r["split"] + ")", report_accuracy(r["accuracy"]), ""]
    if "ttft" in r:
        t = r["ttft"]
        lines += ["| frames pushed | frames held | positions | time to first token ms |", "|---|---|---|---|",
                  *[f"| {n} | {t['held'][n]} | {t['position'][n]} | {1e3 * v:.1f} |" for n, v in t["ttft_s"].items()],
                  f"ratio {max(t['ttft_s'])} vs {min(t['ttft_s'])} frames: {t['ratio']:.2f}x", ""]
    if "ingest" in r:
        i = r["ingest"]
        lines += [f"ingest: {i['frames_per_s']:.0f} frames/s ({i['frames']} frames of {i['source_px']} px; vision "
                  f"{i['vision_s']:.2f} s, head {i['head_s']:.2f} s, llm {i['llm_s']:.2f} s of {i['total_s']:.2f} s)", ""]
    if "soak" in r:
        s = r["soak"]
        lines += [f"soak: {s['frames']} frames, RSS {s['rss_mib']['warm']:.0f} MiB after warm-up, "
                  f"{s['rss_mib']['end']:.0f} MiB at the end ({100 * s['rss_growth']:+.1f}%); KV "
                  f"{s['info']['kv_bytes'] / 2 ** 20:.2f} MiB for {s['info']['position']} positions held "
                  f"({s['kv_over_minimum']:.3f}x the minimum)", ""]
    if "memory" in r:
        lines += ["| model | positions per hour at 1 fps | KV fp32 GiB | KV fp16 GiB |", "|---|---|---|---|",
                  *[f"| {k} | {v['positions']} | {v['fp32_gib']:.3f} | {v['fp16_gib']:.3f} |" for k, v in r["memory"].items()]]
    return "\n".join(lines)


def bench_stream(pipe, data=None, split: str = "val", limit=None, parts=("ttft", "ingest", "soak", "memory"),
                 ingests=None, normalise=None, write_video=None) -> dict:
    """normalise, write_video: the evaluation's answer normaliser and a video writer (runtime.bench passes
    llamavid_ref's; runtime/ itself imports neither)."""
    r = {"split": split}
    if data:
        r["accuracy"] = accuracy(pipe, Path(data), normalise, split, limit, ingests=ingests)
    if "ttft" in parts:
        r["ttft"] = ttft(pipe)
    if "ingest" in parts:
        r["ingest"] = ingest_rate(pipe, write_video)
    if "soak" in parts:
        r["soak"] = soak(pipe)
    if "memory" in parts:
        r["memory"] = memory_per_hour(pipe.manifest)
    return r
