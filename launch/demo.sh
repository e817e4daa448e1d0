#!/usr/bin/env bash
# The main job on a fresh machine: installs what is missing, then trains the tiny AoE model on the built-in corpus
# (this Python's standard library sources, byte tokenizer) on CPU in a few minutes. It shows a progress bar, prints
# the validation loss every 100 steps (from about 6.1 at step 0 to about 1.5), and writes tensorboard events, a JSON log
# and checkpoints under runs/tiny-demo-<time>/ (OUT_DIR overrides). Extra arguments go to `aoe-ep train`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
OUT_DIR=${OUT_DIR:-runs/tiny-demo-$(date +%Y%m%d-%H%M%S)}
aoe-ep train --config tiny --set train.out_dir="$OUT_DIR" "$@"
echo "continue an interrupted run: aoe-ep train --config tiny --set train.out_dir=$OUT_DIR --resume"
echo "curves:                     tensorboard --logdir $OUT_DIR/tb"
echo "load report:                aoe-ep report $OUT_DIR"
