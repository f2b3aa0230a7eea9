#!/usr/bin/env bash
# One GPU, under 6 minutes: every GPU check of the project in one go.
#   1. bench/gpu_bench.py -> OUT: r50 and r100 training steps at bf16 and fp16, channels_last off/on,
#      torch.compile off/on (samples/s, model FLOP utilization, peak memory), and Partial FC at 1M, 10M and 20M
#      classes with sample rate 0.1, head.update lazy, dense and sparse (step time, peak memory);
#   2. bench/data.py --gpu -> OUT with _data before .json: the input path with nvJPEG decoding and with
#      data.loader.FaceLoader's pinned slots, beside the CPU figures;
#   3. the GPU-marked tests (tests/gpu: backends, nvJPEG decode, the pinned loader) -> OUT with _tests.txt.
#
#   bash bench/gpu.sh                          # writes bench-gpu.json, bench-gpu_data.json, bench-gpu_tests.txt
#   bash bench/gpu.sh out.json --peak-tflops 989 --networks r50
#
# gpu_bench.py starts no configuration that would end after --budget-s (200 s); each step has a hard `timeout`,
# 225 + 15 + 40 + 80 s at most. The JSON is rewritten after every configuration, so what was measured before an
# interruption is kept; a failing step does not stop the next ones (the exit status says which failed).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench-gpu.json}"
shift || true
stem="${out%.json}"

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "bench/gpu.sh: no CUDA device visible to torch; nothing measured" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

status=0
# SIGINT first (Python stops cleanly), SIGKILL 15 s later if it has not.
timeout --signal=INT --kill-after=15 225 python bench/gpu_bench.py --budget-s 200 --out "$out" "$@" || status=1
timeout --signal=INT --kill-after=5 40 python bench/data.py --gpu --images 4096 --max-workers 4 --epochs 2 \
    --out "${stem}_data.json" || status=1
timeout --signal=INT --kill-after=5 80 python -m pytest -q -m gpu tests/gpu -p no:cacheprovider \
    > "${stem}_tests.txt" 2>&1 || status=1
tail -3 "${stem}_tests.txt"
exit $status
