#!/usr/bin/env bash
# One command for a machine with a CUDA GPU (after ./setup.sh, which installs CuPy there): the CUDA tests,
# then ours against torchvision on the same card -- bench/ops.py, bench/inference.py and bench/train.py in
# float32 and --amp (float16), batches of 1 and 4 -- and one table of images per second and peak memory.
# About 5 minutes on an H100/H200. Results (text and JSON) go to $OUT (default bench/gpu_results/).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-bench/gpu_results}
mkdir -p "$OUT"
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "bench/gpu.sh: no CUDA GPU visible to torch; nothing to measure" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
"$PY" -c "import cupy; print('cupy', cupy.__version__, 'available:', cupy.is_available())" 2>&1 | tee -a "$OUT/gpu.txt"

status=0
echo "== CUDA tests (tests marked cuda: kernels against the CPU paths, float16 training, DDP-free)"
timeout 300 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests 2>&1 | tail -n 15 | tee "$OUT/tests.txt"
[[ ${PIPESTATUS[0]} -eq 0 ]] || status=1

echo "== NMS and RoI pooling: CuPy kernels against torchvision.ops"
timeout 120 "$PY" bench/ops.py --device cuda --repeats 30 2>&1 | tee "$OUT/ops.txt" || status=1

for amp in "" "--amp"; do
  for batch in 1 4; do
    tag="b${batch}${amp:+_amp}"
    echo "== inference, batch $batch ${amp:-float32}"
    timeout 300 "$PY" bench/inference.py --device cuda --reps 20 --batch-size "$batch" $amp \
      --json "$OUT/inference_$tag.json" 2>&1 | tail -n 12 | tee "$OUT/inference_$tag.txt" || status=1
    echo "== training step, batch $batch ${amp:-float32}"
    timeout 300 "$PY" bench/train.py --device cuda --skip-toy --reps 20 --batch-size "$batch" $amp \
      --json "$OUT/train_$tag.json" 2>&1 | tail -n 12 | tee "$OUT/train_$tag.txt" || status=1
  done
done

echo "== summary"
"$PY" bench/gpu_table.py "$OUT" | tee "$OUT/summary.md"
exit $status
