"""Hugging Face PerceiverForMaskedLM imported as our PerceiverIO: HF's torch logits, exactly.

The fixture (tests/fixtures/convert/hf_perceiver_io, scripts/fixtures/
make_hf_perceiver_io_fixtures.py) is a small random-weight model (every bias and norm
moved off its init; d_model 16, d_latents 28, 6 latents, 2 blocks x 2 shared
self-attends) and its logits on 2 rows of 20 ids, row 1 with 7 padded tail positions.
HF decodes every one of max_position_embeddings query rows and its mask only hides the
encoder's keys, so all 2 x 20 rows are compared. The model is run eagerly (no jit): its
primitives compile once and every mutation below reuses them, which keeps this file fast.
"""

import dataclasses
import functools
import shutil

import numpy as np
import pytest

from perceiver_ar_t5x.convert import hf_io, model_dir, torch_files
from perceiver_ar_t5x.layers.mlp import Activation
from tests.conftest import REPO

FOLDER = REPO / "tests" / "fixtures" / "convert" / "hf_perceiver_io"
ATOL = 1e-4
MISS = 1e-3  # every mutation must miss HF's logits by more than this


@functools.cache
def _reference():
  return dict(np.load(FOLDER / "reference.npz"))


@functools.cache
def _converted():
  return hf_io.load(str(FOLDER))


@functools.cache
def _raw():
  return torch_files.read_weights((FOLDER / "model.safetensors").read_bytes(), "fixture")


def _logits(module, params, input_ids=None):
  ref = _reference()
  ids = ref["input_ids"] if input_ids is None else input_ids
  return np.asarray(module.apply({"params": params}, ids, input_mask=ref["attention_mask"]))


def _max_diff(module, params):
  return float(np.abs(_logits(module, params) - _reference()["logits"]).max())


def test_logits_equal_hf_on_every_row():
  converted, ref = _converted(), _reference()
  assert ref["logits"].shape == (2, 20, 262) and ref["attention_mask"][1].sum() == 13
  got = _logits(converted.module, converted.params)
  diff = np.abs(got - ref["logits"]).max(axis=(1, 2))
  print(f"max |ours - HF| per row: {diff}")
  assert diff.max() < ATOL, diff
  m = converted.module
  assert (m.num_blocks, m.num_self_attends_per_block, m.num_decoder_heads) == (2, 2, 8)
  assert m.block.norm_epsilon == 1e-5 and m.block.activation == Activation.GELU
  assert any("head-major" in line for line in converted.report)


def test_ids_under_the_padding_change_nothing():
  """HF masks the padded keys (checked when the fixture was made); so do we. Truncating
  instead would be a second compile (new shapes) for what perceiver_io's tests show."""
  converted, ref = _converted(), _reference()
  ids = np.where(ref["attention_mask"] == 0, 3, ref["input_ids"])  # [MASK] under the pads
  assert not np.array_equal(ids, ref["input_ids"])
  got = _logits(converted.module, converted.params, ids)
  np.testing.assert_allclose(got, ref["logits"], atol=ATOL)


def test_a_weights_file_with_a_config_dict_gives_the_same_params(tmp_path):
  shutil.copy(FOLDER / "model.safetensors", tmp_path / "weights.safetensors")
  config = {"model_type": "perceiver", "architectures": ["PerceiverForMaskedLM"],
            **hf_io.read_config(str(FOLDER / "config.json"))[0]}
  again = hf_io.load(str(tmp_path / "weights.safetensors"), config=config)
  flat, want = model_dir.flatten(again.params), model_dir.flatten(_converted().params)
  assert flat.keys() == want.keys()
  for name, value in want.items():
    np.testing.assert_array_equal(flat[name], value, err_msg=name)


def _with_transform(how, fn):
  """Params converted with one transform replaced (a mapping step done wrong)."""
  real = hf_io._transforms

  def transforms(heads):
    table = real(heads)
    table[how] = (fn(heads), "mutated")
    return table

  hf_io._transforms = transforms
  try:
    return hf_io.convert_params(_raw(), _converted().module)[0]
  finally:
    hf_io._transforms = real


def _set(params, values):
  """params with some leaves replaced: {our name: function of (the leaf, all leaves)}."""
  flat = dict(model_dir.flatten(params))
  return model_dir.nest({**flat, **{k: fn(flat[k], flat) for k, fn in values.items()}})


KV_NORMS = [f"{b}/pre_attention_kv_norm/{k}" for b in ("encoder", "decoder")
            for k in ("scale", "bias")]
PARAM_MUTATIONS = {
    # torch [out, in] reshaped to [in, out] instead of transposed (shapes still fit)
    "linear not transposed": lambda p: _with_transform(
        "linear", lambda h: lambda w: w.reshape(w.shape[::-1])),
    # heads split channel-major (c h) instead of head-major (h c)
    "heads split channel-major": lambda p: _with_transform(
        "heads", lambda h: lambda w: w.T.reshape(w.shape[1], -1, h).swapaxes(1, 2)),
    "out projection split channel-major": lambda p: _with_transform(
        "heads_in", lambda h: lambda w: w.T.reshape(-1, h, w.shape[0]).swapaxes(0, 1)),
    # the cross-attentions' key/value LayerNorm (HF layernorm2) left at identity
    "kv norms not mapped": lambda p: _set(p, {
        k: (lambda x, f, k=k: np.full_like(x, float(k.endswith("scale")))) for k in KV_NORMS}),
    # the input position table and the decoder's query table ([20, 16] both) swapped
    "positions <-> output queries": lambda p: _set(p, {
        "input_adapter/positions/embedding": lambda x, f: f["output_queries"],
        "output_queries": lambda x, f: f["input_adapter/positions/embedding"]}),
    "embedding_decoder.bias dropped": lambda p: _set(p, {
        "logits_bias": lambda x, f: np.zeros_like(x)}),
}
MODULE_MUTATIONS = {
    "no encoder query residual": lambda m: m.clone(use_query_residual=False),
    "decoder query residual": lambda m: m.clone(decoder_query_residual=True),
    "tanh GELU": lambda m: m.clone(block=dataclasses.replace(
        m.block, activation=Activation.GELU_TANH)),
    "self-attends not repeated": lambda m: m.clone(num_blocks=1),
}


@pytest.mark.parametrize("name", sorted(PARAM_MUTATIONS) + sorted(MODULE_MUTATIONS))
def test_each_mapping_step_matters(name):
  converted = _converted()
  module, params = converted.module, converted.params
  if name in PARAM_MUTATIONS:
    params = PARAM_MUTATIONS[name](params)
  else:
    module = MODULE_MUTATIONS[name](module)
  diff = _max_diff(module, params)
  print(f"{name}: max |ours - HF| {diff:.4g}")
  assert diff > MISS, (name, diff)


def test_remapped_vocab_predicts_the_same_logits_on_our_ids():
  converted, ref, table = _converted(), _reference(), hf_io.MLM_VOCAB_TABLE
  remapped = hf_io.remap_to_mlm_vocab(converted)
  assert remapped.module.input_adapter.vocab_size == len(table) == 260
  assert table[259] == 3 and table[3 + ord("a")] == 6 + ord("a")  # [MASK], a byte
  inverse = np.full(262, -1)
  inverse[table] = np.arange(len(table))
  ours = inverse[ref["input_ids"]]  # the stored [PAD], [MASK] and byte ids, as ours
  assert ours.min() >= 0 and ours.max() == 259
  got = _logits(remapped.module, remapped.params, ours)
  np.testing.assert_allclose(got, ref["logits"][..., table], atol=ATOL)
  with pytest.raises(model_dir.ConversionError, match="260 ids is not"):
    hf_io.remap_to_mlm_vocab(remapped)


def test_unknown_and_missing_keys_are_one_error_naming_the_key():
  module = _converted().module
  raw = dict(_raw(), **{"perceiver.extra.weight": np.zeros(3, np.float32)})
  with pytest.raises(model_dir.ConversionError, match=r"unknown key perceiver\.extra\.weight"):
    hf_io.convert_params(raw, module)
  raw = {k: v for k, v in _raw().items() if k != "embedding_decoder.bias"}
  with pytest.raises(model_dir.ConversionError, match="missing key embedding_decoder.bias"):
    hf_io.convert_params(raw, module)


def test_other_models_and_folders_are_refused(tmp_path):
  with pytest.raises(model_dir.ConversionError, match="not a Hugging Face hub folder"):
    hf_io.load(str(tmp_path))
  cfg = hf_io.read_config(str(FOLDER / "config.json"))[0]
  shutil.copy(FOLDER / "model.safetensors", tmp_path)
  for config, match in [({"model_type": "bert"}, "'bert' is not 'perceiver'"),
                        ({"architectures": ["PerceiverForImageClassificationLearned"]},
                         "only the masked LM"),
                        ({**cfg, "hidden_act": "swish"}, "hidden_act 'swish'"),
                        ({**cfg, "num_self_attends_per_block": 3}, "missing key"),
                        ({**cfg, "num_cross_attention_heads": 3}, "does not fit")]:
    with pytest.raises(model_dir.ConversionError, match=match) as e:
      hf_io.load(str(tmp_path / "model.safetensors"), config=config)
    assert "\n" not in str(e.value)
