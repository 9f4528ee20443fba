#!/usr/bin/env bash
# The GPU checks of the ContextAttention work in one prepared run (docs/BENCHMARKS.md records its
# figures): python -m kernels.bench, then the GPU tests. Logs, a JUnit report and the bench JSON
# go to $OUT (default build/gpu_check).
#
#   bash kernels/gpu_check.sh                      # from the repository root, on a machine with a GPU
#   TENSORRT_ROOT=DIR bash kernels/gpu_check.sh    # TensorRT headers for tests/test_plugin_build.py
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-build/gpu_check}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"

{
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem --format=csv
    nvcc --version | tail -2
    "$PYTHON" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
} 2>&1 | tee "$OUT/machine.txt"

timeout 150 "$PYTHON" -m kernels.bench --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
bench=$?

timeout 240 "$PYTHON" -m pytest -q -rs -p no:cacheprovider --durations=10 --junitxml="$OUT/tests.xml" \
    tests/test_gpu_*.py tests/test_plugin_build.py 2>&1 | tee "$OUT/tests.log"
tests=$?

echo "gpu_check: tests exit $tests, bench exit $bench"
exit $(( tests != 0 || bench != 0 ))
