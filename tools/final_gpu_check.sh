#!/usr/bin/env bash
# One device call for a session's closing checks: GPU tests of the runtime and the new encodings,
# the soak of the streaming tiers, the lossless-plane decode benchmark, the ANS-file disk tier, and
# the interleaved TinyLlama ratios (profile_decode: timeline, per-block times).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; export OUT
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
timeout ${T_TESTS:-190} tools/gpu_session.sh tests tests/test_gpu_model.py tests/test_gpu_ans_file.py tests/test_lossless.py \
  tests/test_planes_kernel.py tests/test_int8_group.py tests/test_soak.py \
  "tests/test_triton_kernels.py::test_gpu_int8_group_scales" "tests/test_launch_plan.py::test_gpu_direct_launch_with_group_scales" \
  --durations=8
export PYTHONPATH=$PWD:/tmp/site
timeout ${T_PLANES:-45} python3 tools/bench_planes.py --json > "$OUT/bench_planes.json" 2> "$OUT/bench_planes.err"; tail -c 1500 "$OUT/bench_planes.json"
timeout ${T_BENCH:-100} tools/gpu_session.sh bench tinyllama --threads 16 --repeats 3 --no-offload --tiers host,disk --file-codec ans
# interleaved TinyLlama ratios with the per-group timeline and per-block host/GPU times
timeout ${T_PROFILE:-150} python3 tools/profile_decode.py --shape tinyllama --tiers gpu,gpu-compressed,host --rounds 5 \
  --no-profile --json "$OUT/profile_tinyllama.json" > "$OUT/profile_tinyllama.log" 2>&1; grep -v Warn "$OUT/profile_tinyllama.log" | tail -25
