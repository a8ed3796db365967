"""The infer binary on tiny.gin checkpoints, and the prompt/jsonl/MIDI plumbing."""

import json
import pathlib
import shutil

import pytest
import seqio

from perceiver_ar_t5x import inference
from tests import binaries


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  model_dir = tmp_path_factory.mktemp("infer") / "model"
  binaries.train_in_process(model_dir, "TRAIN_STEPS = 2", "CHECKPOINT_PERIOD = 2")
  return model_dir


@pytest.mark.slow
def test_infer_from_the_validation_split(trained, tmp_path):
  out = tmp_path / "out"
  proc = binaries.run("infer", f"--gin.CHECKPOINT_PATH='{trained}'",
                      f"--gin.INFER_OUTPUT_DIR='{out}'", "--gin.INFER_MAX_EXAMPLES=3")
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = (out / "copy_mirrored-validation-2.jsonl").read_text().splitlines()
  assert len(lines) == 3 and "wrote 3 predictions" in proc.stdout
  for line in lines:
    record = json.loads(line)
    assert set(record) == {"inputs", "prediction", "score", "targets"}
    assert len(record["inputs"]) == 8  # the prefix-LM inputs are the prompt
    assert record["targets"] == record["inputs"][::-1]  # the mirrored copy
    assert len(record["prediction"]) <= 8 and record["score"] <= 0.0


@pytest.mark.slow
def test_infer_from_a_prompt_file_with_sampling(trained, tmp_path):
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text('{"inputs": "5 6 7"}\n{"inputs": [9, 10, 11, 12, 13]}\n')
  out = tmp_path / "out"
  proc = binaries.run("infer", f"--gin.CHECKPOINT_PATH='{trained}/checkpoints/2'",
                      f"--gin.INFER_OUTPUT_DIR='{out}'", f"--gin.PROMPT_FILE='{prompts}'",
                      "--gin.TEMPERATURE=1.0", "--gin.TOP_K=5", "--gin.INFER_MAX_NEW_TOKENS=4")
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(x) for x in (out / "prompts-2.jsonl").read_text().splitlines()]
  assert [r["inputs"] for r in records] == [[5, 6, 7], [9, 10, 11, 12, 13]]
  assert all(len(r["prediction"]) <= 4 for r in records)  # new tokens; the prompt is apart
  assert all(r["score"] < 0.0 for r in records)


def test_prompt_files(tmp_path):
  ids = seqio.PassThroughVocabulary(32)
  text = tmp_path / "p.txt"
  text.write_text("3 4 5\n\n6\n")
  assert [p.tokens.tolist() for p in inference.prompts_from_file(str(text), ids)] == [[3, 4, 5],
                                                                                      [6]]
  text.write_text("hello\n")
  with pytest.raises(inference.InferenceError, match="takes token ids"):
    inference.prompts_from_file(str(text), ids)
  byte = seqio.ByteVocabulary()
  assert inference.prompts_from_file(str(text), byte)[0].tokens.tolist() == byte.encode("hello")
  bad = tmp_path / "p.jsonl"
  bad.write_text('{"text": "x"}\n')
  with pytest.raises(inference.InferenceError, match="p.jsonl:1: expected a JSON object"):
    inference.prompts_from_file(str(bad), byte)
  with pytest.raises(inference.InferenceError, match="does not exist"):
    inference.prompts_from_file(str(tmp_path / "none.txt"), byte)
  assert inference.decode_text(byte, byte.encode("hé") + [0, 0]) == "hé"
  assert inference.decode_text(ids, [3, 4, 0]) == [3, 4]


def test_task_defaults_sample_midi_and_text_and_count_new_tokens():
  from perceiver_ar_t5x.tasks import vocabularies
  midi_vocab, byte = vocabularies.midi_vocabulary(), seqio.ByteVocabulary()
  kind = inference.task_kind("maestro_midi", midi_vocab)
  assert kind is inference.TaskKind.MIDI
  assert inference.task_kind("text_bytes", byte) is inference.TaskKind.TEXT
  assert inference.task_kind("copy_mirrored", seqio.PassThroughVocabulary(32)) is (
      inference.TaskKind.TOKENS)
  new, cfg = inference.resolve_defaults(kind, midi_vocab, max_new_tokens=None,
                                        temperature=None, top_k=0, top_p=None, eos_id=None)
  assert new == 1500 and (cfg.temperature, cfg.top_p, cfg.eos_id) == (1.0, 0.95, 1)
  new, cfg = inference.resolve_defaults(inference.TaskKind.TEXT, byte, max_new_tokens=None,
                                        temperature=0.0, top_k=0, top_p=None, eos_id=None)
  assert new == 400 and cfg.temperature == 0.0  # greedy stays available
  new, cfg = inference.resolve_defaults(inference.TaskKind.TOKENS, byte, max_new_tokens=None,
                                        temperature=None, top_k=0, top_p=None, eos_id=None)
  assert new is None and cfg == inference.decoding.SamplingConfig()
  with pytest.raises(inference.InferenceError, match="INFER_MAX_NEW_TOKENS must be >= 1"):
    inference.resolve_defaults(kind, midi_vocab, max_new_tokens=0, temperature=None,
                               top_k=0, top_p=None, eos_id=None)


def _run_gin(gin_file: str, *bindings: str) -> None:
  """Trains `gin_file` in this process, as the train binary would (gin cleared after)."""
  import sys

  import gin
  from perceiver_ar_t5x import gin_utils, trainer
  from tests.conftest import REPO
  gin.clear_config()
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(sys.modules["__main__"], "train", trainer.train, raising=False)
    try:
      gin_utils.parse_gin([gin_file], list(bindings), [str(REPO / "gin")])
      gin.get_configurable(trainer.train)(handle_signals=False, sample_at_end=False)
    finally:
      gin.clear_config()


@pytest.mark.slow
def test_infer_on_a_midi_task_writes_prompt_and_continuation_apart(tmp_path):
  """jsonl: prompt and continuation apart; .mid + piano-roll .png for each, the prompt's
  notes equal to its events', the continuation at most INFER_MAX_NEW_TOKENS events."""
  import pretty_midi

  from perceiver_ar_t5x.tasks import midi
  data = tmp_path / "maestro"
  golden = pathlib.Path(__file__).parent / "golden" / "midi"
  rows = ["split,midi_filename"] + [f"validation,{n}.midi" for n in ("chords", "pedal")]
  data.mkdir()
  for name in ("chords", "pedal", "random_0"):
    shutil.copy(golden / f"{name}.mid", data / f"{name}.midi")
  (data / "m.csv").write_text("\n".join([*rows, "train,random_0.midi"]) + "\n")
  model = tmp_path / "model"
  _run_gin("gin/runs/maestro_cpu.gin", f"MODEL_DIR = '{model}'", f"MAESTRO_DIR = '{data}'",
           "TRAIN_STEPS = 2", "CHECKPOINT_PERIOD = 2")
  out = tmp_path / "out"
  proc = binaries.run("infer", f"--gin.CHECKPOINT_PATH='{model}'",
                      f"--gin.INFER_OUTPUT_DIR='{out}'", f"--gin.MAESTRO_DIR='{data}'",
                      "--gin.INFER_MAX_NEW_TOKENS=40", gin_files=("gin/runs/maestro_cpu.gin",))
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(x) for x in (out / "maestro_midi-validation-2.jsonl").read_text()
             .splitlines()]
  assert len(records) == 2
  for i, r in enumerate(records):
    assert len(r["prediction"]) <= 40 and len(r["inputs"]) == 64 - 16  # all but the latents
    assert r["midi"] == f"maestro_midi-validation-2-{i}.mid"
    assert r["prompt_midi"] == f"maestro_midi-validation-2-{i}-prompt.mid"
    for key in ("piano_roll", "prompt_piano_roll"):
      assert (out / r[key]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    prompt = pretty_midi.PrettyMIDI(str(out / r["prompt_midi"]))
    got = sorted((round(n.start, 2), n.pitch) for i in prompt.instruments for n in i.notes)
    want = sorted((round(n.start, 2), n.pitch) for n in midi.events_to_notes(r["inputs"]))
    assert got == want and got
    pretty_midi.PrettyMIDI(str(out / r["midi"]))  # a readable file (maybe without notes)


@pytest.mark.slow
# 2 processes; eval's 2 == 1 test and the multihost process-0-only write test cover the path
@pytest.mark.extended
def test_infer_on_two_processes_writes_the_outputs_of_one_from_process_zero(trained, tmp_path):
  """Every process samples (the params are sharded over both); only process 0 writes.

  Each process gets its own INFER_OUTPUT_DIR here, so a write by process 1 would show.
  """
  import os
  import subprocess

  from tests.conftest import FAST_COMPILE, REPO, binary_env
  from tests.test_multihost import free_port
  args = (f"--gin.CHECKPOINT_PATH='{trained}'", "--gin.INFER_MAX_EXAMPLES=3",
          "--gin.INFER_BATCH_SIZE=4")
  single = binaries.run("infer", *args, f"--gin.INFER_OUTPUT_DIR='{tmp_path / 'one'}'")
  assert single.returncode == 0, single.stderr[-3000:]
  env = {**binary_env(),
         "XLA_FLAGS": f"--xla_force_host_platform_device_count=4 {FAST_COMPILE}",
         "JAX_PLATFORMS": "cpu"}
  address = f"127.0.0.1:{free_port()}"
  procs = [subprocess.Popen(
      binaries.command("infer", *args, f"--gin.INFER_OUTPUT_DIR='{tmp_path / str(i)}'",
                       f"--coordinator_address={address}", "--process_count=2",
                       f"--process_index={i}"),
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  for i, proc in enumerate(procs):
    try:
      _, err = proc.communicate(timeout=300)
    finally:
      if proc.poll() is None:
        os.kill(proc.pid, 9)
    assert proc.returncode == 0, f"process {i}:\n{err[-3000:]}"
  name = "copy_mirrored-validation-2.jsonl"
  assert (tmp_path / "0" / name).read_text() == (tmp_path / "one" / name).read_text()
  assert not (tmp_path / "1").exists()


def test_prompt_file_and_midi_outputs_go_through_gfile(tmp_path, monkeypatch):
  """gs:// prompt files and output dirs (ram:// here): nothing lands on the local disk."""
  import os
  import uuid

  from perceiver_ar_t5x import fileio
  from perceiver_ar_t5x.tasks import midi, midi_outputs
  monkeypatch.chdir(tmp_path)
  root = f"ram://infer-{uuid.uuid4().hex[:8]}"
  fileio.write_text(f"{root}/p.jsonl", '{"inputs": [3, 4]}\n')
  prompts = inference.prompts_from_file(f"{root}/p.jsonl", seqio.PassThroughVocabulary(32))
  assert [p.tokens.tolist() for p in prompts] == [[3, 4]]
  events = midi.midi_file_to_events(pathlib.Path(__file__).parent / "golden" / "midi" /
                                    "chords.mid")
  fileio.gfile.makedirs(f"{root}/out")
  fields = midi_outputs.write_sample(f"{root}/out/s-0", events[:60], events[60:])
  assert fields == {"midi": "s-0.mid", "piano_roll": "s-0.png",
                    "prompt_midi": "s-0-prompt.mid", "prompt_piano_roll": "s-0-prompt.png"}
  assert sorted(fileio.gfile.listdir(f"{root}/out")) == sorted(fields.values())
  assert os.listdir(tmp_path) == []


def test_a_midi_sample_splits_into_prompt_and_continuation():
  from perceiver_ar_t5x.tasks import midi, midi_outputs
  V, E = midi.VOCAB, midi.EventType
  prompt = [V.encode(E.VELOCITY, 20), V.encode(E.NOTE_ON, 60), V.encode(E.TIME_SHIFT, 50)]
  cont = [V.encode(E.NOTE_OFF, 60), V.encode(E.NOTE_ON, 62), V.encode(E.TIME_SHIFT, 10),
          V.encode(E.NOTE_OFF, 62), midi.EOS_ID, V.encode(E.NOTE_ON, 7)]
  before, after = midi_outputs.split_sample(prompt, cont)
  assert before == [midi.Note(0.0, 0.5, 60, V.bin_to_velocity(20))]  # ends at the cut
  # from t=0, in the prompt's velocity; nothing after EOS (the pitch-7 note) is music
  assert after == [midi.Note(0.0, 0.1, 62, V.bin_to_velocity(20))]
