#!/usr/bin/env bash
# GPU check of the training iteration: the --compile / eager equality and divergence tests at real width,
# then `bench step` for cosmos2b and wan1.3b (eager and --compile in one process each).
# Usage: scripts/gpu_step.sh OUTDIR [tests|cosmos|wan ...]   (default: all three; about 15 minutes; the
# tests stage alone takes about 13: on a device with a 10-minute limit run it with -k per case)
set -uo pipefail
out=${1:?usage: scripts/gpu_step.sh OUTDIR [tests|cosmos|wan ...]}
shift
stages=${*:-tests cosmos wan}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
for stage in $stages; do
  case $stage in
    tests) timeout "${TESTS_TIMEOUT:-900}" python3 -m pytest -v -s -p no:cacheprovider \
             tests/parallel/test_compile_iteration_gpu.py --durations=5 > "$out/compile_iteration.log" 2>&1 ;;
    cosmos) timeout 540 python3 -m entrypoints.bench step --config cosmos2b --both --iterations 24 \
             --json "$out/step_cosmos2b.json" > "$out/step_cosmos2b.log" 2>&1 ;;
    wan) timeout 540 python3 -m entrypoints.bench step --config wan1.3b --both --ac full --iterations 24 \
             --json "$out/step_wan13b.json" > "$out/step_wan13b.log" 2>&1 ;;
  esac
  echo "$stage: rc $?"
done
