#!/usr/bin/env bash
# Creates ./.venv with the pinned dependencies (idempotent: a stamp records the
# hash of the requirement files, so a second run does nothing).
# Usage: bash scripts/setup_env.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1
files=(requirements/pins.txt)
(( want_test )) && files+=(requirements/test.txt)
stamp=".venv/.installed-$(cat "${files[@]}" setup.py | sha256sum | cut -c1-16)"
if [[ -f "$stamp" ]]; then
  exit 0
fi
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup_env: error: Python >= 3.11 is required ($PY is $("$PY" -V 2>&1))" >&2
  exit 2
fi
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
echo "setup_env: installing pinned dependencies into .venv (first run: a few minutes)" >&2
.venv/bin/pip install -q --disable-pip-version-check "${files[@]/#/-r}"
.venv/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . \
  || .venv/bin/pip install -q --disable-pip-version-check --no-deps -e .
touch "$stamp"
