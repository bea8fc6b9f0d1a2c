#!/usr/bin/env bash
# Everything a session with a lent GPU runs, in one call (device time is scarce): build with all cores,
# the whole test suite (GPU tests included), then the LoRA layer, training-step, sparse-MLP (DEFT decode),
# rank-allocation (IncreLoRA/AdaLoRA training steps) and bottleneck-adapter (fused op vs unfused PyTorch and the
# memory-traffic floor) benchmarks. Logs and results go to $OUT (the device tool's output folder) or
# build/gpu-session; copy the JSON/PNG worth keeping into bench/results/ afterwards (lora.json, model.json,
# sparse.json, rank.json, adapter.json and their PNGs).
#   run: bash bench/gpu_session.sh [extra `pefttorch bench lora` arguments]
# One device call may run 10 minutes: split a session over back-to-back calls (the machine keeps the build while
# warm) with PHASES (default "build tests bench") and SUITES (default "lora model sparse rank adapter"), e.g.
#   PHASES=build bash bench/gpu_session.sh;  PHASES=tests ...;  PHASES=bench SUITES="lora model" ...
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-build/gpu-session}
mkdir -p "$OUT"
export MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}  # the GPU at hand only: faster to build
PY=${PY:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

PHASES=${PHASES:-"build tests bench"}
SUITES=${SUITES:-"lora model sparse rank adapter"}
has() { [[ " $1 " == *" $2 "* ]]; }

if has "$PHASES" build; then
  echo "== build"
  if ! $PY -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log"
    exit 1
  fi
fi
$PY -c "import pefttorch, json; print(json.dumps(pefttorch.build_info()))" | tee "$OUT/build_info.json"

if has "$PHASES" tests; then
  echo "== tests"
  $PY -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$OUT/tests.log" | tail -25
fi

if has "$PHASES" bench; then
  echo "== benchmarks: $SUITES"
  $PY -m pefttorch info | tee "$OUT/info.txt"
  for suite in $SUITES; do
    extra=()
    [[ $suite == lora ]] && extra=("$@")
    $PY -m pefttorch bench "$suite" --json "$OUT/$suite.json" --plot "$OUT/$suite.png" "${extra[@]}" 2>&1 \
      | tee "$OUT/bench-$suite.log" | grep -v "^$suite: " | tail -60
  done
fi
