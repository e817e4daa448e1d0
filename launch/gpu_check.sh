#!/usr/bin/env bash
# GPU checks on one CUDA machine, in about 6 minutes: the `gpu` tests, `aoe-ep bench layer --device cuda --dtype
# bfloat16`, tokens/s and MFU of the tiny model and of a 4-layer 732M-shaped AoE and MoE, the routed MoE layer
# against megatron-core's MoELayer, and the levers in bf16 (activation checkpointing none/selective/full and compiled
# blocks: tokens/s, kept activation bytes, peak memory; about a minute, most of it compiling). Writes gpu_check.json
# and the logs under $OUT (or the first argument), prints a short table last. Uses the Python and torch already there, installs nothing from the network: a megatron-core
# wheel in .whl/ (pip download --no-deps --only-binary=:all: --python-version 3.12 --platform
# manylinux_2_28_x86_64 megatron-core==0.16.1 -d .whl) is installed with --no-deps when it is missing.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${1:-${OUT:-runs/gpu-check}}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import megatron.core" >/dev/null 2>&1; then
  if ls .whl/megatron_core-*.whl >/dev/null 2>&1; then
    SITE=$(mktemp -d)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/megatron_core-*.whl \
      && export PYTHONPATH="$PYTHONPATH:$SITE"
  else
    echo "gpu_check: megatron-core is not installed and no wheel is in .whl/" >&2
  fi
fi
"$PY" - <<'PY'
import importlib
missing = [m for m in ("torch", "megatron.core", "yaml", "tqdm", "tensorboard", "numpy") if importlib.util.find_spec(m) is None]
if missing:
    raise SystemExit(f"gpu_check: missing {missing}")
import torch
print(f"gpu_check: torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}")
PY
exec timeout 480 "$PY" -m aoe_ep.bench.gpu_check "$OUT_DIR" "${@:2}"
