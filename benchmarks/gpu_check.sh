#!/usr/bin/env bash
# The GPU check: everything that needs a CUDA device, in one run of at most ~8 minutes on one
# GPU, printed as one table; exits non-zero when any part fails. Without a GPU it runs its
# CPU part and prints, for each CUDA part, that it was skipped and why.
#
#   bash benchmarks/gpu_check.sh                  # from the repository root
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
#
# Parts:
#   cpu-amp         tests/test_amp.py: bfloat16 autocast steps for both losses and both
#                   detectors, fp16 with a gradient scaler (CPU; always runs)
#   cuda-tests      every test marked `cuda` (tests/test_cuda.py, the loss with CUDA tensors):
#                   Fast R-CNN and torchvision Faster R-CNN steps for both losses, eval, resume,
#                   under amp none / fp16 (GradScaler) / bf16
#   paper-scale     benchmarks/paper_scale.py on the GPU: VGG16, 600 px, 2,000 proposals per
#                   image; softmax vs mAP iteration ms and the CPU loss's share
#   torchrun-nccl   a one-process torchrun (nccl backend) training a tiny digits run
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
LOGS=${GPU_CHECK_LOGS:-$(mktemp -d -t mapdet-gpu-check-XXXX)}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
rows=()
failed=0

has_cuda=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ "$has_cuda" = 1 ]; then
  device=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))")
else
  device="none (torch.cuda.is_available() is False)"
fi

# part NAME CMD...: runs CMD with its output in $LOGS/NAME.log; records pass/FAIL and seconds.
part() {
  local name=$1; shift
  local t0 t1 status detail
  t0=$(date +%s.%N)
  if "$@" >"$LOGS/$name.log" 2>&1; then status=pass; else status=FAIL; failed=1; fi
  t1=$(date +%s.%N)
  detail=$(grep -E "passed|failed|error|Error|s/iteration|softmax .* mAP" "$LOGS/$name.log" \
           | tail -n 1 | cut -c1-110)
  rows+=("$(printf '%-14s %-8s %7.1f  %s' "$name" "$status" "$(awk "BEGIN {print $t1 - $t0}")" "$detail")")
}
skip() { rows+=("$(printf '%-14s %-8s %7s  %s' "$1" skipped - "$2")"); }

part cpu-amp "$PY" -m pytest -q -p no:cacheprovider tests/test_amp.py
if [ "$has_cuda" = 1 ]; then
  part cuda-tests "$PY" -m pytest -q -p no:cacheprovider -m cuda tests
  part paper-scale "$PY" benchmarks/paper_scale.py --device cuda --iterations 4 --repeats 3 \
    --train-images 8 --test-images 2 --json "$LOGS/paper_scale.json"
  tiny_dir=$(mktemp -d -t mapdet-torchrun-XXXX)
  part torchrun-nccl "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 \
    -m mapdet train configs/digits.yaml "data.root=$tiny_dir/digits" \
    "data.digits={num_train: 6, num_test: 2, image_size: 64, seed: 5}" \
    data.scale=64 data.max_size=64 "proposals.cache_dir=$tiny_dir/cache" \
    proposals.num_workers=0 model.fc_dim=32 train.iterations=3 train.checkpoint_every=0 \
    train.device=cuda output.tensorboard=false --out "$tiny_dir/run" --no-progress
  if [ -f "$LOGS/torchrun-nccl.log" ] && ! grep -q "nccl" "$LOGS/torchrun-nccl.log"; then
    rows[${#rows[@]}-1]="${rows[${#rows[@]}-1]} (no 'nccl' in the log: check the backend)"
  fi
else
  why="no CUDA device on this machine"
  skip cuda-tests "$why"
  skip paper-scale "$why (run benchmarks/paper_scale.py for the CPU figures)"
  skip torchrun-nccl "$why"
fi

echo
echo "mapdet GPU check: device $device; torch $("$PY" -c 'import torch; print(torch.__version__)'); logs in $LOGS"
printf '%-14s %-8s %7s  %s\n' part status seconds detail
for r in "${rows[@]}"; do echo "$r"; done
exit $failed
