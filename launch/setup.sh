#!/usr/bin/env bash
# Installs aoe-ep and what it needs into the current Python, once; safe to run again.
# torch is installed first and pinned, so that megatron-core's `torch` requirement does not pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q "torch==${AOE_EP_TORCH_VERSION:-2.13.0}"
fi
if ! "$PY" -c "import aoe_ep, megatron.core, tensorboard, yaml, tqdm, matplotlib, pytest, tokenizers, sentencepiece, transformers" >/dev/null 2>&1 \
   || ! command -v aoe-ep >/dev/null 2>&1; then
  "$PY" -m pip install -q -e ".[test]"
fi
