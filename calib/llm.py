"""Weight-only int4 / int8 for the LLM decoder: ONNX Runtime's MatMulNBits.

    MatMul(x, W [K,N] fp32)  ->  MatMulNBits(x, W_q, scales; bits, block_size 32, accuracy_level 4)

Every MatMul with a constant weight (q/k/v, o, gate, up, down, lm_head) stores its weight in `bits` bits,
symmetric, one fp32 scale per block of 32 input rows per column; activations stay fp32 between the ops.
Decode reads every weight once per token, so it runs at the speed of the bytes streamed: 4 bits instead of
32. accuracy_level 4 lets ONNX Runtime quantize the activations per block to int8 inside the op and use
the CPU's int8 dot products (VNNI / AMX), which keeps prefill fast too. These are the settings of
onnxruntime-genai's int4 CPU build (docs/BENCHMARKS.md compares the two on the same weights).
No calibration data is needed: weights only.
"""
from __future__ import annotations

from pathlib import Path

import onnx

from export.common import save_model

BLOCK_SIZE = 32
ACCURACY_LEVEL = 4                 # int8 activations inside MatMulNBits (ORT's contrib op documentation)
BITS = (4, 8)


def weight_only(src: Path, dst: Path, bits: int = 4, block_size: int = BLOCK_SIZE) -> Path:
    """src decoder -> dst with MatMulNBits in place of every constant-weight MatMul."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    if bits not in BITS:
        raise ValueError(f"LLM weight bits: expected one of {BITS}, found {bits!r}")
    q = MatMulNBitsQuantizer(onnx.load(str(src)), bits=bits, block_size=block_size, is_symmetric=True,
                             accuracy_level=ACCURACY_LEVEL)
    q.process()
    return save_model(q.model.model, dst)


def describe(bits: int, block_size: int = BLOCK_SIZE) -> str:
    return (f"weight-only int{bits} (MatMulNBits, symmetric, block {block_size}, accuracy_level {ACCURACY_LEVEL}: "
            f"int8 activations inside the op); embeddings, norms and attention fp32")
