#!/usr/bin/env bash
# The test command: installs what is missing, then runs the whole suite (CPU, gloo). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
exec "${PYTHON:-python3}" -m pytest -q -p no:cacheprovider "$@"
