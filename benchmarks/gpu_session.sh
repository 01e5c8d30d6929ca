#!/usr/bin/env bash
# Issue 11's targets never measured before, in one GPU call of about 4 minutes on an H100 (model building included):
#   decode_step_gpu.py     decode step with 64 adapters / base (decode-64, 8 layers), one adapter unmerged / base
#                          (one-adapter, 16 layers: prefill forward 4 x 512 and a decode step), PEFT alongside
#   adapter_switch_gpu.py  switching a cached adapter from pinned RAM into a compiled model's slot: ms, recompiles
#   serve_throughput.py    lorakit serve on the GPU (SmolLM2-135M's shape, random weights): 1/8/32 clients over 8
#                          adapters vs one at a time and vs one adapter; needs fastapi/uvicorn/pydantic (carry wheels)
# With --tests first the CUDA tests of the serving engine and the routed kernel (tests/gpu/test_serve_cuda.py,
# test_kernels.py -k routed); SERVE=0 skips the serving run (no web packages there).
# Each script has its own time limit and rewrites its JSON after every measure, so one that runs long keeps what it
# measured and the other still runs. JSON and full logs go to $OUT (default benchmarks/results/); the summaries are
# printed at the end. Extra arguments go to both scripts (`--quick`: a CPU smoke run of the whole session).
# Run from anywhere: bash benchmarks/gpu_session.sh
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}."  # wheels carried to the GPU machine may come first
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | grep -oE '[A-Z][0-9]{2,3}' | head -1)
case " $* " in *" --quick "*) card=cpu ;; esac
tag="$(echo "${card:-gpu}" | tr 'A-Z' 'a-z')_$(date -u +%Y-%m-%d)"
start=$(date +%s)

run() {  # name, time limit in seconds, then the script's arguments
    local name=$1 limit=$2
    shift 2
    timeout "$limit" "$PYTHON" "benchmarks/$name.py" --json "$OUT/${name}_$tag.json" "$@" >"$OUT/${name}_$tag.log" 2>&1
    echo "$name: exit $? after $(($(date +%s) - start)) s (limit ${limit} s; 124 = cut off)"
}

if [ "${1:-}" = "--tests" ]; then
    shift
    timeout 150 "$PYTHON" -m pytest -q -x -p no:cacheprovider tests/gpu/test_serve_cuda.py tests/gpu/test_kernels.py \
        -k "serve or routed" >"$OUT/gpu_tests_$tag.log" 2>&1
    echo "gpu tests: exit $? after $(($(date +%s) - start)) s; $(tail -n 1 "$OUT/gpu_tests_$tag.log")"
fi
run decode_step_gpu 160 "$@"
run adapter_switch_gpu 130 "$@"
if [ "${SERVE:-1}" = 1 ] && [ "$card" != cpu ]; then
    timeout 200 "$PYTHON" benchmarks/serve_throughput.py --device cuda --hidden 576 --layers 30 --requests 32 \
        --rounds 1 --out "$OUT/serve_throughput_$tag.json" >"$OUT/serve_throughput_$tag.log" 2>&1
    echo "serve_throughput: exit $? after $(($(date +%s) - start)) s"
    grep -A8 '^| clients' "$OUT/serve_throughput_$tag.log"
fi
for name in decode_step_gpu adapter_switch_gpu; do
    log="$OUT/${name}_$tag.log"
    echo
    if grep -q '^== ' "$log"; then
        sed -n '/^== /,$p' "$log"
    else  # cut off or failed: what it measured is in its JSON and at the end of its log
        echo "== $name: no summary; the end of its log:"
        grep -v -E 'Warning|warnings.warn|return forward_call' "$log" | tail -n 15
    fi
done
echo "total $(($(date +%s) - start)) s; JSON and logs: $OUT/*_$tag.{json,log}"
