#!/usr/bin/env bash
# Delete a Cloud TPU VM; a no-op if it does not exist.
set -euo pipefail
here="${BASH_SOURCE[0]%/*}"; [[ "$here" != "${BASH_SOURCE[0]}" ]] || here=.
# shellcheck source=tpu_flags.sh source-path=SCRIPTDIR
source "$here/tpu_flags.sh"

USAGE="Usage: ${0##*/} --name NAME --zone ZONE [--project PROJECT] [--dry-run]

Runs 'gcloud compute tpus tpu-vm describe' and, only if the TPU VM exists,
'gcloud compute tpus tpu-vm delete --quiet' (no prompt). Checkpoints in gs:// stay."

parse_tpu_flags "$@"
((${#SCRIPT_ARGS[@]} == 0)) || die "unknown argument '${SCRIPT_ARGS[0]}' (see --help)"
((${#PASSTHROUGH[@]} == 0)) || die "unexpected arguments after '--' (see --help)"
require_tpu

if ((DRY_RUN)); then
  tpu_exists || true  # print the check; the delete below is what would follow
elif ! tpu_exists; then
  note "TPU VM '$TPU_NAME' not found in $ZONE; nothing to delete"
  exit 0
fi
tpu_run delete "$TPU_NAME" --zone "$ZONE" --quiet
