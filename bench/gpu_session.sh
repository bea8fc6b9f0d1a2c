#!/usr/bin/env bash
# Everything a session with a lent GPU runs, in one call (device time is scarce): build with all cores,
# the whole test suite (GPU tests included), then the LoRA layer, training-step, sparse-MLP (DEFT decode) and
# rank-allocation (IncreLoRA/AdaLoRA training steps) benchmarks. Logs and results go to $OUT (the device
# tool's output folder) or build/gpu-session; copy the JSON/PNG worth keeping into bench/results/ afterwards
# (lora.json, model.json, sparse.json, rank.json and their PNGs).
#   run: bash bench/gpu_session.sh [extra bench_lora.py arguments]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-build/gpu-session}
mkdir -p "$OUT"
export MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}  # the GPU at hand only: faster to build
PY=${PY:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

echo "== build"
if ! $PY -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  exit 1
fi
$PY -c "import pefttorch, json; print(json.dumps(pefttorch.build_info()))" | tee "$OUT/build_info.json"

echo "== tests"
$PY -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$OUT/tests.log" | tail -25

echo "== benchmarks"
$PY -m pefttorch info | tee "$OUT/info.txt"
$PY -m pefttorch bench lora --json "$OUT/lora.json" --plot "$OUT/lora.png" "$@" 2>&1 | tee "$OUT/bench-lora.log" \
  | grep -v "^lora: " | tail -60
$PY -m pefttorch bench model --json "$OUT/model.json" --plot "$OUT/model.png" 2>&1 | tee "$OUT/bench-model.log" \
  | grep -v "^model: " | tail -20
$PY -m pefttorch bench sparse --json "$OUT/sparse.json" --plot "$OUT/sparse.png" 2>&1 | tee "$OUT/bench-sparse.log" \
  | grep -v "^sparse: " | tail -60
$PY -m pefttorch bench rank --json "$OUT/rank.json" --plot "$OUT/rank.png" 2>&1 | tee "$OUT/bench-rank.log" \
  | grep -v "^rank: " | tail -20
