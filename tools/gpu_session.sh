#!/usr/bin/env bash
# One device session: install the carried wheels, then run what is asked.
#   tools/gpu_session.sh tests        GPU tests (marker gpu)
#   tools/gpu_session.sh kernels      tools/bench_kernels.py
#   tools/gpu_session.sh bench SHAPE [args]   tools/bench_generate.py
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
what=$1; shift
case "$what" in
  tests) CODECLLM_SOAK_REPORT=$OUT/soak python3 -m pytest -q -m gpu -p no:cacheprovider ${GPU_TEST_WORKERS:+-n $GPU_TEST_WORKERS} "$@" 2>&1 | tee "$OUT/gpu_tests.log" | tail -40 ;;
  kernels) python3 tools/bench_kernels.py --json "$OUT/bench_kernels.json" "$@" 2>&1 | tee "$OUT/bench_kernels.log" | tail -70 ;;
  bench) shape=$1; shift; python3 tools/bench_generate.py --shape "$shape" --json "$OUT/bench_$shape.json" "$@" 2>&1 | tee "$OUT/bench_$shape.log" | tail -40 ;;
esac
