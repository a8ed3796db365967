# shellcheck shell=bash disable=SC2034  # globals here are read by the scripts that source this
# Shared by the Cloud TPU VM launchers in scripts/tpu/ (sourced, never run on its own).
#
# Every launcher takes the same TPU flags, validates them with one-line errors (exit 2),
# and sends each gcloud call through `run`, which with --dry-run prints the command as one
# shell-quoted line on stdout (copy-paste safe, parseable with Python's shlex.split) instead
# of executing it. Only bash builtins are used here, so --dry-run works on a bare PATH.
# Usage: source tpu_flags.sh; USAGE="..."; parse_tpu_flags "$@"; then read the globals below.

TPU_NAME=""
ZONE=""
PROJECT=""
ACCELERATOR_TYPE=""
RUNTIME_VERSION="tpu-ubuntu2204-base"
DRY_RUN=0
SCRIPT_ARGS=()   # flags the calling script parses itself, in order
PASSTHROUGH=()   # everything after a bare `--`

die() {  # One line on stderr, exit 2 (usage / environment error).
  echo "${0##*/}: error: $*" >&2
  exit 2
}

note() {  # Progress message on stderr, so stdout stays the command list under --dry-run.
  echo "${0##*/}: $*" >&2
}

COMMON_USAGE="TPU flags:
  --name NAME               TPU VM name (required)
  --zone ZONE               e.g. us-central2-b (required)
  --project PROJECT         GCP project (default: gcloud's configured project)
  --accelerator-type TYPE   e.g. v4-32 (create.sh only)
  --version RUNTIME         TPU VM runtime (default: tpu-ubuntu2204-base)
  --dry-run                 print the gcloud commands, one per line, and run nothing
  -h, --help                show this help"

usage() {
  printf '%s\n\n%s\n' "$USAGE" "$COMMON_USAGE"
}

parse_tpu_flags() {  # Sets the globals above; unknown flags go to SCRIPT_ARGS.
  while (($#)); do
    case "$1" in
      -h | --help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1 ;;
      --name | --zone | --project | --accelerator-type | --version)
        (($# >= 2)) || die "$1 needs a value"
        case "$1" in
          --name) TPU_NAME="$2" ;;
          --zone) ZONE="$2" ;;
          --project) PROJECT="$2" ;;
          --accelerator-type) ACCELERATOR_TYPE="$2" ;;
          --version) RUNTIME_VERSION="$2" ;;
        esac
        shift ;;
      --name=* | --zone=* | --project=* | --accelerator-type=* | --version=*)
        parse_tpu_flags "${1%%=*}" "${1#*=}" ;;
      --) shift; PASSTHROUGH=("$@"); break ;;
      *) SCRIPT_ARGS+=("$1") ;;
    esac
    shift
  done
}

require_tpu() {  # Call after the script's own parsing; checks what every launcher needs.
  [[ -n "$TPU_NAME" ]] || die "--name is required (see --help)"
  [[ -n "$ZONE" ]] || die "--zone is required (see --help)"
  ((DRY_RUN)) || command -v gcloud >/dev/null 2>&1 \
    || die "gcloud not found on PATH; install the Google Cloud SDK (https://cloud.google.com/sdk/docs/install) or use --dry-run"
}

shell_quote() {  # Quote each arg for a POSIX shell; `--flag=value` keeps `--flag=` bare.
  local arg out=() q="'" flag dq_special='["$`\\!]'
  for arg in "$@"; do
    flag=""
    if [[ "$arg" =~ ^(--?[A-Za-z0-9_.-]+=)(.+)$ ]]; then
      flag="${BASH_REMATCH[1]}"
      arg="${BASH_REMATCH[2]}"
    fi
    if [[ "$arg" =~ ^[A-Za-z0-9_./:,@%+=-]+$ ]]; then
      out+=("$flag$arg")
    elif [[ "$arg" != *"$q"* ]]; then
      out+=("$flag'$arg'")
    elif [[ ! "$arg" =~ $dq_special ]]; then
      out+=("$flag\"$arg\"")  # e.g. --gin.MODEL_DIR="'gs://b/m'"
    else
      out+=("$flag'${arg//$q/$q\\$q$q}'")
    fi
  done
  local IFS=" "
  echo "${out[*]}"
}

run() {  # Print (--dry-run) or trace to stderr and execute one command.
  if ((DRY_RUN)); then
    shell_quote "$@"
  else
    echo "+ $(shell_quote "$@")" >&2
    "$@"
  fi
}

tpu_cmd() {  # The argv of `gcloud compute tpus tpu-vm VERB ARGS... [--project P]`.
  local verb="$1"
  shift
  TPU_ARGV=(gcloud compute tpus tpu-vm "$verb" "$@")
  [[ -z "$PROJECT" ]] || TPU_ARGV+=(--project "$PROJECT")
}

tpu_run() {  # run `gcloud compute tpus tpu-vm VERB ARGS...`.
  tpu_cmd "$@"
  run "${TPU_ARGV[@]}"
}

tpu_exists() {  # True if the TPU VM exists. Under --dry-run: print the check, answer no.
  tpu_cmd describe "$TPU_NAME" --zone "$ZONE"
  if ((DRY_RUN)); then
    shell_quote "${TPU_ARGV[@]}"
    return 1
  fi
  echo "+ $(shell_quote "${TPU_ARGV[@]}")" >&2
  "${TPU_ARGV[@]}" >/dev/null 2>&1
}

tpu_ssh() {  # tpu_ssh WORKER COMMAND: run COMMAND in the login shell of WORKER ("all" = every host).
  tpu_run ssh "$TPU_NAME" --zone "$ZONE" "--worker=$1" --command "$2"
}

require_int() {  # require_int FLAG VALUE
  [[ "$2" =~ ^[0-9]+$ ]] || die "$1 must be a non-negative integer, got '$2'"
}

require_remote_dir() {  # REMOTE_DIR goes unquoted into remote commands: keep it plain.
  [[ "$REMOTE_DIR" =~ ^[A-Za-z0-9_][A-Za-z0-9_./-]*$ ]] \
    || die "--remote-dir must be a plain path relative to \$HOME (letters, digits, _ . / -), got '$REMOTE_DIR'"
}
