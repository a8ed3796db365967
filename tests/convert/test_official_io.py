"""Official Perceiver IO (Haiku) params convert into our PerceiverIO and give the official logits.

The fixtures (tests/fixtures/convert/official_io_*; made by
scripts/fixtures/make_official_io_fixtures.py with google-deepmind/deepmind-research perceiver/)
hold randomised official params, the official kwargs and the official logits of the colabs'
MLM (a tail-padded batch) and of the ImageNet pixel + Fourier classifier at toy sizes. Each
mapping step is also removed in turn and must break the match, so none passes by accident.
"""

import dataclasses
import pathlib

import jax
import numpy as np
import pytest

from perceiver_ar_t5x.convert import model_dir, official_io
from perceiver_ar_t5x.layers.mlp import Activation

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "convert"
ATOL = 1e-4  # f32, both sides
BROKEN = 1e-3  # a removed mapping step must move the logits by more than this


@pytest.fixture(scope="module")
def cases() -> dict:
  """name -> (folder, converted, reference arrays, {variant: jitted apply})."""
  out = {}
  for name in ("mlm", "classify"):
    folder = FIXTURES / f"official_io_{name}"
    out[name] = (folder, official_io.load(str(folder)), dict(np.load(folder / "reference.npz")),
                 {})
  return out


def _logits(case, params=None, module=None, key: str = "base") -> np.ndarray:
  """Our logits in the official layout: MLM [b, length, vocab], classifier [b, classes]."""
  _, converted, ref, applies = case
  module = converted.module if module is None else module
  if key not in applies:
    applies[key] = jax.jit(module.apply)
  mlm = ref["logits"].ndim == 3
  out = applies[key]({"params": converted.params if params is None else params},
                     ref["inputs"], input_mask=ref["mask"] if mlm else None)
  return np.asarray(out) if mlm else np.asarray(out)[:, 0]


def _diff(case, logits: np.ndarray) -> float:
  """Max |ours - official| over real positions (the MLM's padded rows: see the pad test)."""
  ref = case[2]
  valid = ref["mask"] > 0 if ref["logits"].ndim == 3 else slice(None)
  return float(np.abs(logits[valid] - ref["logits"][valid]).max())


@pytest.mark.parametrize("name", ["mlm", "classify"])
def test_logits_equal_official(cases, name):
  diff = _diff(cases[name], _logits(cases[name]))
  print(f"official_io_{name}: max |ours - official| = {diff:.3g}")
  assert diff < ATOL


def test_module_and_report(cases):
  """Sizes from the shapes, heads/blocks/residuals from config.json, one line per param."""
  _, mlm, _, _ = cases["mlm"]
  m = mlm.module
  assert (m.num_latents, m.latent_dim, m.num_outputs, m.decoder_dim) == (6, 40, 20, 24)
  assert (m.num_blocks, m.num_self_attends_per_block, m.num_self_attend_heads) == (2, 2, 4)
  assert (m.num_cross_attend_heads, m.num_decoder_heads) == (2, 4)
  assert (m.cross_attend_qk_channels, m.decoder_qk_channels, m.decoder_v_channels) == (16, 16, 24)
  assert m.use_query_residual and not m.decoder_query_residual
  assert m.block.activation == Activation.GELU_TANH
  raw = official_io.read_params(str(cases["mlm"][0]))
  assert len([r for r in mlm.report if " -> " in r]) == len(raw)
  c = cases["classify"][1].module
  assert (c.input_adapter.index_dims, c.input_adapter.num_bands, c.num_classes) == ((5, 4), 3, 5)
  assert c.cross_attend_qk_channels == 17  # the official 'kv' default: 3 + 2 + 2 * 2 * 3


def test_mlm_padded_rows_are_the_official_wiped_rows(cases):
  """The official MLM passes query_mask=input_mask: a padded query row's attention weights
  are wiped to 0 before the out projection, so (no query residual) the row is x = out_bias
  and its output x + MLP(LayerNorm(x)), the same for every padded row. Ours has no decoder
  query mask and decodes those rows; this pins what one must give."""
  _, converted, ref, _ = cases["mlm"]
  p = model_dir.flatten(converted.params)
  x = p["decoder/attention/out_bias"]
  y = (x - x.mean()) / np.sqrt(x.var() + 1e-5) * p["decoder/pre_mlp_norm/scale"] + p[
      "decoder/pre_mlp_norm/bias"]
  h = np.asarray(jax.nn.gelu(y @ p["decoder/mlp/wi"] + p["decoder/mlp/wi_bias"]))
  out = x + h @ p["decoder/mlp/wo"] + p["decoder/mlp/wo_bias"]
  row = out @ p["input_adapter/token_embed/embedding"].T + p["logits_bias"]
  padded = ref["mask"] == 0
  assert padded.sum() == 7
  np.testing.assert_allclose(ref["logits"][padded], np.broadcast_to(row, (7, row.size)),
                             atol=ATOL, rtol=0)
  ours = _logits(cases["mlm"])[padded]
  print(f"official_io_mlm padded rows: ours differ by "
        f"{np.abs(ours - ref['logits'][padded]).max():.3g}")


def _dim_major(how: str, x: np.ndarray, heads: int) -> np.ndarray:
  """The wrong split: [H * D] read as [D, H] (dimension-major) instead of head-major."""
  if how == "heads":
    return np.swapaxes(x.reshape(x.shape[:-1] + (x.shape[-1] // heads, heads)), -1, -2)
  if how == "heads_in":
    return np.swapaxes(x.reshape((x.shape[0] // heads, heads) + x.shape[1:]), 0, 1)
  return x


def _kv_rows(params: dict, order: np.ndarray) -> dict:
  """The encoder's key/value input rows (and kv norm) permuted: features in another order."""
  flat = dict(model_dir.flatten(params))
  for name in ("attention/key", "attention/value", "pre_attention_kv_norm/scale",
               "pre_attention_kv_norm/bias"):
    flat[f"encoder/{name}"] = flat[f"encoder/{name}"][order]
  return model_dir.nest(flat)


def _fourier_order(band_major: bool) -> np.ndarray:
  """Input rows 3 pixels + 2 pos, then sin and cos blocks of [dim 2, band 3] each: band-major
  reads each block as [band, dim]; otherwise the sin and cos blocks are swapped."""
  head = np.arange(5)
  if band_major:
    block = np.arange(6).reshape(2, 3).T.reshape(-1)
    return np.concatenate([head, 5 + block, 11 + block])
  return np.concatenate([head, np.arange(11, 17), np.arange(5, 11)])


def _zero_kv_offsets(params: dict) -> dict:
  flat = dict(model_dir.flatten(params))
  for name in ("encoder", "decoder"):
    flat[f"{name}/pre_attention_kv_norm/bias"] = np.zeros_like(
        flat[f"{name}/pre_attention_kv_norm/bias"])
  return model_dir.nest(flat)


def _mutant(case, mutation: str, monkeypatch) -> np.ndarray:
  folder, converted, _, _ = case
  m, params = converted.module, converted.params
  if mutation == "head split dimension-major":
    monkeypatch.setattr(official_io, "transform", _dim_major)
    return _logits(case, official_io.load(str(folder)).params)
  if mutation == "kv norm offset dropped":
    return _logits(case, _zero_kv_offsets(params))
  if mutation == "exact GELU":
    block = dataclasses.replace(m.block, activation=Activation.GELU)
    return _logits(case, module=m.clone(block=block), key=mutation)
  if mutation == "Fourier bands band-major":
    return _logits(case, _kv_rows(params, _fourier_order(True)))
  if mutation == "Fourier sin/cos swapped":
    return _logits(case, _kv_rows(params, _fourier_order(False)))
  if mutation == "max_resolution transposed":
    adapter = m.input_adapter.clone(max_resolution=(4, 5))
    return _logits(case, module=m.clone(input_adapter=adapter), key=mutation)
  if mutation == "encoder query residual flipped":
    return _logits(case, module=m.clone(use_query_residual=False), key=mutation)
  assert mutation == "decoder query residual flipped"
  return _logits(case, module=m.clone(decoder_query_residual=True), key=mutation)


@pytest.mark.parametrize("name,mutation", [
    ("mlm", "head split dimension-major"), ("classify", "head split dimension-major"),
    ("mlm", "kv norm offset dropped"), ("classify", "kv norm offset dropped"),
    ("mlm", "exact GELU"), ("classify", "Fourier bands band-major"),
    ("classify", "Fourier sin/cos swapped"), ("classify", "max_resolution transposed"),
    ("mlm", "encoder query residual flipped"), ("mlm", "decoder query residual flipped")])
def test_removing_a_mapping_step_breaks_the_match(cases, name, mutation, monkeypatch):
  diff = _diff(cases[name], _mutant(cases[name], mutation, monkeypatch))
  print(f"official_io_{name} with {mutation}: max diff {diff:.3g}")
  assert diff > BROKEN


def test_rejects_what_ours_cannot_express(cases, tmp_path):
  folder = cases["classify"][0]
  with pytest.raises(model_dir.ConversionError, match="prep_type"):
    official_io.load(str(folder), {"input_preprocessor": {"prep_type": "conv"}})
  with pytest.raises(model_dir.ConversionError, match="index_dims"):
    official_io.load(str(folder), {})
  with pytest.raises(model_dir.ConversionError, match="heads"):
    official_io.load(str(folder), num_self_attend_heads=5)
  raw = official_io.read_params(str(folder))
  raw["classification_decoder/~/basic_decoder/extra/w"] = np.zeros((1, 1), np.float32)
  np.savez(tmp_path / "params.npz", **raw)
  with pytest.raises(model_dir.ConversionError, match="unknown param"):
    official_io.load(str(tmp_path), str(folder / "config.json"))


def test_reads_a_haiku_pickle(cases, tmp_path):
  """The colabs' released checkpoints are pickles of {module: {name: array}} (+ state)."""
  import pickle

  raw = official_io.read_params(str(cases["mlm"][0]))
  tree = {}
  for key, value in raw.items():
    module, name = key.rsplit("/", 1)
    tree.setdefault(module, {})[name] = value
  (tmp_path / "mlm.pickle").write_bytes(pickle.dumps({"params": tree, "state": {}}))
  again = official_io.read_params(str(tmp_path / "mlm.pickle"))
  assert again.keys() == raw.keys()
  assert all(np.array_equal(again[k], raw[k]) for k in raw)
