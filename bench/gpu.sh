#!/usr/bin/env bash
# One GPU, under 6 minutes, one JSON: r50 and r100 training steps at bf16 and fp16, channels_last off/on,
# torch.compile off/on (samples/s, model FLOP utilization, peak memory), and Partial FC at 1M and 10M classes with
# sample rate 0.1 (step time, peak memory). See bench/gpu_bench.py for what is measured and how.
#
#   bash bench/gpu.sh                          # writes bench-gpu.json
#   bash bench/gpu.sh out.json --peak-tflops 989 --networks r50
#
# gpu_bench.py starts no configuration that would end after --budget-s (310 s); the `timeout` below is the hard
# stop. The JSON is rewritten after every configuration, so what was measured before an interruption is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench-gpu.json}"
shift || true

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "bench/gpu.sh: no CUDA device visible to torch; nothing measured" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# SIGINT first (Python stops cleanly), SIGKILL 15 s later if it has not.
timeout --signal=INT --kill-after=15 335 python bench/gpu_bench.py --budget-s 310 --out "$out" "$@"
