#!/usr/bin/env bash
# Create a Cloud TPU VM (a single host or a pod slice); a no-op if it already exists.
set -euo pipefail
here="${BASH_SOURCE[0]%/*}"; [[ "$here" != "${BASH_SOURCE[0]}" ]] || here=.
# shellcheck source=tpu_flags.sh source-path=SCRIPTDIR
source "$here/tpu_flags.sh"

USAGE="Usage: ${0##*/} --name NAME --zone ZONE --accelerator-type TYPE [--version RUNTIME]
          [--project PROJECT] [--dry-run] [-- EXTRA_CREATE_FLAGS...]

Runs 'gcloud compute tpus tpu-vm describe' and, only if that fails (not found),
'gcloud compute tpus tpu-vm create'. Flags after '--' go to create verbatim
(e.g. -- --spot, -- --reserved, -- --network=NET)."

parse_tpu_flags "$@"
((${#SCRIPT_ARGS[@]} == 0)) || die "unknown argument '${SCRIPT_ARGS[0]}' (see --help)"
require_tpu
[[ -n "$ACCELERATOR_TYPE" ]] || die "--accelerator-type is required, e.g. v4-32 (see --help)"

if tpu_exists; then
  note "TPU VM '$TPU_NAME' already exists in $ZONE; not creating it"
  exit 0
fi
tpu_run create "$TPU_NAME" --zone "$ZONE" --accelerator-type "$ACCELERATOR_TYPE" \
  --version "$RUNTIME_VERSION" ${PASSTHROUGH[@]+"${PASSTHROUGH[@]}"}
