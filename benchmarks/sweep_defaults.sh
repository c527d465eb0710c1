#!/usr/bin/env bash
# A small learning-rate check of train.py's per-model defaults on the validation split (never the
# test set), at CPU scale: 32 px, subsets, 2 epochs. Prints one Markdown row per run.
#   CIFAR10_ROOT=../shared/data RESNET50_WEIGHTS=... bash benchmarks/sweep_defaults.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
common=(--image-size 32 --epochs 2 --val-split 1000 --test-subset 100 --no-download
        --out "$out/ck" --log-dir "$out/log")
run() {  # model, lr, extra options...
  local model=$1 lr=$2; shift 2
  local name="$model-lr$lr"
  python train.py --model "$model" --lr "$lr" --run-name "$name" "${common[@]}" "$@" > "$out/$name.out"
  best=$(grep "best accuracy is" "$out/$name.out" | tail -1 | awk '{print $4}')
  echo "| $model | $lr | $* | $best |"
}
echo "| model | lr | options | best val acc |"
echo "|---|---|---|---|"
for lr in 0.05 0.1 0.2; do run sample_resnet $lr --train-subset 10000; done
for lr in 3e-4 1e-3 3e-3; do run resnet $lr --train-subset 10000 --no-augment --weights "$RESNET50_WEIGHTS"; done
for lr in 3e-4 1e-3 3e-3; do run resnet_att $lr --train-subset 3000 --weights "$RESNET50_WEIGHTS"; done
rm -rf "$out"
