#!/usr/bin/env bash
# Everything a session with a lent GPU runs, in ONE device call. A session has 15 minutes of device time in all,
# machine start included, one call may run 10, and at most 8 files come back: so the script keeps to a deadline
# (DEADLINE seconds, default 540, under the call's 600) and packs everything into $OUT/session.tgz, refreshed after
# every stage, so what ran before a kill still comes back.
# Stages: build for the GPU at hand with all cores; the GPU tests (the CPU ones run in CI); then the benchmark
# suites, fast kernel-level ones first: LoRA layer, sparse MLP (DEFT decode), bottleneck adapter, then the training
# steps: model (full FT / HF PEFT / pefttorch LoRA), MEFT, rank allocation (IncreLoRA/AdaLoRA). Each suite gets at
# most SUITE_TIMEOUT seconds and at most an equal share of the time left, so a slow suite costs only its own results.
#   run: PEFTTORCH_COMMIT=<hash> bash bench/gpu_session.sh [extra `pefttorch bench lora` arguments]
# Knobs: PHASES (default "build tests bench"), SUITES (default "lora sparse adapter model meft rank"), TESTS ("gpu":
# the tests marked gpu, the default; "all": the whole suite), TEST_TIMEOUT (default 150), SUITE_TIMEOUT (default
# 120), QUICK (default 1: each suite's --quick set; 0 for the full grids), FULL (suites run with their full grid
# even so, e.g. "lora"), EXTRA (a command run last, its output in extra.log, e.g. a diagnostic script), DEADLINE.
# Afterwards: tar xzf session.tgz, copy the JSON/PNG worth keeping into bench/results/ (device, versions and commit
# are inside each JSON).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-build/gpu-session-out}
WORK=${WORK:-build/gpu-session}
rm -rf "$WORK"  # nothing stale from an earlier run gets packed
mkdir -p "$OUT" "$WORK"
export MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}  # the GPU at hand only: faster to build
PY=${PY:-python3}
START=$SECONDS
DEADLINE=${DEADLINE:-540}
left() { echo $((DEADLINE - (SECONDS - START))); }
stamp() { echo "== $1 (at $((SECONDS - START)) s)" | tee -a "$WORK/summary.txt"; }
pack() {  # everything so far, as one file in $OUT (the device tool brings back at most 8)
  tar czf /tmp/session.tgz -C "$WORK" . && mv /tmp/session.tgz "$OUT/session.tgz"
  cp "$WORK/summary.txt" "$OUT/summary.txt"
}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$WORK/gpu.txt"

PHASES=${PHASES:-"build tests bench"}
SUITES=${SUITES:-"lora sparse adapter model meft rank"}
TESTS=${TESTS:-gpu}
has() { [[ " $1 " == *" $2 "* ]]; }

if has "$PHASES" build; then
  stamp build
  if ! $PY -m pip install -q --no-build-isolation --no-deps -e . > "$WORK/build.log" 2>&1; then
    tail -40 "$WORK/build.log"
    stamp "build failed"
    pack
    exit 1
  fi
fi
$PY -c "import pefttorch, json; print(json.dumps(pefttorch.build_info()))" 2>&1 | tee "$WORK/build_info.json"
$PY -m pip list 2>/dev/null | grep -i -E "^(torch|transformers|peft|accelerate|safetensors|triton) " \
  | tee "$WORK/versions.txt"
pack

reserve=10
has "$PHASES" bench && reserve=200  # keep time for the benchmarks
budget=$(( $(left) - reserve ))
(( budget > ${TEST_TIMEOUT:-150} )) && budget=${TEST_TIMEOUT:-150}
if has "$PHASES" tests && (( budget < 30 )); then  # (a negative timeout is refused, 0 means none)
  stamp "tests skipped: only $budget s left for them"  # stamp writes the summary too
elif has "$PHASES" tests; then
  stamp "tests ($TESTS, at most $budget s)"
  select=()
  [[ $TESTS == gpu ]] && select=(-m gpu)
  extra=()  # the GPU tests are small: several processes share the GPU well
  $PY -c "import xdist" 2>/dev/null && extra+=(-n 8)
  $PY -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout 90)
  # -rfE lists failures and errors at the end; -v puts each result in the log as it happens, for when time runs out
  timeout "$budget" $PY -m pytest -v -rfE -p no:cacheprovider "${select[@]}" "${extra[@]}" tests \
    > "$WORK/tests.log" 2>&1
  status=$?
  grep -E "^(FAILED|ERROR)" "$WORK/tests.log" | head -40
  tail -1 "$WORK/tests.log" | tee -a "$WORK/summary.txt"
  [[ $status == 124 ]] && echo "tests: timed out; passed so far: $(grep -c ' PASSED ' "$WORK/tests.log")," \
    "failed so far: $(grep -c ' FAILED ' "$WORK/tests.log")" | tee -a "$WORK/summary.txt"
  pack
fi

if has "$PHASES" bench; then
  $PY -m pefttorch info > "$WORK/info.txt" 2>&1
  suites=($SUITES)
  for i in "${!suites[@]}"; do
    suite=${suites[$i]}
    share=$(( $(left) / (${#suites[@]} - i) ))
    (( share > ${SUITE_TIMEOUT:-120} )) && share=${SUITE_TIMEOUT:-120}
    if (( share < 15 )); then
      stamp "bench $suite skipped: no time left"
      continue
    fi
    stamp "bench $suite (at most $share s)"
    extra=()
    [[ $suite == lora ]] && extra=("$@")
    quick=()
    [[ ${QUICK:-1} == 1 ]] && ! has "${FULL:-}" "$suite" && quick=(--quick)
    timeout "$share" $PY -m pefttorch bench "$suite" "${quick[@]}" --json "$WORK/$suite.json" \
      --plot "$WORK/$suite.png" "${extra[@]}" > "$WORK/bench-$suite.log" 2>&1
    status=$?
    grep -v "^$suite: \|it/s\]\|run/s\]\|impl/s\]\|row/s\]" "$WORK/bench-$suite.log" | tail -30
    echo "$suite: exit $status$([[ $status == 124 ]] && echo ' (timed out)')" | tee -a "$WORK/summary.txt"
    pack
  done
fi
if [[ -n ${EXTRA:-} ]] && (( $(left) > 10 )); then  # (timeout 0 would mean no limit)
  stamp "extra: $EXTRA (at most $(left) s)"
  timeout "$(left)" bash -c "$EXTRA" > "$WORK/extra.log" 2>&1
  echo "extra: exit $?" | tee -a "$WORK/summary.txt"
  tail -30 "$WORK/extra.log"
fi
stamp done
pack
cat "$WORK/summary.txt"
