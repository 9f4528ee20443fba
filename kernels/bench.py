"""ContextAttention kernel vs the standard ops it replaces, side by side on one GPU.

    python -m kernels.bench [--frames 64,1024,3600] [--patches 256,576] [--dtypes fp16,bf16,fp32]
                            [--repeats 20] [--json PATH]

For each shape (32 queries x 1408 channels, scale 1/sqrt(1408): the released head; 256 / 576
patches: 224 / 336 px) and dtype it times, with CUDA events around each launch after warm-up
launches, the median of --repeats launches of:
    kernel       launchContextAttention, Algorithm::kAuto (tensor cores for fp16 / bf16)
    cuda cores   the same launcher forced onto the CUDA-core kernel (the previous default)
    eager        softmax((q @ p^T).float() * scale).to(dtype) @ p, mean over the queries (PyTorch)
    sdpa         torch.nn.functional.scaled_dot_product_attention, mean over the queries
    trt std      a TensorRT engine of the standard ops (only where `tensorrt` imports)
Inputs are random normal, several copies rotated when one fits in L2. The device's ceilings are
measured in the same run: memory bandwidth (a device-to-device copy, bytes read + written) and the
matrix rate (an 8192^3 matmul per dtype; fp32 without TF32). Reported per shape: the kernel's
GB/s (queries + patches read, context written) and TFLOP/s (4 F Q N C: the two matmuls of the
standard form) against those ceilings, its speed over eager and over the fastest standard op,
and its largest difference from eager (fp32 math) over max|patches|.

Without a CUDA device (or without torch) it says so and exits 0: nothing to measure.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

QUERIES, CHANNELS = 32, 1408
DTYPE_CODES = {"fp32": 0, "fp16": 1, "bf16": 2}   # contextAttentionCudaTest.cu
AUTO, CUDA_CORES, TENSOR_CORES = 0, 1, 2
ALGORITHMS = {CUDA_CORES: "cuda cores", TENSOR_CORES: "tensor cores"}
L2_ROTATE_BYTES = 256 << 20                         # rotate input copies until this much is touched


def no_gpu_reason() -> str | None:
    """Why nothing can be measured here, or None."""
    from kernels.cuda_available import cuda_available
    ok, reason = cuda_available()
    if not ok:
        return reason
    try:
        import torch
    except ImportError:
        return "torch is not installed (the standard-op side of the comparison needs it)"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device (a CPU-only torch build?)"
    return None


# ---- timing --------------------------------------------------------------------------------------
def time_launches(fn, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of `repeats` launches of fn(i), each between two CUDA events."""
    import torch
    for i in range(warmup):
        fn(i)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for i, (start, end) in enumerate(events):
        start.record()
        fn(i)
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def device_ceilings(repeats: int) -> dict:
    """Memory bandwidth (GB/s, copy read + write) and matmul TFLOP/s per dtype, measured here."""
    import torch
    n = 1 << 30                                                    # 1 GiB each way
    src, dst = torch.empty(n, dtype=torch.uint8, device="cuda"), torch.empty(n, dtype=torch.uint8, device="cuda")
    src.random_(0, 255)
    copy_ms = time_launches(lambda i: dst.copy_(src), repeats)
    out = {"memory_GBps": 2 * n / copy_ms / 1e6}
    torch.backends.cuda.matmul.allow_tf32 = False
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
        b = torch.randn(8192, 8192, device="cuda", dtype=dtype)
        ms = time_launches(lambda i: a @ b, max(5, repeats // 2))
        out[f"matmul_{name}_TFLOPs"] = 2 * 8192**3 / ms / 1e9
    return out


# ---- the paths ------------------------------------------------------------------------------------
class Kernel:
    """The launcher through libcontext_attention_cuda_test.so (built for this device)."""

    def __init__(self, library: Path):
        import ctypes
        lib = ctypes.CDLL(str(library))
        ptr, i32 = ctypes.c_void_p, ctypes.c_int
        lib.ca_cuda_launch.argtypes = [i32, ptr, ptr, ptr, ctypes.c_int64, i32, i32, i32, ctypes.c_float, i32, ptr, ptr]
        lib.ca_cuda_auto_algorithm.argtypes = [i32, ptr, ptr, i32, i32]
        lib.ca_cuda_workspace_bytes.argtypes = [ctypes.c_int64, i32]
        lib.ca_cuda_workspace_bytes.restype = ctypes.c_uint64
        self.lib = lib
        self.workspace = None

    def launch(self, dtype: str, q, p, out, scale: float, algorithm: int) -> None:
        """With the launcher's optional workspace (a TensorRT engine gives the plugin one too)."""
        import torch
        frames, nq, channels = q.shape
        size = self.lib.ca_cuda_workspace_bytes(frames, channels)
        if self.workspace is None or self.workspace.numel() < size:
            self.workspace = torch.empty(size, dtype=torch.uint8, device="cuda")
        status = self.lib.ca_cuda_launch(DTYPE_CODES[dtype], q.data_ptr(), p.data_ptr(), out.data_ptr(), frames, nq,
                                         p.shape[1], channels, scale, algorithm, self.workspace.data_ptr(),
                                         torch.cuda.current_stream().cuda_stream)
        if status != 0:
            raise RuntimeError(f"launchContextAttention failed with cudaError {status} for q {list(q.shape)}, "
                               f"p {list(p.shape)} {dtype}, algorithm {algorithm}")

    def auto_algorithm(self, dtype: str, q, p) -> int:
        return self.lib.ca_cuda_auto_algorithm(DTYPE_CODES[dtype], q.data_ptr(), p.data_ptr(), q.shape[1], q.shape[2])


def eager(q, p, scale: float):
    """The standard-op form (the issue's baseline): scores in fp32 for the softmax, as PyTorch users write it."""
    import torch
    return (torch.softmax((q @ p.transpose(-1, -2)).float() * scale, -1).to(q.dtype) @ p).mean(1, keepdim=True)


def sdpa(q, p, scale: float):
    import torch.nn.functional as F
    return F.scaled_dot_product_attention(q[:, None], p[:, None], p[:, None], scale=scale)[:, 0].mean(1, keepdim=True)


def standard_op_graph(frames: int, patches: int, dtype: str, scale: float):
    """ONNX graph of the standard-op form for one static shape: what TensorRT builds without the
    plugin (the scores cast to fp32 for the softmax, like eager)."""
    from onnx import TensorProto, helper
    onnx_type = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}[dtype]
    nodes = [helper.make_node("Transpose", ["patches"], ["patches_t"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["queries", "patches_t"], ["scores"]),                  # [F,Q,N]
             helper.make_node("Cast", ["scores"], ["scores32"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["scores32", "scale"], ["scaled"]),
             helper.make_node("Softmax", ["scaled"], ["weights32"], axis=-1),
             helper.make_node("Cast", ["weights32"], ["weights"], to=onnx_type),
             helper.make_node("MatMul", ["weights", "patches"], ["per_query"]),               # [F,Q,C]
             helper.make_node("ReduceMean", ["per_query", "axes"], ["context"], keepdims=1)]  # [F,1,C]
    graph = helper.make_graph(
        nodes, "context_attention_standard_ops",
        [helper.make_tensor_value_info("queries", onnx_type, [frames, QUERIES, CHANNELS]),
         helper.make_tensor_value_info("patches", onnx_type, [frames, patches, CHANNELS])],
        [helper.make_tensor_value_info("context", onnx_type, [frames, 1, CHANNELS])],
        [helper.make_tensor("scale", TensorProto.FLOAT, [], [scale]),
         helper.make_tensor("axes", TensorProto.INT64, [1], [1])])
    # IR 9: what ONNX Runtime and TensorRT 10's parser read
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def tensorrt_standard_engine(frames: int, patches: int, dtype: str, scale: float):
    """A callable (queries, patches, context) running a TensorRT engine of standard_op_graph, or
    None where TensorRT is not installed. Never run in this project's CI (no TensorRT there)."""
    try:
        import tensorrt as trt
    except ImportError:
        return None
    import torch
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(standard_op_graph(frames, patches, dtype, scale).SerializeToString()):
        raise RuntimeError("TensorRT could not parse the standard-op graph: "
                           + " | ".join(str(parser.get_error(i)) for i in range(parser.num_errors)))
    plan = builder.build_serialized_network(network, builder.create_builder_config())
    if plan is None:
        raise RuntimeError("TensorRT built no engine for the standard-op graph (its log says why)")
    context = trt.Runtime(logger).deserialize_cuda_engine(plan).create_execution_context()

    def run(q, p, out):
        for name, t in (("queries", q), ("patches", p), ("context", out)):
            context.set_tensor_address(name, t.data_ptr())
        context.execute_async_v3(torch.cuda.current_stream().cuda_stream)
    return run


# ---- one shape -----------------------------------------------------------------------------------
def measure(kernel: Kernel, frames: int, patches: int, dtype: str, repeats: int, ceilings: dict) -> dict:
    import torch
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    scale = CHANNELS ** -0.5
    size = torch_dtype.itemsize
    nbytes = frames * (QUERIES + patches + 1) * CHANNELS * size
    copies = max(1, min(4, math.ceil(L2_ROTATE_BYTES / nbytes)))
    gen = torch.Generator(device="cuda").manual_seed(frames * 7 + patches)
    sets = [(torch.randn(frames, QUERIES, CHANNELS, device="cuda", generator=gen).to(torch_dtype),
             torch.randn(frames, patches, CHANNELS, device="cuda", generator=gen).to(torch_dtype),
             torch.full((frames, 1, CHANNELS), float("nan"), device="cuda", dtype=torch_dtype)) for _ in range(copies)]
    flops = 4.0 * frames * QUERIES * patches * CHANNELS
    row = {"frames": frames, "patches": patches, "dtype": dtype, "queries": QUERIES, "channels": CHANNELS,
           "bytes": nbytes, "flops": flops, "input_copies": copies}
    q0, p0, out0 = sets[0]
    row["algorithm"] = ALGORITHMS[kernel.auto_algorithm(dtype, q0, p0)]
    row["kernel_ms"] = time_launches(lambda i: kernel.launch(dtype, *sets[i % copies], scale, AUTO), repeats)
    reference = eager(q0.float(), p0.float(), scale)
    row["max_diff_vs_eager_fp32"] = float((out0.float() - reference).abs().max() / p0.float().abs().max())
    if row["algorithm"] != ALGORITHMS[CUDA_CORES]:
        row["cuda_cores_ms"] = time_launches(lambda i: kernel.launch(dtype, *sets[i % copies], scale, CUDA_CORES),
                                             repeats)
    row["eager_ms"] = time_launches(lambda i: eager(*sets[i % copies][:2], scale), repeats)
    try:
        row["sdpa_ms"] = time_launches(lambda i: sdpa(*sets[i % copies][:2], scale), repeats)
    except RuntimeError as error:               # no SDPA backend for this head size / dtype
        row["sdpa_error"] = str(error).splitlines()[0][:200]
    try:
        engine = tensorrt_standard_engine(frames, patches, dtype, scale)
        if engine is not None:
            row["trt_standard_ms"] = time_launches(lambda i: engine(*sets[i % copies]), repeats)
    except Exception as error:                  # report, keep measuring the rest
        row["trt_standard_error"] = f"{type(error).__name__}: {str(error)[:200]}"
    standard = {k: row[k] for k in ("eager_ms", "sdpa_ms", "trt_standard_ms") if k in row}
    best = min(standard, key=standard.get)
    row.update(best_standard=best.removesuffix("_ms"), speedup_vs_eager=row["eager_ms"] / row["kernel_ms"],
               speedup_vs_best_standard=standard[best] / row["kernel_ms"],
               kernel_GBps=nbytes / row["kernel_ms"] / 1e6, kernel_TFLOPs=flops / row["kernel_ms"] / 1e9)
    row["kernel_memory_fraction"] = row["kernel_GBps"] / ceilings["memory_GBps"]
    row["kernel_matmul_fraction"] = row["kernel_TFLOPs"] / ceilings[f"matmul_{dtype}_TFLOPs"]
    del sets
    torch.cuda.empty_cache()
    return row


def table(rows: list[dict]) -> str:
    head = ("| frames | patches | dtype | kernel | kernel ms | CUDA-core ms | eager ms | sdpa ms | TRT std ms "
            "| vs eager | vs best std | GB/s (% BW) | TFLOP/s (% matmul) | max diff |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def ms(row, key):
        return f"{row[key]:.3f}" if key in row else "n/a"
    for r in rows:
        lines.append(f"| {r['frames']} | {r['patches']} | {r['dtype']} | {r['algorithm']} | {r['kernel_ms']:.3f} "
                     f"| {ms(r, 'cuda_cores_ms')} | {ms(r, 'eager_ms')} | {ms(r, 'sdpa_ms')} "
                     f"| {ms(r, 'trt_standard_ms')} "
                     f"| {r['speedup_vs_eager']:.2f}x | {r['speedup_vs_best_standard']:.2f}x ({r['best_standard']}) "
                     f"| {r['kernel_GBps']:.0f} ({100 * r['kernel_memory_fraction']:.0f}%) "
                     f"| {r['kernel_TFLOPs']:.1f} ({100 * r['kernel_matmul_fraction']:.0f}%) "
                     f"| {r['max_diff_vs_eager_fp32']:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.splitlines()[0])
    ints = lambda text: [int(x) for x in text.split(",") if x.strip()]          # noqa: E731
    ap.add_argument("--frames", type=ints, default=[64, 1024, 3600])
    ap.add_argument("--patches", type=ints, default=[256, 576])
    ap.add_argument("--dtypes", type=lambda t: [x.strip() for x in t.split(",") if x.strip()],
                    default=["fp16", "bf16", "fp32"])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--library", type=Path, default=None, help="a built libcontext_attention_cuda_test.so")
    ap.add_argument("--json", type=Path, default=None, help="write the device, ceilings and rows here")
    a = ap.parse_args(argv)
    unknown = [d for d in a.dtypes if d not in DTYPE_CODES]
    if unknown:
        print(f"error: --dtypes: expected some of {sorted(DTYPE_CODES)}, found {unknown}", file=sys.stderr)
        return 2
    reason = no_gpu_reason()
    if reason:
        print(f"kernels.bench: no GPU to measure on ({reason}); nothing measured.")
        return 0
    import torch
    from kernels import build
    from kernels.cuda_available import compute_capability
    sm = compute_capability()
    kernel = Kernel(a.library or build.build_cuda_test(Path(tempfile.mkdtemp(prefix="ca_bench_")), archs=[sm]))
    device = torch.cuda.get_device_name()
    processors = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"device: {device} (sm_{sm}, {processors} SMs), torch {torch.__version__}, CUDA {torch.version.cuda}",
          flush=True)
    ceilings = device_ceilings(a.repeats)
    print("ceilings: " + ", ".join(f"{k} {v:.0f}" for k, v in ceilings.items()), flush=True)
    rows = []
    for dtype in a.dtypes:
        for patches in a.patches:
            for frames in a.frames:
                rows.append(measure(kernel, frames, patches, dtype, a.repeats, ceilings))
                r = rows[-1]
                print(f"  {frames:5d} x {patches} {dtype}: kernel {r['kernel_ms']:.3f} ms ({r['algorithm']}), "
                      f"eager {r['eager_ms']:.3f} ms, {r['speedup_vs_eager']:.2f}x", flush=True)
    print(table(rows))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        command = "python -m kernels.bench " + " ".join(sys.argv[1:] if argv is None else argv)
        a.json.write_text(json.dumps({"device": device, "command": command, "date": time.strftime("%Y-%m-%d"),
                                      "torch": torch.__version__, "ceilings": ceilings, "rows": rows}, indent=1))
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
