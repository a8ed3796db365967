#!/usr/bin/env bash
# Put the repo on every host of a TPU VM and install it with jax[tpu]; safe to rerun.
set -euo pipefail
here="${BASH_SOURCE[0]%/*}"; [[ "$here" != "${BASH_SOURCE[0]}" ]] || here=.
# shellcheck source=tpu_flags.sh source-path=SCRIPTDIR
source "$here/tpu_flags.sh"

# jax[tpu] pulls the matching libtpu from PyPI. Keep JAX_VERSION equal to the jax pin in
# requirements/pins.txt (tests/scripts/test_tpu_scripts.py checks this).
JAX_VERSION="0.10.2"
# The pins (numpy 2.4, jax 0.10) need Python >= 3.11; tpu-ubuntu2204-base ships 3.10, so
# uv provides the interpreter for the repo's .venv on each host.
PYTHON_VERSION="3.11"
REMOTE_DIR="perceiver_ar_t5x"  # relative to $HOME on each host
# What a local copy sends (only paths that exist are sent; never .venv/.git): the package
# and everything its build reads (pyproject.toml [project] takes its dependencies from
# requirements/pins.txt and its readme from README.md; tests/scripts/test_install.py checks).
COPY_PATHS=(pyproject.toml setup.py README.md LICENSE requirements perceiver_ar_t5x gin)

USAGE="Usage: ${0##*/} --name NAME --zone ZONE [--project PROJECT] [--dry-run]
          [--repo-url URL [--branch BRANCH]] [--remote-dir DIR] [--python VERSION]

On every host (--worker=all): get the code into ~/DIR (default $REMOTE_DIR), then
create DIR/.venv (Python $PYTHON_VERSION via uv) and install the package editable with
'jax[tpu]==$JAX_VERSION', constrained by requirements/pins.txt.
Code: with --repo-url, git clone (or fetch + reset if already cloned) BRANCH (default
main); without it, scp --recurse this checkout's ${COPY_PATHS[*]}."

repo_url="" branch="main"
parse_tpu_flags "$@"
set -- ${SCRIPT_ARGS[@]+"${SCRIPT_ARGS[@]}"}
while (($#)); do
  case "$1" in
    --repo-url | --branch | --remote-dir | --python)
      (($# >= 2)) || die "$1 needs a value"
      case "$1" in
        --repo-url) repo_url="$2" ;;
        --branch) branch="$2" ;;
        --remote-dir) REMOTE_DIR="$2" ;;
        --python) PYTHON_VERSION="$2" ;;
      esac
      shift ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done
((${#PASSTHROUGH[@]} == 0)) || die "unexpected arguments after '--' (see --help)"
require_tpu
require_remote_dir

dir="$REMOTE_DIR"
if [[ -n "$repo_url" ]]; then
  url="$(shell_quote "$repo_url")" br="$(shell_quote "$branch")"
  tpu_ssh all "if [ -d $dir/.git ]; then git -C $dir fetch --quiet origin $br && git -C $dir reset --hard --quiet FETCH_HEAD; else git clone --quiet --branch $br $url $dir; fi"
else
  root="$(cd "$here/../.." && pwd)"
  sources=() names=()
  for p in "${COPY_PATHS[@]}"; do
    [[ ! -e "$root/$p" ]] || { sources+=("$root/$p"); names+=("$p"); }
  done
  [[ -e "$root/perceiver_ar_t5x" ]] || die "no perceiver_ar_t5x/ under $root; is this script inside the repo?"
  # Remove what is about to be copied (stale files), keep .venv and logs/.
  tpu_ssh all "mkdir -p $dir && cd $dir && rm -rf $(shell_quote "${names[@]}")"
  tpu_run scp --recurse "${sources[@]}" "$TPU_NAME:$REMOTE_DIR" --zone "$ZONE" --worker=all
fi
tpu_ssh all "cd $dir && python3 -m pip install --user --quiet --upgrade uv && { [ -x .venv/bin/python ] || python3 -m uv venv --quiet --python $(shell_quote "$PYTHON_VERSION") .venv; } && python3 -m uv pip install --quiet --python .venv/bin/python -c requirements/pins.txt -e . 'jax[tpu]==$JAX_VERSION' && .venv/bin/python -c 'import jax; print(jax.__version__)'"
