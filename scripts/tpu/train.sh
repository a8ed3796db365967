#!/usr/bin/env bash
# Start perceiver_ar_t5x.train on every host of a TPU VM, detached (nohup); safe to rerun.
set -euo pipefail
here="${BASH_SOURCE[0]%/*}"; [[ "$here" != "${BASH_SOURCE[0]}" ]] || here=.
# shellcheck source=tpu_flags.sh source-path=SCRIPTDIR
source "$here/tpu_flags.sh"

REMOTE_DIR="perceiver_ar_t5x"  # as in install.sh; relative to $HOME on each host

USAGE="Usage: ${0##*/} --name NAME --zone ZONE --gin-file FILE [--gin-file FILE...]
          --model-dir gs://BUCKET/DIR [--gin-search-paths PATHS] [--remote-dir DIR]
          [--no-multiprocess] [--project PROJECT] [--dry-run] [-- --gin.X=Y ...]

On every host (--worker=all), in ~/DIR (default $REMOTE_DIR), runs with nohup
  .venv/bin/python3 -m perceiver_ar_t5x.train --gin_file=FILE --gin.MODEL_DIR=\"'gs://...'\"
      --gin_search_paths=PATHS (default gin) --multiprocess [args after --]
logging to DIR/logs/train-\$(hostname).log (one file per host; see logs.sh) and
skipping hosts where the run in DIR/logs/train.pid is still alive.
--multiprocess makes the binary call jax.distributed.initialize(), which auto-detects the
TPU pod slice; it is harmless on a single host. MODEL_DIR must be gs:// (shared by hosts).
Gin overrides after '--' are passed as given; quote string values for gin, e.g.
  -- --gin.TRAIN_STEPS=1000 --gin.MIXTURE_OR_TASK_NAME=\"'my_task'\""

gin_files=() model_dir="" search_paths="gin" multiprocess=1
parse_tpu_flags "$@"
set -- ${SCRIPT_ARGS[@]+"${SCRIPT_ARGS[@]}"}
while (($#)); do
  case "$1" in
    --gin-file | --model-dir | --gin-search-paths | --remote-dir)
      (($# >= 2)) || die "$1 needs a value"
      case "$1" in
        --gin-file) gin_files+=("$2") ;;
        --model-dir) model_dir="$2" ;;
        --gin-search-paths) search_paths="$2" ;;
        --remote-dir) REMOTE_DIR="$2" ;;
      esac
      shift ;;
    --no-multiprocess) multiprocess=0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done
require_tpu
((${#gin_files[@]})) || die "--gin-file is required, e.g. --gin-file gin/runs/NAME.gin (see --help)"
[[ -n "$model_dir" ]] || die "--model-dir is required, e.g. --model-dir gs://BUCKET/DIR (see --help)"
[[ "$model_dir" == gs://?* ]] || die "--model-dir must be a gs:// path that every host can reach, got '$model_dir'"
[[ "$model_dir" != *[\'\"]* ]] || die "--model-dir must not contain quotes, got '$model_dir'"
require_remote_dir

argv=(.venv/bin/python3 -m perceiver_ar_t5x.train)
for f in "${gin_files[@]}"; do argv+=("--gin_file=$f"); done
argv+=("--gin.MODEL_DIR='$model_dir'" "--gin_search_paths=$search_paths")
((multiprocess == 0)) || argv+=(--multiprocess)
argv+=(${PASSTHROUGH[@]+"${PASSTHROUGH[@]}"})

dir="$REMOTE_DIR"
pid="logs/train.pid" log="logs/train-\$(hostname).log"
tpu_ssh all "cd $dir && mkdir -p logs && if [ -f $pid ] && kill -0 \"\$(cat $pid)\" 2>/dev/null; then echo \"\$(hostname): training already running (pid \$(cat $pid)); not starting another\"; else nohup $(shell_quote "${argv[@]}") > $log 2>&1 < /dev/null & echo \$! > $pid; echo \"\$(hostname): started pid \$(cat $pid), log $REMOTE_DIR/$log\"; fi"
