#!/usr/bin/env bash
# The test command: installs what is missing, checks the import contract (pyproject.toml [tool.importlinter]), then
# runs the whole suite (CPU, gloo). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
"${PYTHON:-python3}" -c "from importlinter.cli import lint_imports_command; lint_imports_command()"
exec "${PYTHON:-python3}" -m pytest -q -p no:cacheprovider "$@"
