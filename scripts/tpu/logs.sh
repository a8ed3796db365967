#!/usr/bin/env bash
# Show the training log of one TPU host (written by train.sh).
set -euo pipefail
here="${BASH_SOURCE[0]%/*}"; [[ "$here" != "${BASH_SOURCE[0]}" ]] || here=.
# shellcheck source=tpu_flags.sh source-path=SCRIPTDIR
source "$here/tpu_flags.sh"

REMOTE_DIR="perceiver_ar_t5x"  # as in install.sh / train.sh

USAGE="Usage: ${0##*/} --name NAME --zone ZONE [--worker N] [--lines N] [--follow]
          [--remote-dir DIR] [--project PROJECT] [--dry-run]

Prints the last N lines (default 100) of ~/DIR/logs/train-\$(hostname).log on host N
(--worker, default 0; host 0 is where jax.process_index() == 0). --follow keeps tailing."

worker=0 lines=100 follow=0
parse_tpu_flags "$@"
set -- ${SCRIPT_ARGS[@]+"${SCRIPT_ARGS[@]}"}
while (($#)); do
  case "$1" in
    --worker | --lines | --remote-dir)
      (($# >= 2)) || die "$1 needs a value"
      case "$1" in
        --worker) worker="$2" ;;
        --lines) lines="$2" ;;
        --remote-dir) REMOTE_DIR="$2" ;;
      esac
      shift ;;
    --follow) follow=1 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done
((${#PASSTHROUGH[@]} == 0)) || die "unexpected arguments after '--' (see --help)"
require_tpu
require_int --worker "$worker"
require_int --lines "$lines"
require_remote_dir

tail_flags="-n $lines"
((follow == 0)) || tail_flags+=" -F"
tpu_ssh "$worker" "tail $tail_flags $REMOTE_DIR/logs/train-\$(hostname).log"
