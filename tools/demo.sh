#!/usr/bin/env bash
# The end-to-end demo on the embedded real dataset (scikit-learn digits, 10 classes, 64x64 RGB):
#   1. write the digits folders into DIGITS_DIR (train/ and val/, ImageNet layout) unless they exist,
#   2. train cfgs/demo/flatten_swin_digits.yaml (validating every epoch),
#   3. evaluate the saved final checkpoint with --eval --resume (its files go to <run>/eval/).
# Usage: tools/demo.sh DIGITS_DIR [OUTPUT_ROOT]   (env: PY=python3, OMP_NUM_THREADS=2)
# Rerunning continues (auto-resume) or, when training is complete, only re-evaluates.
set -euo pipefail
cd "$(dirname "$0")/.."

DIGITS="${1:?usage: tools/demo.sh DIGITS_DIR [OUTPUT_ROOT]}"
OUT="${2:-output}"
PY="${PY:-python3}"
CFG=cfgs/demo/flatten_swin_digits.yaml
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"

if [ ! -d "$DIGITS/train" ] || [ ! -d "$DIGITS/val" ]; then
    "$PY" -m data.digits "$DIGITS"
fi

start=$(date +%s)
"$PY" main.py --cfg "$CFG" --data-path "$DIGITS" --output "$OUT" --tag demo
trained=$(date +%s)

RUN="$OUT/flatten_swin_digits/demo"
CKPT=$(ls "$RUN"/ckpt_epoch_*.pth | sed 's/.*ckpt_epoch_\([0-9]*\)\.pth/\1 &/' | sort -n | tail -1 | cut -d' ' -f2)
"$PY" main.py --cfg "$CFG" --data-path "$DIGITS" --output "$OUT" --tag demo_eval --eval --resume "$CKPT"
done_at=$(date +%s)

echo "---- demo summary"
echo "training (with per-epoch validation): $((trained - start)) s; evaluation of $CKPT: $((done_at - trained)) s"
grep -h ' \* Acc@1' "$RUN/log_rank0.txt" | tail -1 | sed 's/.*\*/last training epoch:/'
grep -h ' \* Acc@1' "$OUT/flatten_swin_digits/demo_eval/eval/log_rank0.txt" | tail -1 | sed 's/.*\*/--eval --resume:/'
