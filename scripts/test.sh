#!/usr/bin/env bash
# The test suite: installs what it needs, then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python3 -m ruff check relion_dynamight tests scripts   # lint (pyproject.toml [tool.ruff])
python3 -m mypy                                        # types of relion_dynamight/ (pyproject.toml [tool.mypy])
python3 -m pytest tests -q -ra "$@"
