#!/usr/bin/env bash
# Runs one benchmark from a clean clone: sets up ./.venv (idempotent), then
# benchmarks/<name>.py with the remaining arguments. Results land in benchmarks/results/.
# Usage: bash scripts/benchmark.sh decode|train_throughput|machine|length_sharding_memory [args]
set -euo pipefail
cd "$(dirname "$0")/.."
name="${1:-}"
if [[ -z "$name" || ! -f "benchmarks/$name.py" || "$name" == decode_peer ]]; then
  echo "benchmark: error: name one of: $(ls benchmarks/*.py | xargs -n1 basename | sed 's/\.py$//' | grep -v '^decode_peer$' | tr '\n' ' ')" >&2
  exit 2
fi
shift
bash scripts/setup_env.sh
exec .venv/bin/python "benchmarks/$name.py" "$@"
