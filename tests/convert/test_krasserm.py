"""krasserm perceiver-io 0.11 Perceiver AR models imported: the torch logits, from either file.

Fixtures (tests/fixtures/convert/krasserm_{clm,sam}, scripts/fixtures/make_krasserm_fixtures.py)
hold the logits torch returned for three calls: "" (8 latents), "_2" (prefix_len 20, 4
latents) and "_3" (prefix_len 0 with 3 pads of row 1 inside the latents). clm: learned
positions + rotary on half of each head in the first 2 layers, output bias, no final norm,
heads 3; sam: rotary on whole heads in all layers, out_norm, heads 2. Both: layer-0 MLP
width 2C, latent MLPs 3C.
"""

import dataclasses
import functools
import importlib.util
import io
import json
import pickle
import shutil
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_ar_t5x import checkpoints
from perceiver_ar_t5x.convert import krasserm, model_dir, torch_files
from perceiver_ar_t5x.layers.block import CrossKvNorm
from perceiver_ar_t5x.models import PerceiverARModel
from tests.conftest import REPO

FIXTURES = REPO / "tests" / "fixtures" / "convert"
ATOL = 1e-4


def _reference(name):
  return np.load(FIXTURES / f"krasserm_{name}" / "reference.npz")


@functools.partial(jax.jit, static_argnums=0)
def _apply(module, params, tokens, kwargs):
  return module.apply({"params": params}, tokens, **kwargs)


def _logits(module, params, ref, suffix):
  """Ours on a stored krasserm call (tokens, prefix_len, pad_mask) -> [2, latents, vocab]."""
  num_latents, kwargs = krasserm.call_inputs(ref[f"pad_mask{suffix}"],
                                             int(ref[f"prefix_len{suffix}"]))
  np.testing.assert_array_equal(kwargs["positions"], ref[f"positions{suffix}"])
  module = module.clone(num_latents=num_latents)
  return np.asarray(_apply(module, params, jnp.asarray(ref[f"tokens{suffix}"]), kwargs))


def _max_diffs(converted, ref, suffixes=("", "_2", "_3")):
  """Max abs logit diff per call: "" and "_2" on all rows, "_3" on row 0 only.

  In "_3" row 1's 3 pads are latents, and krasserm leaks: a pad query row of layer 0
  sees only (masked) pad keys, so its softmax is uniform over ALL keys, future real
  tokens included, and the latent self-attention layers (no pad mask there) pass that
  row on to the real latents: krasserm's real-token logits then depend on the pad ids
  and on later tokens (by up to ~1.6 here). Ours never lets a real token see padding
  (segment 0), so row 1 is compared separately, to krasserm on the unpadded row.
  """
  diffs = {}
  for suffix in suffixes:
    rows = slice(0, 1) if suffix == "_3" else slice(None)
    got = _logits(converted.module, converted.params, ref, suffix)
    diffs[suffix] = float(np.abs(got[rows] - ref[f"logits{suffix}"][rows]).max())
  return diffs


@pytest.mark.parametrize("name", ["clm", "sam"])
@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_converted_logits_equal_torch(name, weights):
  converted = krasserm.load_krasserm(str(FIXTURES / f"krasserm_{name}" / weights))
  assert converted.module.tie_embeddings and converted.module.cross_mlp_dim is not None
  diffs = _max_diffs(converted, _reference(name))
  assert max(diffs.values()) < ATOL, diffs
  assert any("rotary pairs" in line for line in converted.report)


def _numpy_reference():
  spec = importlib.util.spec_from_file_location(
      "krasserm_numpy_reference", REPO / "scripts" / "fixtures" / "krasserm_numpy_reference.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("name", ["clm", "sam"])
def test_padded_latents_equal_krasserm_on_the_unpadded_row(name):
  """Call "_3" row 1: our real tokens' logits are krasserm's for the row without its pads."""
  folder = FIXTURES / f"krasserm_{name}"
  converted, ref, kref = krasserm.load_krasserm(str(folder)), _reference(name), _numpy_reference()
  pads = int(ref["pad_mask_3"][1].sum())
  assert pads == 3 and int(ref["prefix_len_3"]) == 0
  ours = _logits(converted.module, converted.params, ref, "_3")[1, pads:]
  cfg = json.loads((folder / "config.json").read_text())["model_config"]
  tokens = ref["tokens_3"][1:, pads:]
  theirs = kref.forward(kref.load_safetensors(str(folder / "model.safetensors")), cfg, tokens,
                        0, np.zeros(tokens.shape, bool))[0]
  np.testing.assert_allclose(ours, theirs, atol=ATOL)
  assert np.abs(ours - ref["logits_3"][1, pads:]).max() > 0.1  # krasserm's padded call leaks


@pytest.mark.parametrize("name", ["clm", "sam"])
def test_the_tests_fail_without_the_pair_order_or_with_kv_norm_on_latent_keys(name, monkeypatch):
  """Interleaved pairs read as halves, or layer 0's latent keys through kv_norm: far off."""
  ref = _reference(name)
  folder = str(FIXTURES / f"krasserm_{name}")
  converted = krasserm.load_krasserm(folder)
  block = dataclasses.replace(converted.module.block, cross_kv_norm=CrossKvNorm.SEPARATE)
  separate = dataclasses.replace(converted, module=converted.module.clone(block=block))
  assert _max_diffs(converted, ref, [""])[""] < ATOL
  assert _max_diffs(separate, ref, [""])[""] > 1e-2
  monkeypatch.setattr(krasserm, "pair_order", lambda r, head_dim: np.arange(head_dim))
  assert _max_diffs(krasserm.load_krasserm(folder), ref, [""])[""] > 1e-2


def test_model_dir_round_trip_gives_the_same_logits(tmp_path):
  converted = krasserm.load_krasserm(str(FIXTURES / "krasserm_clm"))
  gin_path = model_dir.write_model_dir(str(tmp_path), converted)
  assert "CrossKvNorm.PREFIX" in open(gin_path).read()
  model = PerceiverARModel(converted.module)
  params, step, _ = checkpoints.load_params(model, str(tmp_path), 24)
  assert step == 0
  ref = _reference("clm")
  np.testing.assert_array_equal(_logits(converted.module, params, ref, ""),
                                _logits(converted.module, converted.params, ref, ""))


def test_not_a_krasserm_folder_is_one_error_line(tmp_path):
  with pytest.raises(model_dir.ConversionError, match="not a krasserm hub folder") as e:
    krasserm.load_krasserm(str(FIXTURES / "official_rotary"))
  assert "\n" not in str(e.value)
  shutil.copy(FIXTURES / "krasserm_clm" / "model.safetensors", tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 36}))
  with pytest.raises(model_dir.ConversionError, match="'bert' is not a krasserm") as e:
    krasserm.load_krasserm(str(tmp_path))
  assert "\n" not in str(e.value)


class _Foreign:
  def __reduce__(self):
    import os
    return (os.getcwd, ())  # harmless if it ever ran; the reader must refuse it unrun


def _write_torch_zip(path, obj):
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("weights/data.pkl", pickle.dumps(obj, protocol=2))
    z.writestr("weights/byteorder", "little")


def test_bin_with_an_unknown_global_or_unknown_key_is_one_error_line(tmp_path):
  shutil.copy(FIXTURES / "krasserm_clm" / "config.json", tmp_path)
  _write_torch_zip(tmp_path / "weights.bin", {"backend_model.x": _Foreign()})
  with pytest.raises(model_dir.ConversionError, match=r"refusing .* global (posix|nt)\.getcwd"
                     ) as e:
    krasserm.load_krasserm(str(tmp_path / "weights.bin"))
  assert "\n" not in str(e.value)
  _write_torch_zip(tmp_path / "empty.pt", {})
  with pytest.raises(model_dir.ConversionError, match="missing key cross_attention") as e:
    krasserm.load_krasserm(str(tmp_path / "empty.pt"))
  assert "\n" not in str(e.value)
  converted = krasserm.load_krasserm(str(FIXTURES / "krasserm_clm"))
  raw = torch_files.read_weights((FIXTURES / "krasserm_clm" / "model.safetensors").read_bytes(),
                                 "clm")
  raw["backend_model.extra.weight"] = np.zeros(3, np.float32)
  cfg, _ = krasserm.read_config(str(FIXTURES / "krasserm_clm" / "config.json"))
  with pytest.raises(model_dir.ConversionError, match=r"unknown key extra.weight \(1 unknown"):
    krasserm.convert_params(raw, cfg, converted.module)
  buf = io.BytesIO()
  np.save(buf, np.zeros(3))
  (tmp_path / "numpy.bin").write_bytes(buf.getvalue())
  with pytest.raises(model_dir.ConversionError, match="neither a safetensors file nor"):
    krasserm.load_krasserm(str(tmp_path / "numpy.bin"))
