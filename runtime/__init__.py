"""The LLaMA-VID runtime: a C core (runtime/csrc, llamavid.h) with its CPython extension, and this thin Python
layer over it; no torch.

    from runtime import Pipeline
    p = Pipeline.open("artifacts/llamavid-default")      # manifest.json checked, stages opened
    p.ask("clip.mp4", "What happens?")                    # one-shot
    s = p.stream(); s.push(frame, t); s.ask("...")        # live: a warm KV cache

python -m runtime.chat, runtime.stream, runtime.bench; backends/ run one stage on named buffers.
"""


def __getattr__(name):                      # Pipeline and Stream load on first use (onnxruntime, the extension)
    if name == "Pipeline":
        from .pipeline import Pipeline
        return Pipeline
    if name == "Stream":
        from .stream import Stream
        return Stream
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
