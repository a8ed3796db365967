"""Imports official Perceiver AR checkpoints (google-research/perceiver-ar, Haiku) into our model.

checkpoint.dill is read without dill/haiku/optax/jax: arrays come back as numpy, haiku mappings
as dicts, unknown classes as inert stubs, so the pickle builds nothing but data. `_mapping` is
the table of what maps to what (math: scripts/fixtures/official_numpy_reference.py; proof:
tests/convert/test_official.py): head-major heads; interleaved rotary pairs -> our halves
(`_pair_order`); linspace wavelengths (`_max_timescale`); terminal-relative rotary = negated
positions (`_pair_signs`); the absolute table read at 1-based positions, ours 0-based
(`_ROW_SHIFT`). Heads, latents and rotary settings come from the run's `perceiver_ar_kwargs`.
"""

from __future__ import annotations

import collections
import json
import math
import os
import pickle
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from perceiver_ar_t5x import fileio
from perceiver_ar_t5x.convert import model_dir
from perceiver_ar_t5x.convert.model_dir import ConversionError, Converted, check_params
from perceiver_ar_t5x.layers.block import BlockOptions, CrossKvNorm
from perceiver_ar_t5x.layers.embedding import PositionEncoding
from perceiver_ar_t5x.layers.mlp import Activation
from perceiver_ar_t5x.layers.norms import NormKind
from perceiver_ar_t5x.perceiver_ar import PerceiverAR

ROOT = "perceiver_ar/~/"
_ROW_SHIFT = 1  # official table row = our 0-based position + 1 (row 0 is the PAD position)
_ACTIVATIONS = {"sq_relu": Activation.SQUARED_RELU, "gelu": Activation.GELU_TANH,
                "relu": Activation.RELU}  # get_activation: jax.nn.gelu is the tanh form
_INIT_ARGS = frozenset("""num_classes input_idx_size max_context_length position_encoding_type
  input_embed_dim position_encoding learnable_position_embeddings num_transformers_per_block
  z_index_dim num_z_channels num_cross_attend_heads num_transformer_heads dropout_prob
  cross_attend_widening_factor transformer_widening_factor initial_query_offsetting concat_pos
  initial_query_embed_style share_learned_initial_query initial_query_embed_activation_name
  initial_query_embed_num_layers include_initial_cross_attention z_pos_enc_init_scale name
  additional_cross_attend_after_layers cross_attention_shape_for_attn encoder_use_query_residual
  mask_style latent_dropout_prob encoder_dropout_prob num_latents_per_position activation_name
  fraction_to_rotate fraction_heads_to_rotate max_wavelength cross_attention_head_group_size
  chunked_cross_attention chunked_cross_query_size chunked_cross_key_size train_input_positions
  use_positions_from_data final_layer_init_zeros use_negative_rotary_positions""".split())
_REQUIRED = ("num_cross_attend_heads", "num_transformer_heads", "z_index_dim")
_DEFAULTS = dict(activation_name="sq_relu", fraction_to_rotate=0.5, use_positions_from_data=True,
                 use_negative_rotary_positions=False,
                 learnable_position_embeddings=False)  # experiment.get_config's values
_SUPPORTED = dict(num_latents_per_position=(1,), initial_query_embed_style=("none",),
                  initial_query_offsetting=(False,), include_initial_cross_attention=(True,),
                  encoder_use_query_residual=(True,), mask_style=("final_block",),
                  additional_cross_attend_after_layers=([], None), fraction_heads_to_rotate=(1.0,),
                  activation_name=tuple(_ACTIVATIONS))  # the values ours can express


def _reconstruct_array(fun: Any, args: Any, arr_state: Any, aval_state: Any) -> np.ndarray:
  """jax's _reconstruct_array / reconstruct_device_array without the device_put."""
  value = fun(*args)
  value.__setstate__(arr_state)
  return value


class _Stub:
  """Any class the reader does not know (optax, schedules, dill helpers): inert data."""

  def __init__(self, *args: Any, **kwargs: Any) -> None:
    self.args, self.kwargs = args, kwargs

  def __setstate__(self, state: Any) -> None:
    self.state = state


class _Unpickler(pickle.Unpickler):
  """numpy and harmless builtins as themselves, arrays as numpy, the rest as `_Stub`s."""

  _REPLACED: dict[tuple[str, str], Any] = {
      ("jax._src.array", "_reconstruct_array"): _reconstruct_array,
      ("jax._src.device_array", "reconstruct_device_array"): _reconstruct_array,
      ("dill._dill", "_create_namedtuple"):  # dill pickles optax's NamedTuple classes by value
          lambda name, fields, module, defaults=None: collections.namedtuple(
              name, fields, defaults=defaults),
      ("haiku._src.data_structures", "FlatMapping"): dict,
      ("haiku._src.data_structures", "frozendict"): dict}
  _SAFE = {"builtins": {"dict", "list", "tuple", "set", "frozenset", "int", "float", "complex",
                        "bool", "str", "bytes", "bytearray", "slice", "range", "object"},
           "numpy": {"ndarray", "dtype"}, "numpy._core.multiarray": {"_reconstruct", "scalar"},
           "numpy.core.multiarray": {"_reconstruct", "scalar"}, "_codecs": {"encode"},
           "collections": {"OrderedDict"}, "copyreg": {"_reconstructor"}}

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in self._REPLACED:
      return self._REPLACED[(module, name)]
    if name in self._SAFE.get(module, ()):
      return super().find_class(module, name)
    return type(name, (_Stub,), {})


def read_checkpoint(path: str) -> tuple[dict[str, np.ndarray], int]:
  """({'<module path>/<name>': array}, global_step) from checkpoint.dill or its folder."""
  file = os.path.join(path, "checkpoint.dill") if fileio.gfile.isdir(path) else path
  what = f"{file} is not an official Perceiver AR checkpoint (a dill pickle of {{'params', ...}})"
  try:
    with fileio.gfile.GFile(file, "rb") as f:
      checkpoint = _Unpickler(f).load()
  except (pickle.UnpicklingError, EOFError) as e:
    raise ConversionError(f"{what}: {type(e).__name__} {str(e)[:80]!r}") from None
  if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("params"), Mapping):
    raise ConversionError(what)
  flat = {f"{module}/{name}": value for module, names in checkpoint["params"].items()
          for name, value in (names.items() if isinstance(names, Mapping) else [("?", names)])}
  for name, value in flat.items():
    if not isinstance(value, np.ndarray):
      raise ConversionError(f"{what}: param {name} is a {type(value).__name__}")
  return flat, int(np.asarray(checkpoint.get("global_step", 0)))


def _settings(config: Mapping[str, Any] | str | None) -> tuple[dict[str, Any], list[str]]:
  """The official kwargs (from kwargs, reference.json or an experiment config), defaults taken."""
  if isinstance(config, str):
    with fileio.gfile.GFile(config) as f:
      config = json.load(f)
  cfg = dict(config or {})
  for key in ("model_constructor", "experiment_kwargs", "config", "model", "perceiver_ar_kwargs"):
    cfg = dict(cfg[key]) if isinstance(cfg.get(key), Mapping) else cfg
  if set(cfg) - _INIT_ARGS:
    raise ConversionError(f"config keys {sorted(set(cfg) - _INIT_ARGS)} are not PerceiverAR "
                          f"arguments (use the run's perceiver_ar_kwargs names)")
  missing = [k for k in _REQUIRED if k not in cfg]
  if missing:
    raise ConversionError(f"the checkpoint's params do not show {missing}: pass them in the "
                          f"config (--config JSON with the run's perceiver_ar_kwargs)")
  taken = [f"config default (experiment.get_config): {k}={v!r}"
           for k, v in _DEFAULTS.items() if k not in cfg]
  cfg = {**_DEFAULTS, **cfg}
  for key, allowed in _SUPPORTED.items():
    if cfg.get(key, allowed[0]) not in allowed:
      raise ConversionError(f"{key}={cfg[key]!r} has no equivalent in our model (ours: {allowed})")
  return cfg, taken


def _max_timescale(max_wavelength: float, half: int) -> float:
  """Ours: max_timescale ** (i / half); official: max_wavelength ** (i / (half - 1)) (linspace)."""
  return float(max_wavelength) ** (half / (half - 1)) if half > 1 else float(max_wavelength)


def _positions(p: dict[str, np.ndarray], cfg: dict[str, Any], head_dim: int) -> dict[str, Any]:
  """Our position fields: a shifted (frozen) table, or rotary with the corrected timescale."""
  if ROOT + "embed_1/embeddings" in p:  # position_encoding_type='absolute' (a second: unknown)
    if not cfg["use_positions_from_data"]:
      raise ConversionError("absolute positions counted from each example's end "
                            "(use_positions_from_data=False) have no equivalent in our model")
    return dict(position_encoding=PositionEncoding.LEARNED,
                max_length=p[ROOT + "embed_1/embeddings"].shape[0] - _ROW_SHIFT,
                position_table_trainable=bool(cfg["learnable_position_embeddings"]))
  if "max_wavelength" not in cfg:
    raise ConversionError("rotary checkpoints need max_wavelength in the config "
                          "(experiment.get_config sets it to max_context_length)")
  half = math.floor(head_dim * cfg["fraction_to_rotate"] / 2)
  return dict(position_encoding=PositionEncoding.ROTARY,
              rotary_fraction=float(cfg["fraction_to_rotate"]),
              max_timescale=_max_timescale(cfg["max_wavelength"], half))


def _architecture(p: dict[str, np.ndarray], cfg: dict[str, Any]) -> PerceiverAR:
  """Our module: sizes from the param shapes, the rest from the settings."""
  vocab, embed = p[ROOT + "embed/embeddings"].shape
  z, heads = p[ROOT + "linear/w"].shape[1], cfg["num_cross_attend_heads"]
  if embed != z or heads != cfg["num_transformer_heads"] or embed % heads:
    raise ConversionError(f"ours needs input_embed_dim == num_z_channels and one head count "
                          f"dividing it; got {embed}, {z} and heads {heads}, "
                          f"{cfg['num_transformer_heads']}")
  layers = 0
  while _self_prefix(layers) + "attention/linear/w" in p:
    layers += 1
  cross_mlp = p[ROOT + "cross_attention/dense/linear/w"].shape[1]
  mlp = p[_self_prefix(0) + "dense/linear/w"].shape[1] if layers else cross_mlp
  block = BlockOptions(norm=NormKind.LAYER, norm_epsilon=1e-5, use_bias=True,
                       activation=_ACTIVATIONS[cfg["activation_name"]], gated_mlp=False,
                       scale_query=True, cross_kv_norm=CrossKvNorm.SEPARATE)
  return PerceiverAR(vocab_size=vocab, num_latents=int(cfg["z_index_dim"]), embed_dim=embed,
                     num_heads=heads, head_dim=embed // heads, mlp_dim=mlp, num_layers=1 + layers,
                     cross_mlp_dim=None if cross_mlp == mlp else cross_mlp, output_bias=True,
                     final_norm=True, latent_query_projection=True, block=block,
                     **_positions(p, cfg, embed // heads))


def _self_prefix(index: int) -> str:
  return ROOT + ("self_attention/" if index == 0 else f"self_attention_{index}/")


def _mapping(num_layers: int, absolute: bool) -> list[tuple[str, str, str]]:
  """(official path, our path, transform) for every parameter."""
  rows = [("embed/embeddings", "token_embedder/embedding", "copy"),
          ("linear/w", "latent_query/kernel", "copy"), ("linear/b", "latent_query/bias", "copy"),
          ("logits/w", "logits_dense/kernel", "copy"), ("logits/b", "logits_bias", "copy")]
  rows = [(ROOT + src, dst, how) for src, dst, how in rows]
  rows += [("perceiver_ar/layer_norm/scale", "decoder_norm/scale", "copy"),
           ("perceiver_ar/layer_norm/offset", "decoder_norm/bias", "copy")]
  if absolute:
    rows.append((ROOT + "embed_1/embeddings", "position_embedder/embedding", "drop_rows"))
  for i in range(num_layers):
    src = ROOT + "cross_attention/" if i == 0 else _self_prefix(i - 1)
    dst = f"layers_{i}/"
    norms = ["pre_attention_norm"] + ["pre_attention_kv_norm"] * (i == 0) + ["pre_mlp_norm"]
    rows += [(f"{src}layer_norm{f'_{k}' if k else ''}/{a}", f"{dst}{norm}/{b}", "copy")
             for k, norm in enumerate(norms) for a, b in (("scale", "scale"), ("offset", "bias"))]
    rows += [(f"{src}attention/{lin}/{a}", f"{dst}attention/{ours}{b}", how)
             for lin, ours, how in (("linear", "query", "rotary_heads"), ("linear_1", "key",
                                    "rotary_heads"), ("linear_2", "value", "heads"))
             for a, b in (("w", ""), ("b", "_bias"))]
    rows += [(src + "attention/linear_3/w", dst + "attention/out", "heads_in"),
             (src + "attention/linear_3/b", dst + "attention/out_bias", "copy")]
    rows += [(f"{src}dense/{lin}/{p}", f"{dst}mlp/{ours}{suffix}", "copy")
             for lin, ours in (("linear", "wi"), ("linear_1", "wo"))
             for p, suffix in (("w", ""), ("b", "_bias"))]
  return rows


def _pair_order(n: int) -> np.ndarray:
  """Our column j of the n rotated ones <- official column: pairs (2i, 2i+1) -> (i, n/2 + i)."""
  return np.concatenate([np.arange(0, n, 2), np.arange(1, n, 2)])


def _pair_signs(n: int, negate: bool) -> np.ndarray:
  """-1 on each pair's second element (our second half) to rotate by negated positions."""
  return np.concatenate([np.ones(n // 2), np.full(n // 2, -1.0 if negate else 1.0)])


def _transforms(module: PerceiverAR, negate: bool
                ) -> dict[str, tuple[Callable[[np.ndarray], np.ndarray], str]]:
  """Transform name -> (function, what the report says it does)."""
  heads, d = module.num_heads, module.head_dim
  n = math.floor(d * module.rotary_fraction / 2) * 2
  rotary = module.position_encoding == PositionEncoding.ROTARY and n > 0

  def split(x: np.ndarray) -> np.ndarray:  # [..., H * D] head-major -> [..., H, D]
    return x.reshape(x.shape[:-1] + (heads, d))

  def rotary_heads(x: np.ndarray) -> np.ndarray:
    order = np.concatenate([_pair_order(n), np.arange(n, d)])
    signs = np.concatenate([_pair_signs(n, negate), np.ones(d - n)])
    return (split(x)[..., order] * signs).astype(x.dtype) if rotary else split(x)

  pairs = (f"; rotary pairs (2i, 2i+1) of the first {n} -> (i, {n // 2}+i)"
           + ", second ones negated (terminal-relative)" * negate) * rotary
  return {"copy": (lambda x: x, "copied"), "heads": (split, "head-major -> heads"),
          "rotary_heads": (rotary_heads, "head-major -> heads" + pairs),
          "heads_in": (lambda x: x.reshape((heads, d) + x.shape[1:]), "head-major rows -> heads"),
          "drop_rows": (lambda x: x[_ROW_SHIFT:], f"PAD row dropped: p reads row p+{_ROW_SHIFT}")}


def convert_params(p: dict[str, np.ndarray], module: PerceiverAR, negate: bool
                   ) -> tuple[dict[str, Any], list[str]]:
  """Our nested params and one report line per mapping row; unknown/missing -> ConversionError."""
  rows = _mapping(module.num_layers, module.position_encoding == PositionEncoding.LEARNED)
  names = {src for src, _, _ in rows}
  unknown, missing = sorted(set(p) - names), sorted(names - set(p))
  if unknown or missing:
    which = f"unknown param {unknown[0]}" if unknown else f"missing param {missing[0]}"
    raise ConversionError(f"not an official Perceiver AR model this importer knows: {which} "
                          f"({len(unknown)} unknown, {len(missing)} missing)")
  transforms, flat, report = _transforms(module, negate), {}, []
  for src, dst, how in rows:
    fn, what = transforms[how]
    try:
      value = np.asarray(fn(p[src]), np.float32)
    except ValueError as e:
      raise ConversionError(f"{src} {p[src].shape} does not fit {dst}: {e}") from None
    flat[dst] = value
    report.append(f"{src} {list(p[src].shape)} -> {dst} {list(value.shape)}: {what}")
  return model_dir.nest(flat), report


def load_official(path: str, config: Mapping[str, Any] | str | None = None) -> Converted:
  """An official checkpoint.dill (or its folder) as our model; config: the run's kwargs.

  config is a dict or JSON path (reference.json's `model_constructor` and experiment configs
  are unwrapped). The converted model takes 0-based positions (official data index - 1),
  latent_starts = each example's length (first PAD) - num_latents, the official vocabulary.
  """
  raw, step = read_checkpoint(path)
  cfg, taken = _settings(config)
  for key in ("embed/embeddings", "linear/w", "cross_attention/dense/linear/w"):
    if ROOT + key not in raw:
      raise ConversionError(f"{path}: no param {ROOT}{key}; not an official Perceiver AR model")
  module = _architecture(raw, cfg)
  rotary = module.position_encoding == PositionEncoding.ROTARY
  # terminal-relative positions n - 1 - t rotate as -t up to a shift (rotary is relative)
  negate = rotary and not (cfg["use_positions_from_data"] or cfg["use_negative_rotary_positions"])
  params, report = convert_params(raw, module, negate)
  check_params(module, params)
  notes = [f"rotary: max_timescale {module.max_timescale:.6g} = max_wavelength "
           f"{cfg['max_wavelength']} ** (half / (half - 1))"] if rotary else []
  return Converted(module=module, params=params, step=step,
                   source=f"official Perceiver AR {path}", report=taken + notes + report)
