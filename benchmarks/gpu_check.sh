#!/usr/bin/env bash
# GPU check: on a machine with an NVIDIA GPU and TensorFlow, runs the
# GPU-marked tests, the core suite on the GPU, the layer benchmark with XLA
# off and on, and the whole-model benchmark's quick run, and keeps every
# result in one folder. Needs no editing:
#
#     bash benchmarks/gpu_check.sh OUT_DIR
#
# PYTHON picks the interpreter (default python3); keras_bn is imported from
# this checkout. Each step has its own time limit and a step that runs out
# leaves what it wrote; the limits add up to 7 min 40 s.
set -u
OUT="${1:?usage: gpu_check.sh OUT_DIR}"
PY="${PYTHON:-python3}"
cd "$(dirname "$0")/.."

GPU_TESTS=(tests/test_gpu.py)
CORE_TESTS=(tests/test_ops.py tests/test_layer.py tests/test_keras_parity.py
            tests/test_graph.py tests/test_fused_kernel.py tests/test_dispatch.py
            tests/test_gradients.py)
# A renamed test file would otherwise cost a GPU run to find out.
missing=()
for file in "${GPU_TESTS[@]}" "${CORE_TESTS[@]}"; do
    [[ -f "$file" ]] || missing+=("$file")
done
if (( ${#missing[@]} )); then
    echo "gpu_check.sh: test files not found in $PWD: ${missing[*]}" >&2
    exit 2
fi

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
step() {  # step SECONDS NAME COMMAND...: stdout and stderr to OUT/NAME.txt
    local seconds=$1 name=$2
    shift 2
    timeout --kill-after=5 "$seconds" "$@" > "$OUT/$name.txt" 2>&1 || {
        echo "step $name failed or ran past ${seconds} s (exit $?)"
        status=1
    }
}
step 60 gpu_tests "$PY" -m pytest -q -m gpu "${GPU_TESTS[@]}" -rs \
    --junitxml "$OUT/gpu_tests.xml"
step 150 core_suite_on_gpu "$PY" -m pytest -q "${CORE_TESTS[@]}" \
    --junitxml "$OUT/core_suite_on_gpu.xml"
for jit in off on; do
    step 75 "bench_jit_$jit" "$PY" benchmarks/bench_layers.py --repeats 10 --warmup 2 \
        --dtypes float32,float16,bfloat16 --jit "$jit" --json "$OUT/bench_jit_$jit.json"
done
step 100 bench_models_quick "$PY" benchmarks/bench_models.py --quick \
    --json "$OUT/bench_models_quick.json"

tail -n 3 "$OUT/gpu_tests.txt" "$OUT/core_suite_on_gpu.txt"
echo "results in $OUT (exit $status)"
exit $status
