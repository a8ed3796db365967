"""Official Perceiver AR (Haiku) checkpoints convert into our model and give the official logits.

The fixtures (tests/fixtures/convert/official_*; made by scripts/fixtures/make_official_fixtures.py
with google-research/perceiver-ar) hold a checkpoint.dill as the official loop writes it and the
official logits of a batch with a full and a right-padded example.
"""

import json
import os
import pathlib
import pickle

import numpy as np
import pytest

from perceiver_ar_t5x import checkpoints
from perceiver_ar_t5x.convert import model_dir, official
from perceiver_ar_t5x.models import PerceiverARModel

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "convert"
VARIANTS = ("absolute", "rotary", "rotary_terminal_relative")
ATOL = 1e-4


def _fixture(variant: str):
  folder = FIXTURES / f"official_{variant}"
  info = json.loads((folder / "reference.json").read_text())
  return folder, info["model_constructor"], np.load(folder / "reference.npz")


def _inputs(ref, num_latents: int):
  """The official batch as ours takes it: 0-based positions, latents ending at the first PAD."""
  tokens = ref["inputs"].astype(np.int32)  # [batch, length], right-padded with 0
  batch, length = tokens.shape
  lengths = np.where((tokens == 0).any(1), (tokens == 0).argmax(1), length)
  starts = (lengths - num_latents).astype(np.int32)  # [batch]
  positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length))
  data_positions = ref["input_idxs"][..., 0]  # 1-based at real inputs, 0 at PAD
  real = data_positions > 0
  np.testing.assert_array_equal(positions[real], data_positions[real] - 1)
  np.testing.assert_array_equal(starts[:, None] + np.arange(num_latents),
                                ref["latent_last_steps"])
  return tokens, positions, starts


def _logits(converted: model_dir.Converted, ref, params=None) -> np.ndarray:
  tokens, positions, starts = _inputs(ref, converted.module.num_latents)
  params = converted.params if params is None else params
  return np.asarray(converted.module.apply({"params": params}, tokens, positions=positions,
                                           latent_starts=starts))


def _max_diff(converted: model_dir.Converted, ref) -> float:
  valid = ref["latent_last_steps"] >= 0  # latents of examples shorter than num_latents: garbage
  return float(np.abs(_logits(converted, ref)[valid] - ref["logits"][valid]).max())


@pytest.fixture(scope="module")
def converted() -> dict[str, model_dir.Converted]:
  out = {}
  for variant in VARIANTS:
    folder, config, _ = _fixture(variant)
    out[variant] = official.load_official(str(folder), config=config)
  return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_converted_logits_equal_the_official_ones(converted, variant):
  _, _, ref = _fixture(variant)
  diff = _max_diff(converted[variant], ref)
  print(f"{variant}: max |ours - official| = {diff:.3e}")
  assert diff <= ATOL
  assert converted[variant].step == 2
  num_params = 58 if variant == "absolute" else 57
  assert sum(" -> " in line for line in converted[variant].report) == num_params


def test_converting_from_the_file_and_a_json_config(tmp_path):
  folder, config, ref = _fixture("rotary")
  (tmp_path / "kwargs.json").write_text(json.dumps({"model_constructor": config}))
  converted = official.load_official(str(folder / "checkpoint.dill"),
                                     config=str(tmp_path / "kwargs.json"))
  assert _max_diff(converted, ref) <= ATOL


@pytest.mark.parametrize("variant, name, replacement", [
    ("rotary", "_pair_order", lambda n: np.arange(n)),  # interleaved pairs read as halves
    ("rotary", "_max_timescale", lambda wavelength, half: float(wavelength)),  # plain RoPE
    ("rotary_terminal_relative", "_pair_signs", lambda n, negate: np.ones(n)),  # no negation
    ("absolute", "_ROW_SHIFT", 0),  # 0-based positions read the official rows as they are
])
def test_each_mapping_step_is_needed(monkeypatch, variant, name, replacement):
  folder, config, ref = _fixture(variant)
  monkeypatch.setattr(official, name, replacement)
  diff = _max_diff(official.load_official(str(folder), config=config), ref)
  print(f"{variant} without {name}: max |ours - official| = {diff:.3e}")
  assert diff > 100 * ATOL


def test_written_model_dir_gives_the_same_logits(converted, tmp_path):
  c = converted["absolute"]  # frozen table, untied head with bias, separate kv norm
  _, _, ref = _fixture("absolute")
  model_dir.write_model_dir(str(tmp_path), c)
  length = ref["inputs"].shape[1]
  params, step, _ = checkpoints.load_params(PerceiverARModel(c.module), str(tmp_path), length)
  assert step == c.step
  np.testing.assert_allclose(_logits(c, ref, params), _logits(c, ref), atol=1e-6)
  assert "position_table_trainable = False" in (tmp_path / "model.gin").read_text()


def _one_line_error(path, config=None) -> str:
  with pytest.raises(model_dir.ConversionError) as e:
    official.load_official(str(path), config=config)
  assert "\n" not in str(e.value)
  return str(e.value)


def _raw_params(variant: str) -> dict:
  folder, _, _ = _fixture(variant)
  raw, _ = official.read_checkpoint(str(folder))
  params: dict = {}
  for name, value in raw.items():
    module, leaf = name.rsplit("/", 1)
    params.setdefault(module, {})[leaf] = value
  return params


def test_what_is_not_an_official_checkpoint_is_one_line(tmp_path):
  _, config, _ = _fixture("rotary")
  (tmp_path / "text").write_text("model_dir = 'x'\n")
  assert "not an official Perceiver AR checkpoint" in _one_line_error(tmp_path / "text", config)
  with open(tmp_path / "other.pkl", "wb") as f:
    pickle.dump({"weights": np.zeros(3)}, f)
  assert "not an official Perceiver AR checkpoint" in _one_line_error(tmp_path / "other.pkl",
                                                                      config)
  params = _raw_params("rotary")  # a plain pickle of numpy arrays reads too
  params["perceiver_ar/~"] = {"q_embed_learned": np.zeros((8, 32), np.float32)}
  with open(tmp_path / "learned_query.dill", "wb") as f:
    pickle.dump({"global_step": 5, "params": params}, f)
  assert "unknown param perceiver_ar/~/q_embed_learned" in _one_line_error(
      tmp_path / "learned_query.dill", config)
  assert "num_cross_attend_heads" in _one_line_error(FIXTURES / "official_rotary")
  assert "fraction_heads_to_rotate" in _one_line_error(
      FIXTURES / "official_rotary", {**config, "fraction_heads_to_rotate": 0.5})


class _Payload:
  def __init__(self, path: str):
    self.path = path

  def __reduce__(self):
    return os.system, (f"touch {self.path}",)


def test_a_pickle_cannot_run_code(tmp_path):
  _, config, _ = _fixture("rotary")
  marker = tmp_path / "ran"
  with open(tmp_path / "evil.dill", "wb") as f:
    pickle.dump({"params": {"perceiver_ar/~/embed": {"embeddings": _Payload(str(marker))}}}, f)
  assert "is a" in _one_line_error(tmp_path / "evil.dill", config)
  assert not marker.exists()
