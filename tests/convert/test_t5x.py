"""flaxformer Perceiver AR checkpoints written in T5X's layout import as the same function.

No flaxformer here, so the "flaxformer model" is one of ours with its params laid out the
way flaxformer stores them (the inverse mapping, written below from flaxformer's
DenseGeneral / MultiHeadDotProductAttention / Decoder, not from the importer):
  - q/k/v kernels [E, H, D] -> [E, H*D] and out [H, D, E] -> [H*D, E], C order
    (DenseGeneral(reshape_kernel=True) reshapes the stored 2-D kernel with jnp.reshape);
  - the query kernel divided by sqrt(D): flaxformer folds the scale into its init and never
    scales at run time (rescale_logits=False), so this layout computes what our
    scale_query=True model computes;
  - a tied head gives logits (h . emb) / sqrt(E);
  - scan_layers=True: layers_0 apart, layers 1..L-1 stacked on axis 1 under layers_1.
The tree is written with t5x_writer (float32 or bfloat16 storage) and imported.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
import pytest

from perceiver_ar_t5x import checkpoints
from perceiver_ar_t5x.convert import gin_text, model_dir, t5x
from perceiver_ar_t5x.layers.block import BlockOptions
from perceiver_ar_t5x.models import PerceiverARModel
from perceiver_ar_t5x.perceiver_ar import PerceiverAR
from tests.convert import t5x_writer

# Distinct sizes: vocab 13, embed 10, heads 3 x head_dim 4 (= 12 joined), mlp 14, 3 layers,
# latents 4 of length 9. head_dim 4: dividing by sqrt(D) = 2 is exact in bfloat16.
REFERENCE = PerceiverAR(vocab_size=13, num_latents=4, embed_dim=10, num_heads=3, head_dim=4,
                        mlp_dim=14, num_layers=3, rotary_fraction=1.0, max_length=32)
STEP = 42
ATOL = 1e-4  # float32 storage, or bfloat16 storage of bfloat16-representable params
# bfloat16 storage of float32 params: rounding (2^-9 relative) through 3 layers; measured
# 7.0e-2 on logits up to 2.7 here (the test prints it).
BF16_ATOL = 0.15
TOKENS = np.random.default_rng(0).integers(1, 13, size=(2, 9)).astype(np.int32)


@functools.partial(jax.jit, static_argnums=0)
def _apply(module, params, tokens):
  return module.apply({"params": params}, tokens)


def _logits(module: PerceiverAR, params) -> np.ndarray:
  return np.asarray(_apply(module, params, TOKENS))  # [2, 4, 13]


def _params(module: PerceiverAR, seed: int = 0, bf16: bool = False) -> dict:
  """Our init with non-trivial norm scales; optionally rounded to bfloat16 values."""
  params = nn.unbox(PerceiverARModel(module).init(jax.random.key(seed), module.num_latents))
  rng = np.random.default_rng(seed)

  def perturb(path, x):
    x = np.asarray(x, np.float32)
    if jax.tree_util.keystr(path).endswith("['scale']"):
      x = x + rng.normal(0.0, 0.3, x.shape).astype(np.float32)
    return x.astype(ml_dtypes.bfloat16).astype(np.float32) if bf16 else x

  return jax.tree_util.tree_map_with_path(perturb, params)


def flaxformer_target(module: PerceiverAR, params: dict, *, scanned: bool = False,
                      rescale_logits: bool = False) -> dict:
  """Our params (scale_query=True model) as a flaxformer DecoderOnly `target` tree."""
  embed, head_dim = module.embed_dim, module.head_dim
  query_scale = 1.0 if rescale_logits else np.float32(np.sqrt(head_dim))

  def layer(p: dict) -> dict:
    att = p["attention"]
    return {
        "pre_self_attention_layer_norm": {"scale": p["pre_attention_norm"]["scale"]},
        "self_attention": {
            "query": {"kernel": att["query"].reshape(embed, -1) / query_scale},
            "key": {"kernel": att["key"].reshape(embed, -1)},
            "value": {"kernel": att["value"].reshape(embed, -1)},
            "out": {"kernel": att["out"].reshape(-1, embed)}},
        "pre_mlp_layer_norm": {"scale": p["pre_mlp_norm"]["scale"]},
        "mlp": {name: {"kernel": kernel} for name, kernel in p["mlp"].items()}}

  layers = [layer(params[f"layers_{i}"]) for i in range(module.num_layers)]
  decoder = {"token_embedder": {"embedding": params["token_embedder"]["embedding"]},
             "decoder_norm": {"scale": params["decoder_norm"]["scale"]}}
  if not module.tie_embeddings:
    decoder["logits_dense"] = {"kernel": params["logits_dense"]["kernel"]}
  if scanned:
    decoder["layers_0"] = layers[0]
    decoder["layers_1"] = jax.tree.map(lambda *xs: np.stack(xs, axis=1), *layers[1:])
  else:
    decoder.update({f"layers_{i}": lyr for i, lyr in enumerate(layers)})
  return {"decoder": decoder}


def write(tmp_path, target: dict, save_dtype: str = "float32", name: str = "run") -> str:
  folder = tmp_path / name
  t5x_writer.write_t5x_checkpoint(str(folder), {"target": target, "state": {"step": STEP}},
                                  save_dtype=save_dtype)
  return str(folder)


def load(path: str, **kwargs) -> model_dir.Converted:
  kwargs = {"num_heads": 3, "num_latents": 4, **kwargs}
  return t5x.load_t5x(path, **kwargs)


def _diff(converted: model_dir.Converted, reference: np.ndarray) -> float:
  return float(np.abs(_logits(converted.module, converted.params) - reference).max())


@pytest.mark.parametrize("save_dtype", ["float32", "bfloat16"])
def test_converted_logits_equal_the_flaxformer_function(tmp_path, save_dtype):
  params = _params(REFERENCE, bf16=save_dtype == "bfloat16")  # bf16 storage then is exact
  converted = load(write(tmp_path, flaxformer_target(REFERENCE, params), save_dtype))
  diff = _diff(converted, _logits(REFERENCE, params))
  print(f"{save_dtype} storage: max |converted - reference| = {diff:.3e}")
  assert diff <= ATOL
  assert converted.step == STEP
  m = converted.module
  assert (m.num_heads, m.head_dim, m.num_layers, m.mlp_dim) == (3, 4, 3, 14)
  assert not m.block.scale_query and m.rotary_fraction == 1.0 and m.max_timescale == 1e4
  assert sum(" -> " in line for line in converted.report) == 3 + 3 * 9


def test_bfloat16_storage_of_float32_params_is_close(tmp_path):
  params = _params(REFERENCE)
  converted = load(write(tmp_path, flaxformer_target(REFERENCE, params), "bfloat16"))
  reference = _logits(REFERENCE, params)
  diff = _diff(converted, reference)
  print(f"bf16 storage of f32 params: max |converted - reference| = {diff:.3e} "
        f"(logits up to {np.abs(reference).max():.2f})")
  assert ATOL < diff <= BF16_ATOL


def test_tied_embedding_becomes_an_untied_head(tmp_path):
  tied = REFERENCE.clone(tie_embeddings=True)
  params = _params(tied)
  converted = load(write(tmp_path, flaxformer_target(tied, params)))
  reference = _logits(tied, params) / np.sqrt(tied.embed_dim)  # flaxformer's tied logits
  assert _diff(converted, reference) <= ATOL
  assert not converted.module.tie_embeddings
  assert any("tied embedding head" in line for line in converted.report)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_scanned_layers_import_either_layout(tmp_path, scan_layers):
  params = _params(REFERENCE)
  target = flaxformer_target(REFERENCE, params, scanned=True)
  assert target["decoder"]["layers_1"]["self_attention"]["query"]["kernel"].shape == (10, 2, 12)
  converted = load(write(tmp_path, target), scan_layers=scan_layers)
  assert ("latent_layers" in converted.params) == scan_layers
  assert _diff(converted, _logits(REFERENCE, params)) <= ATOL


def _f_order_split(x, heads, axis):  # column d * H + h: a transposed reshape
  shape = x.shape[:axis] + (x.shape[axis] // heads, heads) + x.shape[axis + 1:]
  return np.swapaxes(x.reshape(shape), axis, axis + 1)


@pytest.mark.parametrize("tie, patch", [
    (False, lambda mp: mp.setitem(t5x._DEFAULTS, "rescale_logits", True)),  # query scale kept
    (False, lambda mp: mp.setattr(t5x, "_split_heads", _f_order_split)),
    (False, lambda mp: mp.setitem(t5x._DEFAULTS, "rotary_fraction", 0.5)),
    (True, lambda mp: mp.setattr(t5x, "_untie", lambda emb: emb.T)),  # no 1/sqrt(E)
], ids=["query_scale", "transposed_heads", "rotary_fraction", "tied_head_scale"])
def test_each_mapping_step_is_needed(tmp_path, monkeypatch, tie, patch):
  module = REFERENCE.clone(tie_embeddings=tie)
  params = _params(module)
  path = write(tmp_path, flaxformer_target(module, params))
  reference = _logits(module, params) / (np.sqrt(module.embed_dim) if tie else 1.0)
  assert _diff(load(path), reference) <= ATOL
  patch(monkeypatch)
  diff = _diff(load(path), reference)
  print(f"max |converted - reference| with the step undone: {diff:.3e}")
  assert diff > 100 * ATOL


CONFIG_GIN = """\
from __gin__ import dynamic_registration
import flaxformer.architectures.perceiver_ar.dense_attention

# Macros:
# ==============================================================================
ACTIVATION_DTYPE = 'bfloat16'
HEAD_DIM = 4
NUM_HEADS = 3
NUM_LATENTS = 4
TASK_FEATURE_LENGTHS = {'inputs': None, 'targets': 32}

# Parameters for dense_attention.MultiHeadDotProductAttention:
# ==============================================================================
dense_attention.MultiHeadDotProductAttention.head_dim = %HEAD_DIM
dense_attention.MultiHeadDotProductAttention.num_heads = %NUM_HEADS
dense_attention.MultiHeadDotProductAttention.rescale_logits = True  # scaled at run time
dense_attention.MultiHeadDotProductAttention.use_rotary_embedding = True

# Parameters for dense.MlpBlock:
# ==============================================================================
dense.MlpBlock.activations = ('gelu',
                              'linear')
dense.MlpBlock.intermediate_dim = %MLP_DIM

# Parameters for perceiver_ar_architecture.DecoderOnly:
# ==============================================================================
perceiver_ar_architecture.DecoderOnly.num_latents = %NUM_LATENTS
"""


def test_settings_come_from_the_runs_config_gin(tmp_path):
  """rescale_logits=True there: the kernel holds no 1/sqrt(D) and ours scales at run time."""
  params = _params(REFERENCE)
  path = write(tmp_path, flaxformer_target(REFERENCE, params, rescale_logits=True))
  (tmp_path / "run" / "config.gin").write_text(CONFIG_GIN)
  converted = t5x.load_t5x(path + f"/checkpoint_{STEP}")
  assert converted.module.block.scale_query and converted.module.max_length == 32
  assert _diff(converted, _logits(REFERENCE, params)) <= ATOL
  with pytest.raises(model_dir.ConversionError, match="num_heads=2 was given but"):
    t5x.load_t5x(path, num_heads=2)
  written = model_dir.write_model_dir(str(tmp_path / "ours"), converted)
  assert "block.BlockOptions.scale_query = True" in open(written).read()
  loaded, step, _ = checkpoints.load_params(PerceiverARModel(converted.module),
                                            str(tmp_path / "ours"), 9)
  assert step == STEP and _diff(converted, _logits(converted.module, loaded)) == 0.0


def test_gin_bindings_read_operative_configs_and_blocks():
  bindings = gin_text.parse_bindings(CONFIG_GIN + """
perceiver_ar_architecture.Decoder:
  num_latents = %NUM_LATENTS  # a block
  scan_axis = 1
output_logits/dense.DenseGeneral.features = 99
""")
  assert bindings["dense.MlpBlock.activations"] == "('gelu', 'linear')"
  assert bindings["perceiver_ar_architecture.Decoder.num_latents"] == "%NUM_LATENTS"
  assert t5x._lookup(bindings, "num_latents", "x") == 4
  assert t5x._lookup(bindings, "max_length", "x") == 32
  assert t5x._lookup(bindings, "activations", "x") == ("gelu", "linear")


def _error(path, **kwargs) -> str:
  with pytest.raises(model_dir.ConversionError) as e:
    load(str(path), **kwargs)
  assert "\n" not in str(e.value)
  return str(e.value)


def test_what_does_not_fit_is_one_line(tmp_path):
  params = _params(REFERENCE)
  target = flaxformer_target(REFERENCE, params)
  path = write(tmp_path, target)
  assert "num_heads is not in a T5X checkpoint" in _error(path, num_heads=None)
  assert "not a multiple of num_heads=5" in _error(path, num_heads=5)
  assert "Not a T5X checkpoint" in _error(tmp_path / "nothing_here")
  assert "does not exist" in _error(path, gin_config=str(tmp_path / "missing.gin"))
  target["decoder"]["relpos_bias"] = {"rel_embedding": np.zeros((3, 32), np.float32)}
  assert "unknown param decoder/relpos_bias/rel_embedding" in _error(write(tmp_path, target,
                                                                           name="relpos"))
  del target["decoder"]["relpos_bias"]
  target["encoder"] = {"encoder_norm": {"scale": np.ones(10, np.float32)}}
  assert "expected a flaxformer DecoderOnly" in _error(write(tmp_path, target, name="encdec"))
  plain = REFERENCE.clone(block=BlockOptions(gated_mlp=False))
  plain_path = write(tmp_path, flaxformer_target(plain, _params(plain)), name="plain")
  assert "a plain MLP needs the run's config.gin" in _error(plain_path)
  (tmp_path / "plain" / "config.gin").write_text(
      "dense_attention.MultiHeadDotProductAttention.use_rotary_embedding = False\n")
  assert "use_rotary_embedding=False" in _error(plain_path)
