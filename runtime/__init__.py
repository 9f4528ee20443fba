"""runtime stage of llamavid-deploy: Pipeline.open(artifacts).ask(media, question) over ONNX Runtime
(python -m runtime.chat, python -m runtime.bench); backends/ run one stage on named numpy buffers."""
