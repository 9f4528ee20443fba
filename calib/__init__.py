"""calib: int8 for the vision and head stages, calibrated on clips, and weight-only int4/int8 for the LLM.

    data.py    clips + questions -> batches {input name: array}, frames sampled as the runtime samples them
    ranges.py  batches through the fp32 graphs -> amax per tensor (minmax | entropy | percentile)
    qdq.py     fp32 graph + ranges -> Q/DQ graph (int8 linears; norms, softmax, attention fp32) that ONNX Runtime
               and TensorRT's explicit quantization both run
    llm.py     decoder -> MatMulNBits (weight-only int4 / int8)
    stages.py  what python -m export.build --precision int8 calls per stage (files + manifest variants,
               TensorRT calibration caches written from the same ranges by export/trt.py's writer)
    python -m calib --artifacts DIR --data DATA    per-stage ranges and int8 errors, for inspection

Layers: calib imports export and llamavid_ref (and the torch-free runtime.media / runtime.manifest); export
imports calib only inside its int8 path.
"""
