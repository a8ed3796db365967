"""The eval binary on gin/tiny.gin checkpoints, and evaluate_checkpoint on a byte corpus."""

import json
import math
import subprocess

import jax
import numpy as np
import pytest

from perceiver_ar_t5x import checkpoints, datasets, documents, evaluation, tasks
from perceiver_ar_t5x.evaluation import ScoringMode
from tests import binaries, test_multihost
from tests.conftest import FAST_COMPILE, REPO, binary_env
from tests.test_whole_split import end_stride_1, end_stride_latents, reference_nll

pytestmark = pytest.mark.slow

CORPUS = ["ab", "a short line.", "perceiver ar reads long documents, byte by byte. " * 6,
          "middle-sized text: twenty-something bytes"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny copy-task run of 4 steps: checkpoints 2 and 4."""
  model_dir = tmp_path_factory.mktemp("eval") / "model"
  binaries.train_in_process(model_dir, "TRAIN_STEPS = 4", "CHECKPOINT_PERIOD = 2")
  return model_dir


def _printed_metrics(stdout: str) -> dict:
  line = next(x for x in stdout.splitlines() if x.startswith("eval metrics: "))
  return json.loads(line.split(": ", 1)[1])


def test_eval_latest_scores_the_whole_split_and_writes_json_and_tensorboard(trained):
  proc = binaries.run("eval", f"--gin.CHECKPOINT_PATH='{trained}'")
  assert proc.returncode == 0, proc.stderr[-3000:]
  path = trained / "eval" / "copy_mirrored-validation-whole_split-4.json"
  assert f"wrote {path}" in proc.stdout
  result = json.loads(path.read_text())
  assert result["step"] == 4 and result["mode"] == "whole_split"
  assert result["num_tokens"] == 256 * 8  # 256 validation documents, 8 target tokens each
  assert result["num_documents"] == 256 and result["nll_by_position/0-64"] > 0
  assert result["perplexity"] == pytest.approx(math.exp(result["cross_ent_loss"]), rel=1e-5)
  assert result["bits_per_token"] == pytest.approx(result["cross_ent_loss"] / math.log(2))
  assert "bits_per_byte" not in result  # token ids, not text
  assert _printed_metrics(proc.stdout)["loss"] == pytest.approx(result["loss"], abs=1e-4)
  assert list((trained / "eval").glob("events.out.tfevents.*"))
  assert "orbax" not in proc.stderr.lower()  # library INFO chatter is hidden


def test_eval_last_latents_at_a_named_step(trained, tmp_path):
  out = tmp_path / "out"
  proc = binaries.run("eval", f"--gin.CHECKPOINT_PATH='{trained}/checkpoints/2'",
                      "--gin.EVAL_MODE=%evaluation.ScoringMode.LAST_LATENTS",
                      "--gin.EVAL_MAX_BATCHES=3", f"--gin.EVAL_OUTPUT_DIR='{out}'")
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((out / "copy_mirrored-validation-last_latents-2.json").read_text())
  assert result["step"] == 2 and result["num_batches"] == 3
  assert result["num_tokens"] == 3 * 8 * 8


def test_eval_bad_stride_and_vocab_mismatch_are_one_line(trained):
  before = binaries.checkpoint_files(trained)
  proc = binaries.run("eval", f"--gin.CHECKPOINT_PATH='{trained}'", "--gin.VOCAB_SIZE=40")
  line = binaries.error_line(proc, "eval")
  assert "vocab_size=32 but the config has vocab_size=40" in line
  proc = binaries.run("eval", f"--gin.CHECKPOINT_PATH='{trained}'", "--gin.EVAL_STRIDE=9")
  assert "EVAL_STRIDE must be in [1, num_latents=8], got 9" in binaries.error_line(proc, "eval")
  assert binaries.checkpoint_files(trained) == before


def test_two_processes_give_the_metrics_of_one(trained, tmp_path):
  """Each process feeds its rows of every batch: tokens are counted once, not twice."""
  args = ("--gin.EVAL_STRIDE=3", "--gin.EVAL_MAX_DOCUMENTS=21")
  single = binaries.run("eval", f"--gin.CHECKPOINT_PATH='{trained}'", *args,
                        f"--gin.EVAL_OUTPUT_DIR='{tmp_path / 'one'}'")
  assert single.returncode == 0, single.stderr[-3000:]
  address = f"127.0.0.1:{test_multihost.free_port()}"
  env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count=4 {FAST_COMPILE}",
         "JAX_PLATFORMS": "cpu"}
  command = binaries.command("eval", f"--gin.CHECKPOINT_PATH='{trained}'", *args,
                             f"--gin.EVAL_OUTPUT_DIR='{tmp_path / 'two'}'",
                             f"--coordinator_address={address}", "--process_count=2")
  procs = [subprocess.Popen([*command, f"--process_index={i}"], cwd=REPO,
                            env={**binary_env(), **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  results = test_multihost.finish(procs, timeout=600)
  for result in results:
    assert result.returncode == 0, result.stderr[-3000:]
  one = json.loads((tmp_path / "one" / "copy_mirrored-validation-whole_split-4.json").read_text())
  two = json.loads((tmp_path / "two" / "copy_mirrored-validation-whole_split-4.json").read_text())
  assert one["num_tokens"] == two["num_tokens"] == 21 * 8
  for key in ("loss", "accuracy", "cross_ent_loss", "num_documents", "num_windows"):
    assert two[key] == pytest.approx(one[key], rel=1e-6), key
  assert all(_printed_metrics(r.stdout)["loss"] == _printed_metrics(single.stdout)["loss"]
             for r in results)
  assert "wrote" not in results[1].stdout  # process 0 writes, process 1 does not


def test_whole_split_bits_per_byte_on_a_byte_corpus_is_every_token(tmp_path):
  """Default eval on a corpus of very different lengths == the per-token reference."""
  docs = tmp_path / "docs"
  docs.mkdir()
  for i, text in enumerate(CORPUS):
    (docs / f"{i}.txt").write_text(text)
  tasks.configure(text_files=str(docs), text_validation_files=str(docs))
  lengths = {"targets": 16}
  try:
    binaries.train_in_process(tmp_path / "m", "MIXTURE_OR_TASK_NAME = 'text_bytes'",
                              "VOCAB_SIZE = 259", f"TASK_FEATURE_LENGTHS = {lengths}",
                              "TRAIN_STEPS = 2")
    model = binaries.tiny_model(vocab_size=259)
    cfg = datasets.DatasetConfig("text_bytes", lengths, "validation", 8, shuffle=False)
    summaries = {stride: evaluation.evaluate_checkpoint(
        model=model, dataset_cfg=cfg, checkpoint_path=str(tmp_path / "m"), stride=stride,
        output_dir=str(tmp_path / f"out{stride}"))[0] for stride in (1, None)}
    corpus = documents.load_documents("text_bytes", "validation", lengths)
  finally:
    tasks.configure(text_files=None, text_validation_files=None)
  params = checkpoints.load_params(model, str(tmp_path / "m"), 16)[0]
  logits_fn = jax.jit(model.logits)
  num_bytes = sum(len(t.encode()) for t in CORPUS)
  for stride, end_of in ((1, end_stride_1), (None, end_stride_latents)):
    summary = summaries[stride]
    nll = sum(float(np.sum(reference_nll(logits_fn, params, doc, end_of(doc.length, 8), 16, 8)))
              for doc in corpus)
    assert summary["num_tokens"] == num_bytes + len(CORPUS)  # every byte + one EOS per doc
    assert summary["num_bytes"] == num_bytes and summary["num_documents"] == len(CORPUS)
    assert summary["bits_per_byte"] == pytest.approx(nll / math.log(2) / num_bytes, rel=1e-5)
  assert ScoringMode.WHOLE_SPLIT.value in json.dumps(
      sorted(p.name for p in (tmp_path / "out1").iterdir()))
