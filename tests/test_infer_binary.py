"""The infer binary on tiny.gin checkpoints, and the prompt/jsonl/MIDI plumbing."""

import json

import numpy as np
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
                      "--gin.TEMPERATURE=1.0", "--gin.TOP_K=5", "--gin.INFER_MAX_LENGTH=12")
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(x) for x in (out / "prompts-2.jsonl").read_text().splitlines()]
  assert [r["inputs"] for r in records] == [[5, 6, 7], [9, 10, 11, 12, 13]]
  assert len(records[0]["prediction"]) <= 9 and len(records[1]["prediction"]) <= 7
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


def test_midi_tasks_get_a_midi_writer(tmp_path):
  import pretty_midi

  from perceiver_ar_t5x.tasks import midi
  vocab = seqio.PassThroughVocabulary(midi.VOCAB.size, eos_id=midi.EOS_ID)
  assert inference.midi_writer("copy_mirrored", vocab) is None
  write = inference.midi_writer("maestro_midi", vocab)
  events = [midi.VOCAB.encode(midi.EventType.NOTE_ON, 60),
            midi.VOCAB.encode(midi.EventType.TIME_SHIFT, 50),
            midi.VOCAB.encode(midi.EventType.NOTE_OFF, 60)]
  write(np.asarray(events), str(tmp_path / "x.mid"))
  notes = pretty_midi.PrettyMIDI(str(tmp_path / "x.mid")).instruments[0].notes
  assert [(n.pitch, round(n.end - n.start, 2)) for n in notes] == [(60, 0.5)]
