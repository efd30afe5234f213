#!/usr/bin/env bash
# AP memory ablation on the digits benchmark: mAP fine-tuning of one softmax baseline with
# loss.memory=0 and loss.memory=20, same learning rate (1e-5, with the unnormalised gradient)
# and iterations (150); docs/scale.md gives the figures.
# Usage: bash experiments/map_memory.sh [OUT_DIR]     (about 5 minutes on 2 CPU cores)
set -euo pipefail
OUT=${1:-runs/map_memory}
# data.digits.num_train=400: the 400-image benchmark, where docs/scale.md's figures come from
COMMON=(data.root="$OUT/data" proposals.cache_dir="$OUT/cache" data.digits.num_train=400)
mapdet train configs/digits.yaml "${COMMON[@]}" train.iterations=1500 "train.lr_steps=[1200]" \
    --out "$OUT/baseline"
BASE=$OUT/baseline/checkpoints/iter_0001500.pt
mapdet eval configs/digits.yaml "${COMMON[@]}" --checkpoint "$OUT/baseline" --out "$OUT/baseline/eval"
for MEMORY in 0 20; do
    mapdet train configs/digits.yaml "${COMMON[@]}" train.loss=map train.init_from="$BASE" \
        train.iterations=150 "train.lr_steps=[100000]" train.warmup_iterations=0 loss.lr=0.00001 \
        loss.normalization=none loss.memory=$MEMORY --out "$OUT/map_memory$MEMORY"
    mapdet eval configs/digits.yaml "${COMMON[@]}" --checkpoint "$OUT/map_memory$MEMORY" \
        --out "$OUT/map_memory$MEMORY/eval"
done
grep -H '"mAP"' "$OUT"/*/eval/metrics.json
