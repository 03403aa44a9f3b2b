#!/usr/bin/env bash
# GPU check of ops/: the ops tests at full size, then the attention benchmark and a block-size sweep.
# Usage: scripts/gpu_ops.sh OUTDIR [tests|bench|sweep ...]   (default: all three)
# Tests run with --confcutdir=tests/ops so that only the ops fixtures load (no model dependencies).
set -uo pipefail
out=${1:?usage: scripts/gpu_ops.sh OUTDIR [tests|bench|sweep ...]}
shift
stages=${*:-tests bench sweep}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
for stage in $stages; do
  case $stage in
    # -v: one line per finished test, so a run cut off by the timeout still shows how far it got.
    # The suite is bound by Triton compiling the kernel for each new dtype, head dim and stride
    # pattern: with pytest-xdist installed, TESTS_WORKERS processes (default 4) compile side by side.
    tests) workers=(); python3 -c "import xdist" 2>/dev/null && workers=(-n "${TESTS_WORKERS:-4}")
           timeout "${TESTS_TIMEOUT:-600}" python3 -m pytest -v "${workers[@]}" tests/ops --confcutdir=tests/ops \
             -p no:cacheprovider --durations=15 --maxfail=10 2>&1 | tee "$out/tests.log" ;;
    bench) timeout 240 python3 -m entrypoints.bench attention --json "$out/bench_attention.json" ${BENCH_ARGS:-} 2>&1 \
             | tee "$out/bench.log" ;;
    sweep) timeout 240 python3 -m scripts.attention_sweep 2>&1 | tee "$out/sweep.log" ;;
  esac
done
