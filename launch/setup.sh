#!/usr/bin/env bash
# Installs aoe-ep and what it needs into the current Python, once; safe to run again.
# torch is installed first and pinned, so that megatron-core's `torch` requirement does not pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# tcmalloc keeps freed pages, so fresh weight gradients are not page-faulted in every step (aoe_ep/cpu_allocator.py);
# optional: without it aoe-ep runs glibc with its mmap path off. Installed only where apt can do it unattended.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && ! ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal; then
  (apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1 \
   || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1; }) \
   || echo "setup: libtcmalloc-minimal4 not installed; aoe-ep will use glibc with mmap off" >&2
fi
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q "torch==${AOE_EP_TORCH_VERSION:-2.13.0}"
fi
# The build backend in this Python, not only in pip's isolated build environments: tests/test_install.py builds a wheel
# with no network (--no-build-isolation), and setuptools >= 70.1 builds wheels without the separate `wheel` package.
if ! "$PY" -c "import setuptools, sys; sys.exit(tuple(map(int, setuptools.__version__.split('.')[:2])) < (70, 1))" \
     >/dev/null 2>&1; then
  "$PY" -m pip install -q "setuptools>=70.1"
fi
# The `eval` extra too, so that the lm-evaluation-harness tests (tests/eval/test_harness.py, test_hf_harness.py) run.
if ! "$PY" -c "import aoe_ep, megatron.core, tensorboard, yaml, tqdm, matplotlib, pytest, tokenizers, sentencepiece, transformers, safetensors, importlinter, lm_eval, accelerate" >/dev/null 2>&1 \
   || ! "$PY" -m ruff --version >/dev/null 2>&1 \
   || ! command -v aoe-ep >/dev/null 2>&1; then
  "$PY" -m pip install -q -e ".[test,eval]"
fi
