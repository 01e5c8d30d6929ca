#!/usr/bin/env bash
# Issue 11's targets never measured before, in one GPU call of about 4 minutes on an H100 (model building included):
#   decode_step_gpu.py     decode step with 64 adapters / base (decode-64, 8 layers), one adapter unmerged / base
#                          (one-adapter, 16 layers: prefill forward 4 x 512 and a decode step), PEFT alongside
#   adapter_switch_gpu.py  switching a cached adapter from pinned RAM into a compiled model's slot: ms, recompiles
# Each script has its own time limit and rewrites its JSON after every measure, so one that runs long keeps what it
# measured and the other still runs. JSON and full logs go to $OUT (default benchmarks/results/); the summaries are
# printed at the end. Extra arguments go to both scripts (`--quick`: a CPU smoke run of the whole session).
# Run from anywhere: bash benchmarks/gpu_session.sh
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
export PYTHONPATH=.
PYTHON="${PYTHON:-python}"
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

run decode_step_gpu 160 "$@"
run adapter_switch_gpu 130 "$@"
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
