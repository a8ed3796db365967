#!/usr/bin/env bash
# Runs the test suite on CPU with 8 fake devices (set in tests/conftest.py),
# after setting up ./.venv with the test extras. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh --test
exec .venv/bin/python -m pytest -n 2 --dist loadfile -q "$@"
