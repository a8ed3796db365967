#!/usr/bin/env bash
# Quick start: set up ./.venv, train Perceiver AR on the copy task on CPU,
# print the final eval metrics and a sample. MODEL_DIR defaults to ./runs/copy_cpu
# (delete it to start over; rerunning resumes from its checkpoints).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
MODEL_DIR="${MODEL_DIR:-$PWD/runs/copy_cpu}"
exec .venv/bin/python -m perceiver_ar_t5x.train \
  --gin_file=gin/runs/copy_cpu.gin \
  --gin.MODEL_DIR="'$MODEL_DIR'" \
  --gin_search_paths=gin "$@"
