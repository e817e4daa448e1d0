#!/usr/bin/env bash
# The test command: installs what is missing, checks lint and format (ruff) and the import contract (pyproject.toml
# [tool.ruff], [tool.importlinter]), then runs the whole suite (CPU, gloo). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
"${PYTHON:-python3}" -m ruff check aoe_ep tests
"${PYTHON:-python3}" -m ruff format --check aoe_ep tests
"${PYTHON:-python3}" -c "from importlinter.cli import lint_imports_command; lint_imports_command()"
exec "${PYTHON:-python3}" -m pytest -q -p no:cacheprovider "$@"
