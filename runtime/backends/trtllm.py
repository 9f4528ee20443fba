"""TensorRT-LLM backend for the LLM stage: a TensorRT-LLM engine fed with a prompt table (the legacy engine
flow of TensorRT-LLM <= 1.2.x and of the Jetson branch v0.12.0-jetson; docs/DESIGN.md says which version runs
which flow).

    text ids [.., -200, ..] + visual tokens [T,H] --place_visual_tokens--> ids [.., V, V+1, .., V+T-1, ..]
                                                                           + prompt table [T,H]  (V = vocab size)
    TrtllmLLM.open(root, variant, llm)      ModelRunnerCpp (ModelRunner where the C++ runner is missing) on
                                            root/variant["engine"] (built by export/trtllm.py)
    llm.generate(ids, table, max_new_tokens, stop_ids, sampling) -> new token ids, streamed one by one

The engine looks up every id >= V in the prompt table (row id - V) instead of its vocabulary embedding, so
the visual tokens reach the LLM exactly where the reference's embedding assembly puts them: frame-major, the
context token first in each frame. Importable anywhere: tensorrt_llm (which needs torch) is imported only
inside functions.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

IMAGE_TOKEN_ID = -200
INSTALL_TRTLLM = ("get TensorRT-LLM with its engine flow: the v0.12.0-jetson branch on JetPack 6 (AGX Orin), "
                  "`pip install tensorrt_llm==1.2.*` from NVIDIA's package index, or an NGC TensorRT-LLM / Triton "
                  "container of release <= 1.2.x")


class TrtllmUnavailable(RuntimeError):
    """TensorRT-LLM (with its engine flow), a CUDA device or the engine is missing; the message says which."""


def place_visual_tokens(ids: list[int], visual, vocab_size: int,
                        image_id: int = IMAGE_TOKEN_ID) -> tuple[list[int], np.ndarray]:
    """Text ids with image placeholders -> (ids with fake ids, prompt table [T,H]).

    visual: the visual tokens of the one placeholder, [T,H], or a list with one [Tk,H] block per placeholder
    (in prompt order). Each placeholder is replaced by its block's fake ids; the i-th visual token of the
    prompt gets id vocab_size + i and is row i of the table, so the table is the blocks concatenated."""
    blocks = [] if visual is None else [visual] if isinstance(visual, np.ndarray) else list(visual)
    placeholders = sum(t == image_id for t in ids)
    if placeholders != len(blocks):
        raise ValueError(f"prompt assembly: expected one block of visual tokens per {image_id} placeholder; found "
                         f"{placeholders} placeholders and {len(blocks)} blocks")
    bad = [t for t in ids if t != image_id and not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt assembly: expected text ids in [0, {vocab_size}) and {image_id} placeholders, "
                         f"found {bad[:5]}")
    sizes, out, next_id = iter(len(b) for b in blocks), [], vocab_size
    for t in ids:
        if t == image_id:
            size = next(sizes)
            out.extend(range(next_id, next_id + size))
            next_id += size
        else:
            out.append(int(t))
    table = np.concatenate([np.asarray(b, np.float32) for b in blocks]) if blocks else np.zeros((0, 0), np.float32)
    return out, table


def trtllm_variant(manifest: dict) -> dict:
    """The llm stage's TensorRT-LLM variant, or ValueError naming what the stage has instead."""
    variants = manifest["stages"]["llm"]["variants"]
    found = [v for v in variants if v["backend"] == "trtllm"]
    if not found:
        raise ValueError(f"manifest stage llm: expected a variant with backend 'trtllm' (python -m export.build "
                         f"--target tensorrt writes it), found backends {sorted({v['backend'] for v in variants})}")
    return found[0]


def _import_tensorrt_llm():
    try:
        import tensorrt_llm
    except ModuleNotFoundError:
        raise TrtllmUnavailable(f"TensorRT-LLM: expected the Python package tensorrt_llm, found none; "
                                f"{INSTALL_TRTLLM}") from None
    except (ImportError, OSError) as e:           # a broken install (libnvinfer, MPI or CUDA libraries missing)
        raise TrtllmUnavailable(f"TensorRT-LLM: `import tensorrt_llm` failed ({e}); {INSTALL_TRTLLM}") from None
    return tensorrt_llm


def _runner_class():
    """ModelRunnerCpp where TensorRT-LLM has its C++ bindings, else ModelRunner; TrtllmUnavailable where the
    engine flow is gone (removed after 1.3.0rc20)."""
    trtllm = _import_tensorrt_llm()
    from tensorrt_llm import runtime
    runner = getattr(runtime, "ModelRunnerCpp", None) or getattr(runtime, "ModelRunner", None)
    if runner is None:
        raise TrtllmUnavailable(f"TensorRT-LLM {getattr(trtllm, '__version__', '?')}: expected the engine runner "
                                f"(ModelRunnerCpp or ModelRunner), found none: the engine flow was removed after "
                                f"1.3.0rc20; {INSTALL_TRTLLM}")
    return runner


def sampling_kwargs(sampling: dict) -> dict:
    """The pipeline's sampling dict (do_sample, temperature, top_p, seed) -> the runner's generate() keywords.
    Greedy is top_k 1; sampling draws from TensorRT-LLM's own seeded sampler (not llamavid_ref/sampling.py's)."""
    if not sampling.get("do_sample") or sampling.get("temperature", 1.0) <= 0:
        return {"top_k": 1, "top_p": 0.0, "temperature": 1.0}
    return {"top_k": 0, "top_p": float(sampling.get("top_p", 0.7)), "temperature": float(sampling["temperature"]),
            "random_seed": int(sampling.get("seed", 0))}


class TrtllmLLM:
    """The LLM stage on a TensorRT-LLM engine (one request at a time, streamed)."""

    def __init__(self, runner, vocab_size: int, max_table_rows: int):
        self.runner, self.vocab_size, self.max_table_rows = runner, vocab_size, max_table_rows

    @staticmethod
    def missing(root: Path | None = None, variant: dict | None = None) -> str | None:
        """Why the backend cannot run here (no TensorRT-LLM or no engine flow in it, no CUDA device, and with a
        manifest variant: no engine built), or None."""
        try:
            _runner_class()
            import torch
            if not torch.cuda.is_available():
                raise TrtllmUnavailable("the trtllm backend needs a CUDA device: torch.cuda.is_available() is False")
        except TrtllmUnavailable as e:
            return str(e)
        if variant is not None:
            if not variant.get("engine"):
                return (f"the manifest's trtllm variant has no engine (the build wrote the checkpoint and the plan "
                        f"only): run `{' '.join(variant['build_command'])}` in {Path(root) / variant['build_dir']} "
                        f"on a machine with TensorRT-LLM and a GPU, or python -m export.build --target tensorrt there")
            engine = Path(root) / variant["engine"]
            if not (engine / "config.json").is_file():
                return f"TensorRT-LLM engine: expected {engine}/config.json (written by trtllm-build), found none"
        return None

    @classmethod
    def open(cls, root: Path, variant: dict, llm_section: dict) -> "TrtllmLLM":
        """variant: the manifest's trtllm variant of the llm stage; llm_section: the manifest's "llm" entry."""
        if variant.get("backend") != "trtllm":
            raise ValueError(f"trtllm backend: expected a variant with backend 'trtllm', found "
                             f"{variant.get('backend')!r}")
        why = cls.missing(root, variant)
        if why:
            raise TrtllmUnavailable(why)
        plan = variant["plan"]
        rank = getattr(_import_tensorrt_llm(), "mpi_rank", lambda: 0)()      # tp > 1: one process per rank (mpirun)
        runner = _runner_class().from_dir(engine_dir=str(Path(root) / variant["engine"]), rank=rank)
        return cls(runner, llm_section["vocab_size"], plan["max_prompt_embedding_table_size"] // plan["max_batch"])

    def generate(self, ids: list[int], prompt_table: np.ndarray | None, max_new_tokens: int, stop_ids: list[int],
                 sampling: dict) -> Iterator[int]:
        """ids: text ids with fake ids vocab_size.. where the visual tokens go (place_visual_tokens);
        prompt_table [T,H] float (None or T = 0: text only). Yields the new token ids as the engine streams
        them and returns after a stop id (yielded) or max_new_tokens."""
        import torch
        V = self.vocab_size
        T = 0 if prompt_table is None else int(prompt_table.shape[0])
        fake = sorted({t for t in ids if t >= V})
        if fake != list(range(V, V + T)):
            raise ValueError(f"trtllm generate: expected fake ids {V}..{V + T - 1} for a prompt table of {T} rows, "
                             f"found {fake[:3]}{'...' if len(fake) > 3 else ''} ({len(fake)} distinct)")
        if T > self.max_table_rows:
            raise ValueError(f"trtllm generate: {T} visual tokens do not fit the engine's prompt table of "
                             f"{self.max_table_rows} rows per request: rebuild the engine with a larger --max-frames")
        table = torch.from_numpy(np.ascontiguousarray(prompt_table, np.float32))[None] if T else None   # [1,T,H]
        outputs = self.runner.generate(
            [torch.tensor(ids, dtype=torch.int32)], prompt_table=table, prompt_tasks="0" if T else None,
            max_new_tokens=max_new_tokens, end_id=stop_ids[0], pad_id=stop_ids[0], streaming=True, return_dict=True,
            output_sequence_lengths=True, **sampling_kwargs(sampling))
        done = len(ids)
        for out in outputs:                    # output_ids [batch, beams, max_seq] (prompt included)
            row, length = out["output_ids"][0][0], int(out["sequence_lengths"][0][0])
            for token in row[done:length].tolist():
                done += 1
                yield int(token)
                if token in stop_ids:
                    return
