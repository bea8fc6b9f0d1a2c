#!/usr/bin/env bash
# Everything a session with a lent GPU runs, in ONE device call (a session may have 15 minutes of device time in
# all, machine start included, and one call may run 10): build for the GPU at hand with all cores, the GPU tests
# (the CPU ones already ran in CI), then the benchmark suites: LoRA layer, training step, sparse MLP (DEFT decode),
# rank allocation (IncreLoRA/AdaLoRA), MEFT (reversible adapters against LoRA with and without checkpointing) and
# the bottleneck adapter. Each suite runs under its own time limit, so one slow suite costs only its own results.
# Logs and results go to $OUT (the device tool's output folder) or build/gpu-session; copy the JSON/PNG worth
# keeping into bench/results/ afterwards, with the device and the commit (they are inside each JSON).
#   run: bash bench/gpu_session.sh [extra `pefttorch bench lora` arguments]
# Knobs: PHASES (default "build tests bench"), SUITES (default "lora model sparse rank meft adapter"), TESTS ("gpu":
# the tests marked gpu, the default; "all": the whole suite), SUITE_TIMEOUT (seconds per suite, default 100),
# QUICK=1 (each suite's --quick set). Back-to-back calls reuse the build while the machine stays warm, e.g.
#   PHASES=bench SUITES="meft adapter" bash bench/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-build/gpu-session}
mkdir -p "$OUT"
export MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}  # the GPU at hand only: faster to build
PY=${PY:-python3}
START=$SECONDS
stamp() { echo "== $1 (at $((SECONDS - START)) s)" | tee -a "$OUT/summary.txt"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

PHASES=${PHASES:-"build tests bench"}
SUITES=${SUITES:-"lora model sparse rank meft adapter"}
TESTS=${TESTS:-gpu}
has() { [[ " $1 " == *" $2 "* ]]; }

if has "$PHASES" build; then
  stamp build
  if ! $PY -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log"
    exit 1
  fi
fi
$PY -c "import pefttorch, json; print(json.dumps(pefttorch.build_info()))" | tee "$OUT/build_info.json"

if has "$PHASES" tests; then
  stamp "tests ($TESTS)"
  select=()
  [[ $TESTS == gpu ]] && select=(-m gpu)
  parallel=()  # the GPU tests are small: several processes share the GPU well
  $PY -c "import xdist" 2>/dev/null && parallel=(-n 8)
  $PY -m pytest -q -p no:cacheprovider "${select[@]}" "${parallel[@]}" tests 2>&1 | tee "$OUT/tests.log" | tail -25
  tail -1 "$OUT/tests.log" >> "$OUT/summary.txt"
fi

if has "$PHASES" bench; then
  $PY -m pefttorch info > "$OUT/info.txt" 2>&1
  quick=()
  [[ ${QUICK:-0} == 1 ]] && quick=(--quick)
  for suite in $SUITES; do
    stamp "bench $suite"
    extra=()
    [[ $suite == lora ]] && extra=("$@")
    timeout "${SUITE_TIMEOUT:-100}" $PY -m pefttorch bench "$suite" "${quick[@]}" --json "$OUT/$suite.json" \
      --plot "$OUT/$suite.png" "${extra[@]}" > "$OUT/bench-$suite.log" 2>&1
    status=$?
    grep -v "^$suite: \|it/s\]\|run/s\]\|impl/s\]\|row/s\]" "$OUT/bench-$suite.log" | tail -40
    echo "$suite: exit $status$([[ $status == 124 ]] && echo ' (timed out)')" | tee -a "$OUT/summary.txt"
  done
fi
stamp done
