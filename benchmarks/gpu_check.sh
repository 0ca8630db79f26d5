#!/usr/bin/env bash
# GPU check: on a machine with an NVIDIA GPU and TensorFlow, runs the
# GPU-marked tests, the core suite on the GPU and the layer benchmark, and
# keeps every result in one folder. Needs no editing:
#
#     bash benchmarks/gpu_check.sh OUT_DIR
#
# PYTHON picks the interpreter (default python3); keras_bn is imported from
# this checkout. The whole run stays under 5 minutes on one GPU: each step
# has its own time limit and a step that runs out leaves what it wrote.
set -u
OUT="${1:?usage: gpu_check.sh OUT_DIR}"
PY="${PYTHON:-python3}"
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TF_CPP_MIN_LOG_LEVEL=2

{ nvidia-smi || echo "nvidia-smi not found"; } > "$OUT/nvidia-smi.txt" 2>&1
"$PY" - > "$OUT/environment.json" 2> "$OUT/environment.err" <<'PYEOF'
import json, sys
sys.path.insert(0, "benchmarks")
import bench_layers
print(json.dumps(bench_layers.environment(), indent=1))
PYEOF

status=0
timeout 60 "$PY" -m pytest -q -m gpu tests/test_gpu.py -rs \
    --junitxml "$OUT/gpu_tests.xml" > "$OUT/gpu_tests.txt" 2>&1 || status=1
timeout 90 "$PY" -m pytest -q tests/test_ops.py tests/test_layer.py \
    tests/test_keras_parity.py tests/test_graph.py tests/test_fused.py \
    --junitxml "$OUT/core_suite_on_gpu.xml" > "$OUT/core_suite_on_gpu.txt" 2>&1 || status=1
timeout 140 "$PY" benchmarks/bench_layers.py --repeats 10 --warmup 2 \
    --dtypes float32,float16,bfloat16 --json "$OUT/bench.json" \
    > "$OUT/bench.txt" 2>&1 || status=1
tail -n 3 "$OUT/gpu_tests.txt" "$OUT/core_suite_on_gpu.txt"
echo "results in $OUT (exit $status)"
exit $status
