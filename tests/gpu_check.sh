#!/usr/bin/env bash
# Every GPU check in one go, on a machine with a CUDA GPU: `bash tests/gpu_check.sh 2>&1 | tee gpu_report.txt`.
#   1. the CUDA kernel tests (pytest -m cuda: the Numba CUDA kernels against the readable version, real shapes)
#   2. python tests/benchmark.py --kernels (the deformable attention alone: CPU and CUDA rows)
#   3. both models on CUDA against transformers on CUDA, same weights: fp32 with TF32 off, bf16, fp16 (max diffs)
#   4. the benchmark's GPU rows: ours with the Numba CUDA kernel, ours with the readable version, transformers
# --cpu-dry-run: steps 3 and 4 small and on the CPU, 1 and 2 only checked to exist (tests/test_inference.py).
set -euo pipefail
cd "$(dirname "$0")/.."
export DETR_TEST_CACHE="${DETR_TEST_CACHE:-tests/.cache}"

if [[ "${1:-}" == "--cpu-dry-run" ]]; then
    DEVICE=cpu
    PARITY=(--quick --dtypes float32 --backends auto)
    BENCH=(--runs 1 --no-rss gdino-small)
    BACKENDS=(auto)
else
    DEVICE=cuda
    PARITY=()
    BENCH=(--runs 5 --no-rss gdino-tiny mm-gdino-tiny dfine-n dfine-l dfine-x)
    BACKENDS=(numba torch)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'"
fi

echo "== 1. CUDA kernel tests"
if [[ $DEVICE == cuda ]]; then
    python -m pytest -q -m cuda tests/test_kernels.py
else
    python -m pytest -q --collect-only -m cuda tests/test_kernels.py | tail -1
fi

echo "== 2. benchmark.py --kernels"
if [[ $DEVICE == cuda ]]; then
    python tests/benchmark.py --kernels
else
    python tests/benchmark.py --help | grep -q -- --kernels && echo "benchmark.py --kernels exists"
fi

echo "== 3. both models on $DEVICE against transformers on $DEVICE"
python tests/gpu_parity.py --device "$DEVICE" "${PARITY[@]}"

echo "== 4. benchmark rows on $DEVICE (ours per backend, transformers)"
for backend in "${BACKENDS[@]}"; do
    python tests/benchmark.py --device "$DEVICE" --backend "$backend" "${BENCH[@]}"
done
if [[ $DEVICE == cuda ]]; then
    python tests/benchmark.py --device cuda --dtype bfloat16 "${BENCH[@]}"
    python tests/benchmark.py --device cuda --reuse gdino-tiny
fi
echo "== done"
