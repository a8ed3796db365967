"""Tests for the Cloud TPU VM launchers in scripts/tpu/.

The scripts run under bash with a PATH that holds no real gcloud: either an empty folder
(--dry-run must work and a real run must refuse) or a folder with a fake `gcloud` that logs
its argv, so the describe-then-create/delete logic runs for real and what --dry-run prints
can be compared with what is actually executed.
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import shutil
import subprocess
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
TPU_DIR = REPO / "scripts" / "tpu"
BASH = shutil.which("bash") or "/bin/bash"
TPU = ["--name", "tpu-a", "--zone", "us-central2-b"]
PREFIX = "gcloud compute tpus tpu-vm"
# Arguments that satisfy each script's own required flags.
SCRIPT_ARGS = {"create.sh": ["--accelerator-type", "v4-32"], "install.sh": [], "logs.sh": [],
               "train.sh": ["--gin-file", "gin/runs/r.gin", "--model-dir", "gs://b/m"],
               "delete.sh": []}
SCRIPTS = sorted(SCRIPT_ARGS)
FAKE_GCLOUD = """#!{bash}
for a in "$@"; do printf '%s\\x1f' "$a"; done >> "$FAKE_GCLOUD_LOG"
printf '\\n' >> "$FAKE_GCLOUD_LOG"
if [[ "$4" == describe && "${{FAKE_TPU_EXISTS:-0}}" != 1 ]]; then
  echo "ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND" >&2
  exit 1
fi
"""


def run_script(name: str, *args: str, path: pathlib.Path, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess[str]:
  return subprocess.run([BASH, str(TPU_DIR / name), *args], capture_output=True, text=True,
                        env={"PATH": str(path), "HOME": str(path), **(env or {})}, timeout=30,
                        check=False)


@pytest.fixture
def bare_path(tmp_path: pathlib.Path) -> pathlib.Path:
  """A PATH entry with nothing in it: no gcloud, no coreutils."""
  empty = tmp_path / "empty_bin"
  empty.mkdir()
  return empty


@pytest.fixture
def fake_gcloud(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  """(PATH folder holding a fake gcloud, the file it logs each call's argv to)."""
  bin_dir = tmp_path / "fake_bin"
  bin_dir.mkdir()
  shim = bin_dir / "gcloud"
  shim.write_text(FAKE_GCLOUD.format(bash=BASH))
  shim.chmod(0o755)
  return bin_dir, tmp_path / "gcloud_calls.log"


def calls(log: pathlib.Path) -> list[list[str]]:
  """The argv of each fake gcloud call, in order."""
  lines = log.read_text().splitlines() if log.exists() else []
  return [["gcloud", *line.split("\x1f")[:-1]] for line in lines]


def dry_run(name: str, *args: str, path: pathlib.Path) -> list[str]:
  result = run_script(name, "--dry-run", *TPU, *args, path=path)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines and all(line.startswith(PREFIX + " ") for line in lines), lines
  return lines


def ssh_command(line: str) -> str:
  """The --command value of a printed `gcloud ... ssh` line."""
  argv = shlex.split(line)
  assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"], argv
  return argv[argv.index("--command") + 1]


def test_create_dry_run_prints_describe_then_create(bare_path):
  assert dry_run("create.sh", "--accelerator-type", "v4-32", path=bare_path) == [
      f"{PREFIX} describe tpu-a --zone us-central2-b",
      f"{PREFIX} create tpu-a --zone us-central2-b --accelerator-type v4-32"
      " --version tpu-ubuntu2204-base",
  ]


def test_create_dry_run_project_version_and_extra_flags(bare_path):
  args = ["--accelerator-type", "v4-8", "--version", "rt-x", "--project", "p1"]
  assert dry_run("create.sh", *args, "--", "--spot", path=bare_path) == [
      f"{PREFIX} describe tpu-a --zone us-central2-b --project p1",
      f"{PREFIX} create tpu-a --zone us-central2-b --accelerator-type v4-8"
      " --version rt-x --spot --project p1",
  ]


def test_delete_dry_run_prints_describe_then_delete(bare_path):
  assert dry_run("delete.sh", path=bare_path) == [
      f"{PREFIX} describe tpu-a --zone us-central2-b",
      f"{PREFIX} delete tpu-a --zone us-central2-b --quiet",
  ]


@pytest.mark.parametrize("name", SCRIPTS)
def test_missing_name_is_one_line_error(name, bare_path):
  result = run_script(name, "--zone", "z", *SCRIPT_ARGS[name], "--dry-run", path=bare_path)
  assert (result.returncode, result.stdout) == (2, "")
  assert result.stderr == f"{name}: error: --name is required (see --help)\n"


@pytest.mark.parametrize("name", SCRIPTS)
def test_without_gcloud_refuses_to_run(name, bare_path):
  result = run_script(name, *TPU, *SCRIPT_ARGS[name], path=bare_path)
  assert (result.returncode, result.stdout) == (2, "")
  assert len(result.stderr.splitlines()) == 1
  assert result.stderr.startswith(f"{name}: error: gcloud not found on PATH")


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(name, bare_path):
  result = run_script(name, "--help", path=bare_path)
  assert result.returncode == 0
  assert result.stdout.startswith(f"Usage: {name} --name NAME --zone ZONE")
  assert "--dry-run" in result.stdout


@pytest.mark.parametrize(("name", "args", "message"), [
    ("create.sh", [], "--accelerator-type is required"),
    ("train.sh", ["--model-dir", "gs://b/m"], "--gin-file is required"),
    ("train.sh", ["--gin-file", "g.gin"], "--model-dir is required"),
    ("train.sh", ["--gin-file", "g.gin", "--model-dir", "/tmp/m"], "must be a gs://"),
    ("logs.sh", ["--worker", "x"], "--worker must be a non-negative integer"),
    ("install.sh", ["--remote-dir", "a b"], "--remote-dir must be a plain path"),
    ("install.sh", ["--bogus"], "unknown argument '--bogus'"),
    ("delete.sh", ["--zone"], "--zone needs a value"),
])
def test_invalid_arguments(name, args, message, bare_path):
  result = run_script(name, *TPU, "--dry-run", *args, path=bare_path)
  assert result.returncode == 2
  assert len(result.stderr.splitlines()) == 1
  assert message in result.stderr


def test_train_keeps_gin_quoting_and_passthrough(bare_path):
  extra = ["--gin.TRAIN_STEPS=7", "--gin.MIXTURE_OR_TASK_NAME='my task'"]
  (line,) = dry_run("train.sh", *SCRIPT_ARGS["train.sh"], "--", *extra, path=bare_path)
  assert shlex.split(line)[5:9] == ["tpu-a", "--zone", "us-central2-b", "--worker=all"]
  command = ssh_command(line)
  assert "--gin.MODEL_DIR=\"'gs://b/m'\"" in command
  assert "--gin.MIXTURE_OR_TASK_NAME=\"'my task'\"" in command
  assert "nohup .venv/bin/python3 -m perceiver_ar_t5x.train " in command
  assert "> logs/train-$(hostname).log 2>&1" in command
  # What the remote shell hands the binary: gin sees the quoted strings, overrides last.
  words = shlex.split(command)
  start = words.index("-m")
  assert words[start:start + 8] == [
      "-m", "perceiver_ar_t5x.train", "--gin_file=gin/runs/r.gin",
      "--gin.MODEL_DIR='gs://b/m'", "--gin_search_paths=gin", "--multiprocess", *extra]


def test_train_options(bare_path):
  args = ["--gin-file", "a.gin", "--gin-file", "b.gin", "--model-dir", "gs://b/m",
          "--gin-search-paths", "gin,.", "--no-multiprocess", "--remote-dir", "w/repo"]
  (line,) = dry_run("train.sh", *args, path=bare_path)
  command = ssh_command(line)
  assert command.startswith("cd w/repo && ")
  assert "--gin_file=a.gin --gin_file=b.gin " in command
  assert "--gin_search_paths=gin,." in command
  assert "--multiprocess" not in command


def test_train_remote_command_runs_once_per_host(tmp_path):
  """Fake $HOME: argv arrives intact (waited for: the file exists before printf fills it)."""
  (line,) = dry_run("train.sh", *SCRIPT_ARGS["train.sh"], "--", "--gin.X='a b'", path=tmp_path)
  home = tmp_path / "home"
  venv_bin = home / "perceiver_ar_t5x" / ".venv" / "bin"
  venv_bin.mkdir(parents=True)
  argv_file = home / "argv.txt"
  fake_python = venv_bin / "python3"
  fake_python.write_text(f"#!{BASH}\nprintf '%s\\n' \"$@\" > {argv_file}\nexec sleep 60\n")
  fake_python.chmod(0o755)
  pid_file = home / "perceiver_ar_t5x" / "logs" / "train.pid"

  def remote() -> str:
    return subprocess.run([BASH, "-c", ssh_command(line)], cwd=home, capture_output=True,
                          env={**os.environ, "HOME": str(home)}, text=True, timeout=30,
                          check=True).stdout

  assert "started pid" in remote()
  pid = int(pid_file.read_text())
  try:
    deadline = time.monotonic() + 10
    while not (argv_file.exists() and argv_file.read_text()) and time.monotonic() < deadline:
      time.sleep(0.05)
    assert argv_file.read_text().splitlines() == [
        "-m", "perceiver_ar_t5x.train", "--gin_file=gin/runs/r.gin",
        "--gin.MODEL_DIR='gs://b/m'", "--gin_search_paths=gin", "--multiprocess",
        "--gin.X='a b'"]
    assert "training already running" in remote()
    assert int(pid_file.read_text()) == pid
    assert len(list((home / "perceiver_ar_t5x" / "logs").glob("train-*.log"))) == 1
  finally:
    os.kill(pid, 15)


def test_logs_dry_run(bare_path):
  assert dry_run("logs.sh", path=bare_path) == [
      f"{PREFIX} ssh tpu-a --zone us-central2-b --worker=0"
      " --command 'tail -n 100 perceiver_ar_t5x/logs/train-$(hostname).log'"]
  (line,) = dry_run("logs.sh", "--worker", "3", "--lines", "20", "--follow", path=bare_path)
  assert "--worker=3" in shlex.split(line)
  assert ssh_command(line) == "tail -n 20 -F perceiver_ar_t5x/logs/train-$(hostname).log"


def test_install_dry_run_copies_local_tree(bare_path):
  prepare, copy, install = dry_run("install.sh", path=bare_path)
  assert prepare.startswith(f"{PREFIX} ssh tpu-a --zone us-central2-b --worker=all --command ")
  assert ssh_command(prepare).startswith("mkdir -p perceiver_ar_t5x && cd perceiver_ar_t5x && ")
  argv = shlex.split(copy)
  assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse"]
  assert argv[-4:] == ["tpu-a:perceiver_ar_t5x", "--zone", "us-central2-b", "--worker=all"]
  sources = argv[6:-4]
  assert str(REPO / "perceiver_ar_t5x") in sources
  assert all(pathlib.Path(s).parent == REPO and pathlib.Path(s).exists() for s in sources)
  assert not {".venv", ".git"} & {pathlib.Path(s).name for s in sources}
  command = ssh_command(install)
  assert command.startswith("cd perceiver_ar_t5x && ")
  assert "-c requirements/pins.txt -e . 'jax[tpu]==0.10.2'" in command


def test_install_dry_run_clones_repo(bare_path):
  args = ["--repo-url", "https://example.com/r.git", "--branch", "dev", "--project", "p"]
  clone, install = dry_run("install.sh", *args, path=bare_path)
  assert shlex.split(clone)[-2:] == ["--project", "p"]
  command = ssh_command(clone)
  assert "git clone --quiet --branch dev https://example.com/r.git perceiver_ar_t5x" in command
  assert "fetch --quiet origin dev" in command
  assert "jax[tpu]" in ssh_command(install)


def test_install_jax_version_matches_pins():
  pins = (REPO / "requirements" / "pins.txt").read_text()
  pinned = re.search(r"^jax==(\S+)$", pins, re.MULTILINE)
  script = re.search(r'^JAX_VERSION="(\S+)"$', (TPU_DIR / "install.sh").read_text(), re.M)
  assert pinned and script and pinned.group(1) == script.group(1)


@pytest.mark.parametrize(("name", "exists", "verbs"), [
    ("create.sh", False, ["describe", "create"]),
    ("create.sh", True, ["describe"]),
    ("delete.sh", True, ["describe", "delete"]),
    ("delete.sh", False, ["describe"]),
])
def test_idempotent_with_fake_gcloud(name, exists, verbs, fake_gcloud):
  bin_dir, log = fake_gcloud
  env = {"FAKE_GCLOUD_LOG": str(log), "FAKE_TPU_EXISTS": "1" if exists else "0"}
  result = run_script(name, *TPU, *SCRIPT_ARGS[name], path=bin_dir, env=env)
  assert result.returncode == 0, result.stderr
  made = calls(log)
  assert [argv[4] for argv in made] == verbs
  assert all(argv[5:8] == ["tpu-a", "--zone", "us-central2-b"] for argv in made)
  if len(verbs) == 1:
    assert "not creating" in result.stderr or "nothing to delete" in result.stderr


@pytest.mark.parametrize("name", SCRIPTS)
def test_dry_run_prints_what_runs(name, fake_gcloud):
  """Each printed line, parsed as shell, is the argv a real run passes to gcloud."""
  bin_dir, log = fake_gcloud
  args = [*TPU, *SCRIPT_ARGS[name], "--project", "p"]
  if name == "train.sh":
    args += ["--", "--gin.X=\"'q'\"", "--gin.Y=$HOME"]
  env = {"FAKE_GCLOUD_LOG": str(log), "FAKE_TPU_EXISTS": "1" if name == "delete.sh" else "0"}
  printed = run_script(name, "--dry-run", *args, path=bin_dir, env=env)
  assert printed.returncode == 0 and calls(log) == []
  executed = run_script(name, *args, path=bin_dir, env=env)
  assert executed.returncode == 0, executed.stderr
  assert [shlex.split(line) for line in printed.stdout.splitlines()] == calls(log)


def test_every_launcher_sources_tpu_flags():  # STYLE: no common.sh, name the concept
  assert not (TPU_DIR / "common.sh").exists()
  for name in SCRIPTS:
    assert 'source "$here/tpu_flags.sh"' in (TPU_DIR / name).read_text()


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck():
  scripts = sorted(str(p) for p in TPU_DIR.glob("*.sh"))
  result = subprocess.run(["shellcheck", "-x", *scripts], capture_output=True, text=True,
                          check=False)
  assert result.returncode == 0, result.stdout
