#!/usr/bin/env bash
# One device call: kernel tests on CUDA, then the launch-shape sweep of both kernels (results under $OUT).
set -uo pipefail
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 -m pytest tests/kernels -q -p no:cacheprovider -x 2>&1 | tee "$OUT/pytest_kernels.log"
timeout 250 python3 benchmarks/bench_kernels.py --tune --tune-only --only moe --json "$OUT/tune_moe.json" 2>&1 | tee "$OUT/tune_moe.log"
timeout 150 python3 benchmarks/bench_kernels.py --tune --tune-only --only mla --json "$OUT/tune_mla.json" 2>&1 | tee "$OUT/tune_mla.log"
