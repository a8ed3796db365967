"""The tree scripts/tpu/install.sh copies is an installable package that declares its deps.

A TPU VM gets exactly the paths install.sh sends, then `pip install -e .` with the pins as
constraints: if pyproject.toml declared no dependencies, or install.sh left out a file the
build needs, the hosts would get the package without jax/flax/seqio. Offline check:
copy the paths install.sh's --dry-run names, build and install them (not editable) into a
fresh venv whose only other packages are the already-installed pins (a view of .venv's
site-packages without this package), with `--no-index` so pip must find every declared
dependency already satisfied, then read the installed metadata and run `pip check`.
"""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import sysconfig

from packaging.requirements import Requirement

REPO = pathlib.Path(__file__).resolve().parents[2]
BASH = shutil.which("bash") or "/bin/bash"
# Entries of .venv's site-packages the fresh venv must not see: this package's own
# (editable) install, and .pth files (a path added through a .pth gets no .pth processing).
HIDDEN = ("perceiver_ar_t5x", "__editable__", "__pycache__")


def copied_paths(tmp_path: pathlib.Path) -> list[pathlib.Path]:
  """The local paths install.sh would scp to each host (from its --dry-run line)."""
  empty = tmp_path / "empty_bin"
  empty.mkdir()
  printed = subprocess.run(
      [BASH, str(REPO / "scripts" / "tpu" / "install.sh"), "--dry-run", "--name", "t",
       "--zone", "z"], capture_output=True, text=True, env={"PATH": str(empty)}, timeout=30,
      check=True).stdout.splitlines()
  (scp,) = [shlex.split(line) for line in printed if " scp " in line]
  return [pathlib.Path(p) for p in scp[6:-4]]  # between `scp --recurse` and the target


def pins(name: str) -> list[str]:
  lines = (REPO / "requirements" / name).read_text().splitlines()
  return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def dependency_view(tmp_path: pathlib.Path) -> pathlib.Path:
  """Symlinks to every installed distribution of this interpreter except this package."""
  view = tmp_path / "deps"
  view.mkdir()
  site = pathlib.Path(sysconfig.get_paths()["purelib"])
  for entry in site.iterdir():
    if not entry.name.startswith(HIDDEN) and entry.suffix != ".pth":
      (view / entry.name).symlink_to(entry)
  return view


def test_install_sh_tree_installs_with_declared_dependencies(tmp_path):
  tree = tmp_path / "tree"
  tree.mkdir()
  for path in copied_paths(tmp_path):
    copy = shutil.copytree if path.is_dir() else shutil.copy2
    copy(path, tree / path.name)
  assert (tree / "pyproject.toml").exists() and (tree / "perceiver_ar_t5x").is_dir()

  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
  python = venv / "bin" / "python"
  target_site = subprocess.run(
      [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
      capture_output=True, text=True, check=True).stdout.strip()
  (pathlib.Path(target_site) / "deps.pth").write_text(f"{dependency_view(tmp_path)}\n")

  pip = [sys.executable, "-m", "pip", "--python", str(python), "--disable-pip-version-check"]
  env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull}
  install = subprocess.run([*pip, "install", "--no-build-isolation", str(tree)], env=env,
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-3000:]
  check = subprocess.run([*pip, "check"], env=env, capture_output=True, text=True, timeout=120)
  assert check.returncode == 0, check.stdout + check.stderr

  probe = ("import importlib.metadata as m, json, perceiver_ar_t5x as p; "
           "d = m.distribution('perceiver_ar_t5x'); "
           "print(json.dumps([p.__file__, d.requires, d.metadata['Requires-Python']]))")
  out = subprocess.run([python, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                       env={"PATH": os.environ.get("PATH", "")}, check=True, timeout=120)
  init_file, requires, python_req = json.loads(out.stdout)
  assert pathlib.Path(init_file).parent.parent == pathlib.Path(target_site)  # not the repo
  assert python_req == ">=3.11"
  declared = [Requirement(r) for r in requires]
  assert [str(r) for r in declared if r.marker is None] == pins("pins.txt")
  assert [str(r).split(";")[0].strip() for r in declared if r.marker] == pins("test.txt")
  installed = pathlib.Path(init_file).parent
  shipped = sorted(str(p.relative_to(installed)) for p in installed.rglob("*.py"))
  source = sorted(str(p.relative_to(tree / "perceiver_ar_t5x"))
                  for p in (tree / "perceiver_ar_t5x").rglob("*.py"))
  assert shipped == source  # every subpackage (layers/, tasks/, convert/) is packaged
