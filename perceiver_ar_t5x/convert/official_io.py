"""Imports OFFICIAL Perceiver IO params (google-deepmind/deepmind-research perceiver/, Haiku).

Two official models are recognised from their param names: the masked-language model of
the perceiver/colabs MLM notebook (hk.Embed + TrainablePositionEncoding input, PerceiverEncoder,
BasicDecoder with trainable output positions and final_project=False, EmbeddingDecoder) and
the classifier of the ImageNet notebook's pixel + Fourier path (ImagePreprocessor
prep_type='pixels', PerceiverEncoder, ClassificationDecoder). What differs from a copy
(`_mapping`, `_transforms`; proof: tests/convert/test_official_io.py):
  - Haiku Linear is [in, out] (no transpose); q/k/v columns and out rows split head-major.
  - haiku LayerNorm `offset` is our norm `bias`; jax.nn.gelu is the tanh form (GELU_TANH).
  - sizes (channels, widening, latents, vocab, tables) come from the param shapes; what
    Haiku params do not record (head counts, num_blocks, query residuals, the Fourier
    settings and index dims) from the run's kwargs (`config`) or keyword overrides, with
    the official class defaults where neither says.
Haiku params have no step: the result has step 0.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from perceiver_ar_t5x import fileio
from perceiver_ar_t5x.convert import model_dir
from perceiver_ar_t5x.convert.model_dir import ConversionError, Converted
from perceiver_ar_t5x.layers.block import BlockOptions
from perceiver_ar_t5x.layers.mlp import Activation
from perceiver_ar_t5x.layers.norms import NormKind
from perceiver_ar_t5x.perceiver_io import ArrayInput, Head, PerceiverIO, TokenInput

ENCODER = "perceiver_encoder/~/"
DECODERS = {Head.MLM: "basic_decoder/", Head.CLASSIFY: "classification_decoder/~/basic_decoder/"}
POS = "trainable_position_encoding/pos_embs"
# Haiku's blocks: hk.LayerNorm (eps 1e-5, scale + offset), biased hk.Linear, jax.nn.gelu (tanh).
HAIKU_BLOCK = BlockOptions(norm=NormKind.LAYER, norm_epsilon=1e-5, use_bias=True,
                           activation=Activation.GELU_TANH, gated_mlp=False)
# Our field <- (kwargs group, official name, the official class default).
_SETTINGS = {
    "num_blocks": ("encoder", "num_blocks", 8),
    "num_cross_attend_heads": ("encoder", "num_cross_attend_heads", 1),
    "num_self_attend_heads": ("encoder", "num_self_attend_heads", 8),
    "use_query_residual": ("encoder", "use_query_residual", True),
    "num_decoder_heads": ("decoder", "num_heads", 1),
    "decoder_query_residual": ("decoder", "use_query_residual", False),
    "num_bands": ("fourier", "num_bands", None),
    "max_resolution": ("fourier", "max_resolution", None),
    "concat_pos": ("fourier", "concat_pos", True),
    "sine_only": ("fourier", "sine_only", False)}
# Official kwargs whose value changes the model beyond what the params show: what ours does.
_SUPPORTED = {
    ("decoder", "position_encoding_type"): ("trainable",), ("decoder", "project_pos_dim"): (-1,),
    ("decoder", "concat_preprocessed_input"): (False,),
    ("decoder", "subsampled_index_dims"): (None,), ("preprocessor", "prep_type"): ("pixels",),
    ("preprocessor", "spatial_downsample"): (1,), ("preprocessor", "temporal_downsample"): (1,),
    ("preprocessor", "position_encoding_type"): ("fourier",),
    ("preprocessor", "concat_or_add_pos"): ("concat",), ("preprocessor", "n_extra_pos_mlp"): (0,),
    ("preprocessor", "project_pos_dim"): (-1,)}


def read_params(path: str) -> dict[str, np.ndarray]:
  """{'module/name': array} from params.npz (flat names), its folder, or a Haiku pickle.

  A pickle ({module: {name: array}}, optionally under 'params', as the colabs' released
  checkpoints are) is read with official.py's restricted unpickler: arrays come back as
  numpy and nothing else is built.
  """
  from perceiver_ar_t5x.convert import official

  file = os.path.join(path, "params.npz") if fileio.gfile.isdir(path) else path
  with fileio.gfile.GFile(file, "rb") as f:
    data = f.read()
  if data[:2] == b"PK":
    with np.load(io.BytesIO(data)) as npz:
      flat = {k: np.asarray(npz[k]) for k in npz.files}
  else:
    tree = official._Unpickler(io.BytesIO(data)).load()
    tree = tree.get("params", tree) if isinstance(tree, Mapping) else tree
    if not isinstance(tree, Mapping):
      raise ConversionError(f"{file}: not Haiku params ({{module: {{name: array}}}})")
    flat = {f"{m}/{n}": v for m, names in tree.items() for n, v in dict(names).items()}
  bad = [k for k, v in flat.items() if "/" not in k or not isinstance(v, np.ndarray)]
  if bad:
    raise ConversionError(f"{file}: {bad[0]} is not a Haiku 'module/name' array")
  return flat


def settings(config: Mapping[str, Any] | str | None, overrides: Mapping[str, Any]
             ) -> tuple[dict[str, Any], list[str]]:
  """Our settings from the official kwargs ({'encoder', 'decoder', 'input_preprocessor',
  'index_dims' or 'image_shape'}) and overrides (our field names); report lines for defaults."""
  if isinstance(config, str):
    with fileio.gfile.GFile(config) as f:
      config = json.load(f)
  config = dict(config or {})
  prep = dict(config.get("input_preprocessor") or {})
  groups = {"encoder": dict(config.get("encoder") or {}),
            "decoder": dict(config.get("decoder") or {}), "preprocessor": prep,
            "fourier": dict(prep.get("fourier_position_encoding_kwargs") or {})}
  for (group, key), allowed in _SUPPORTED.items():
    if key in groups[group] and groups[group][key] not in allowed:
      raise ConversionError(f"{group} {key}={groups[group][key]!r} has no equivalent in our "
                            f"PerceiverIO (supported: {allowed})")
  unknown = set(overrides) - set(_SETTINGS) - {"index_dims"}
  if unknown:
    raise ConversionError(f"unknown overrides {sorted(unknown)}; known: "
                          f"{sorted(_SETTINGS) + ['index_dims']}")
  out, report = {}, []
  for ours, (group, key, default) in _SETTINGS.items():
    if ours in overrides:
      out[ours] = overrides[ours]
    elif key in groups[group]:
      out[ours] = groups[group][key]
    else:
      out[ours] = default
      if group != "fourier":
        report.append(f"official class default: {group} {key}={default!r}")
  dims = overrides.get("index_dims", config.get("index_dims", config.get("image_shape", [])[:-1]))
  out["index_dims"] = tuple(int(d) for d in dims) or None
  if out["max_resolution"] is not None:
    out["max_resolution"] = tuple(int(r) for r in out["max_resolution"])
  return out, report


def _widening(p: Mapping[str, np.ndarray], prefix: str, width: int) -> int:
  hidden = p[prefix + "mlp/linear/w"].shape[1]
  if hidden % width:
    raise ConversionError(f"{prefix}mlp: {hidden} hidden units are no multiple of {width}")
  return hidden // width


def _self_prefixes(p: Mapping[str, np.ndarray]) -> list[str]:
  out = []
  while f"{ENCODER}self_attention{f'_{len(out)}' if out else ''}/attention/linear/w" in p:
    out.append(f"{ENCODER}self_attention{f'_{len(out)}' if out else ''}/")
  return out


def _input_adapter(p: Mapping[str, np.ndarray], head: Head, s: dict[str, Any]
                   ) -> tuple[TokenInput | ArrayInput, tuple[int, ...]]:
  """Our input adapter and an example input shape (for the param check)."""
  if head == Head.MLM:
    vocab, features = p["embed/embeddings"].shape
    length = p[POS].shape[0]
    return TokenInput(vocab, features, length), (1, length)
  if s["index_dims"] is None or s["num_bands"] is None:
    raise ConversionError("Fourier inputs need index_dims (or image_shape) and "
                          "input_preprocessor.fourier_position_encoding_kwargs.num_bands")
  adapter = ArrayInput(s["index_dims"], s["num_bands"], s["max_resolution"],
                       concat_pos=bool(s["concat_pos"]), sine_only=bool(s["sine_only"]))
  dims = len(s["index_dims"])
  fourier = dims * s["concat_pos"] + dims * s["num_bands"] * (1 if s["sine_only"] else 2)
  channels = p[ENCODER + "cross_attention/attention/linear_1/w"].shape[0] - fourier
  if channels <= 0:
    raise ConversionError(f"the encoder reads {channels + fourier} channels, fewer than the "
                          f"{fourier} Fourier features of these settings")
  return adapter, (1, *s["index_dims"], channels)


def architecture(p: Mapping[str, np.ndarray], s: dict[str, Any]
                 ) -> tuple[PerceiverIO, tuple[int, ...]]:
  """Our module (sizes from the shapes, the rest from settings) and an example input shape."""
  head = Head.MLM if "embedding_decoder/bias" in p else Head.CLASSIFY
  dec = DECODERS[head]
  if dec + "cross_attention/attention/linear/w" not in p or ENCODER + POS not in p:
    raise ConversionError("neither the official MLM (basic_decoder/, embedding_decoder/) nor "
                          "the classifier (classification_decoder/) layout")
  adapter, example = _input_adapter(p, head, s)
  num_latents, latent_dim = p[ENCODER + POS].shape
  num_outputs, decoder_dim = p[dec + "~/" + POS].shape
  selfs = _self_prefixes(p)
  cross, att = ENCODER + "cross_attention/", "attention/linear"
  module = PerceiverIO(
      input_adapter=adapter, num_latents=num_latents, latent_dim=latent_dim,
      num_outputs=num_outputs, decoder_dim=decoder_dim, head=head,
      num_classes=p[dec + "output/w"].shape[1] if head == Head.CLASSIFY else 0,
      num_blocks=s["num_blocks"], num_self_attends_per_block=len(selfs),
      num_self_attend_heads=s["num_self_attend_heads"],
      self_attend_qk_channels=p[selfs[0] + att + "/w"].shape[1] if selfs else None,
      self_attend_v_channels=p[selfs[0] + att + "_2/w"].shape[1] if selfs else None,
      self_attend_widening_factor=_widening(p, selfs[0], latent_dim) if selfs else 1,
      num_cross_attend_heads=s["num_cross_attend_heads"],
      cross_attend_qk_channels=p[cross + att + "/w"].shape[1],
      cross_attend_v_channels=p[cross + att + "_2/w"].shape[1],
      cross_attend_widening_factor=_widening(p, cross, latent_dim),
      use_query_residual=bool(s["use_query_residual"]), num_decoder_heads=s["num_decoder_heads"],
      decoder_qk_channels=p[dec + "cross_attention/" + att + "/w"].shape[1],
      decoder_v_channels=p[dec + "cross_attention/" + att + "_2/w"].shape[1],
      decoder_widening_factor=_widening(p, dec + "cross_attention/", decoder_dim),
      decoder_query_residual=bool(s["decoder_query_residual"]), block=HAIKU_BLOCK)
  return module, example


def _block_rows(src: str, dst: str, heads: int, cross: bool) -> list[tuple[str, str, str, int]]:
  """(official, ours, transform, heads) for one attention + MLP block."""
  norms = ["pre_attention_norm"] + ["pre_attention_kv_norm"] * cross + ["pre_mlp_norm"]
  rows = [(f"{src}layer_norm{f'_{i}' if i else ''}/{a}", f"{dst}{norm}/{b}", "copy", heads)
          for i, norm in enumerate(norms) for a, b in (("scale", "scale"), ("offset", "bias"))]
  for lin, ours in (("linear", "query"), ("linear_1", "key"), ("linear_2", "value")):
    rows += [(f"{src}attention/{lin}/w", f"{dst}attention/{ours}", "heads", heads),
             (f"{src}attention/{lin}/b", f"{dst}attention/{ours}_bias", "heads", heads)]
  rows += [(f"{src}attention/linear_3/w", f"{dst}attention/out", "heads_in", heads),
           (f"{src}attention/linear_3/b", f"{dst}attention/out_bias", "copy", heads)]
  return rows + [(f"{src}mlp/{lin}/{a}", f"{dst}mlp/{ours}{b}", "copy", heads)
                 for lin, ours in (("linear", "wi"), ("linear_1", "wo"))
                 for a, b in (("w", ""), ("b", "_bias"))]


def mapping(module: PerceiverIO) -> list[tuple[str, str, str, int]]:
  """(official path, our path, transform, heads) for every parameter of `module`."""
  dec = DECODERS[module.head]
  rows = [(ENCODER + POS, "latents", "copy", 0), (dec + "~/" + POS, "output_queries", "copy", 0)]
  if module.head == Head.MLM:
    rows += [("embed/embeddings", "input_adapter/token_embed/embedding", "copy", 0),
             ("trainable_position_encoding/pos_embs", "input_adapter/positions/embedding",
              "copy", 0), ("embedding_decoder/bias", "logits_bias", "copy", 0)]
  else:
    rows += [(dec + "output/w", "classifier/kernel", "copy", 0),
             (dec + "output/b", "classifier/bias", "copy", 0)]
  rows += _block_rows(ENCODER + "cross_attention/", "encoder/", module.num_cross_attend_heads,
                      True)
  for i in range(module.num_self_attends_per_block):
    rows += _block_rows(f"{ENCODER}self_attention{f'_{i}' if i else ''}/", f"self_attend_{i}/",
                        module.num_self_attend_heads, False)
  return rows + _block_rows(dec + "cross_attention/", "decoder/", module.num_decoder_heads, True)


def transform(how: str, x: np.ndarray, heads: int) -> np.ndarray:
  """copy; heads: last axis [H * D] head-major -> [H, D]; heads_in: first axis likewise."""
  if how == "heads":
    return x.reshape(x.shape[:-1] + (heads, x.shape[-1] // heads))
  if how == "heads_in":
    return x.reshape((heads, x.shape[0] // heads) + x.shape[1:])
  return x


def convert_params(p: Mapping[str, np.ndarray], module: PerceiverIO
                   ) -> tuple[dict[str, Any], list[str]]:
  """Our nested params and one report line per row; unknown or missing -> ConversionError."""
  rows = mapping(module)
  names = {src for src, _, _, _ in rows}
  unknown, missing = sorted(set(p) - names), sorted(names - set(p))
  if unknown or missing:
    which = f"unknown param {unknown[0]}" if unknown else f"missing param {missing[0]}"
    raise ConversionError(f"not an official Perceiver IO model this importer knows: {which} "
                          f"({len(unknown)} unknown, {len(missing)} missing)")
  flat, report = {}, []
  for src, dst, how, heads in rows:
    if how != "copy" and p[src].shape[0 if how == "heads_in" else -1] % heads:
      raise ConversionError(f"{src} {p[src].shape} does not split into {heads} heads")
    flat[dst] = np.asarray(transform(how, p[src], heads), np.float32)
    what = "copied" if how == "copy" else f"head-major split into {heads} heads"
    report.append(f"{src} {list(p[src].shape)} -> {dst} {list(flat[dst].shape)}: {what}")
  return model_dir.nest(flat), report


def load(path: str, config: Mapping[str, Any] | str | None = None, **overrides: Any
         ) -> Converted:
  """Official Haiku params (params.npz, its folder, or a pickle) as our PerceiverIO.

  config: the run's kwargs as a dict or JSON path ({'encoder': PerceiverEncoder kwargs,
  'decoder': BasicDecoder kwargs, 'input_preprocessor': ImagePreprocessor kwargs,
  'index_dims' or 'image_shape'}); default: config.json beside params.npz. overrides: our
  field names (num_self_attend_heads, num_blocks, index_dims, ...). Call the result as
  `module.apply({'params': params}, inputs, input_mask=mask)`. The official MLM also masks
  the decoder's padded query rows (query_mask); ours decodes them, so padded positions'
  logits differ (real positions match).
  """
  raw = read_params(path)
  if config is None and fileio.gfile.isdir(path):
    candidate = os.path.join(path, "config.json")
    config = candidate if fileio.gfile.exists(candidate) else None
  s, report = settings(config, overrides)
  module, example = architecture(raw, s)
  params, rows = convert_params(raw, module)
  model_dir.check_params(module, params, example)
  return Converted(module=module, params=params, step=0, source=f"official Perceiver IO {path}",
                   report=report + rows, input_shape=example)
