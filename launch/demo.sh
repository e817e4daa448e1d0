#!/usr/bin/env bash
# The main job on a fresh machine: installs what is missing, prints the paper configurations' parameter counts,
# then benchmarks the AoE, MoE and dense FFN layers side by side (`aoe-ep bench layer`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
aoe-ep params paper/moe_732m paper/aoe_732m paper/moe_4b paper/aoe_4b self_routing_732m
aoe-ep bench layer "$@"
