"""Imports flaxformer Perceiver AR models trained with T5X (read by t5x_format.py) into ours.

The mapping, from flaxformer @ 399ea3a8 (perceiver_ar/dense_attention.py, rotary_embedding.py,
perceiver_ar_architecture.py; components/dense.py):
  - q/k/v kernels are stored 2-D [E, H*D] (DenseGeneral reshapes them C-order to [E, H, D]),
    `out` [H*D, E] -> [H, D, E] (`_split_heads`); the rest is copied, bfloat16 cast exactly.
  - The query scale is folded into the query kernel's init (`rescale_logits=False`), never
    applied at run time: ours runs with `scale_query=False` on the kernel as stored.
  - RoPE rotates all D channels, in halves, at timescales 1e4 ** (2j / D): our rotary_fraction
    1.0, max_timescale 1e4. Scanned: `layers_1` holds layers 1..L-1 stacked on axis 1.
  - A tied head (no `logits_dense`) divides its logits by sqrt(E): imported untied (`_untie`).
Heads and latents are not in 2-D kernels: they come from the arguments or the run's operative
`config.gin` (T5X writes it into the model dir), as do overrides of flaxformer's `_DEFAULTS`.
Library code never imports gin: gin_text.py reads the file as text.
"""

from __future__ import annotations

import itertools
import math
import posixpath
import re
from typing import Any

import jax
import numpy as np

from perceiver_ar_t5x import fileio
from perceiver_ar_t5x.convert import gin_text, model_dir
from perceiver_ar_t5x.convert.model_dir import ConversionError, Converted, check_params
from perceiver_ar_t5x.convert.t5x_format import read_t5x_checkpoint
from perceiver_ar_t5x.layers.block import BlockOptions
from perceiver_ar_t5x.layers.embedding import PositionEncoding
from perceiver_ar_t5x.layers.mlp import Activation
from perceiver_ar_t5x.perceiver_ar import PerceiverAR

_STEP_DIR = re.compile(r"checkpoint_\d+")
_ATT = "MultiHeadDotProductAttention."
# Setting -> (flaxformer bindings as `Class.param`, the gin macro read when none is bound).
_GIN_NAMES: dict[str, tuple[tuple[str, ...], str | None]] = {
    "num_heads": ((_ATT + "num_heads",), "NUM_HEADS"),
    "head_dim": ((_ATT + "head_dim",), "HEAD_DIM"),
    "num_latents": (("DecoderOnly.num_latents", "Decoder.num_latents",
                     "DecoderLayer.num_latents", "PerceiverARModel.num_latents"), "NUM_LATENTS"),
    "max_length": ((), "TASK_FEATURE_LENGTHS"),  # its 'targets'
    "use_rotary": ((_ATT + "use_rotary_embedding",), None),
    "max_timescale": ((_ATT + "rotary_embedding_max_timescale",), None),
    "rotary_fraction": ((_ATT + "rotary_embedding_fraction_to_rotate",), None),
    "rescale_logits": ((_ATT + "rescale_logits",), None),
    "activations": (("MlpBlock.activations",), None),
    "epsilon": (("T5LayerNorm.epsilon",), None),
    "scan_axis": (("Decoder.scan_axis",), None)}
_INTS = ("num_heads", "head_dim", "num_latents", "max_length", "scan_axis")
# flaxformer's values (perceiver_ar.gin over t5_1_1_flaxformer.gin, and the class defaults).
_DEFAULTS: dict[str, Any] = dict(use_rotary=True, max_timescale=1e4, rotary_fraction=1.0,
                                 rescale_logits=False, epsilon=1e-6, scan_axis=1)
_ACTIVATIONS = {"gelu": Activation.GELU_TANH, "relu": Activation.RELU}  # flax nn.gelu: tanh
_LAYER_ROWS = (  # flaxformer layer param -> ours, transform
    ("pre_self_attention_layer_norm/scale", "pre_attention_norm/scale", "copy"),
    ("self_attention/query/kernel", "attention/query", "heads_out"),
    ("self_attention/key/kernel", "attention/key", "heads_out"),
    ("self_attention/value/kernel", "attention/value", "heads_out"),
    ("self_attention/out/kernel", "attention/out", "heads_in"),
    ("pre_mlp_layer_norm/scale", "pre_mlp_norm/scale", "copy"),
    ("mlp/wo/kernel", "mlp/wo", "copy"))


def _lookup(bindings: dict[str, str], key: str, where: str) -> Any:
  """The unscoped binding of setting `key` (one value), else its macro, else None."""
  names, macro = _GIN_NAMES[key]
  values = {name: gin_text.value(bindings, text) for name, text in bindings.items()
            if "/" not in name and any(name == n or name.endswith("." + n) for n in names)}
  if len(set(map(repr, values.values()))) > 1:
    raise ConversionError(f"{where} binds {key} to different values: {values}")
  if values:
    return next(iter(values.values()))
  value = gin_text.value(bindings, bindings[macro]) if macro in bindings else None
  return value.get("targets") if isinstance(value, dict) else value  # TASK_FEATURE_LENGTHS


def find_config_gin(path: str) -> str | None:
  """The T5X model dir's `config.gin` for a model dir, a checkpoint_<step> dir or file."""
  path = fileio.absolute(path).rstrip("/")
  folder = path if fileio.gfile.isdir(path) else posixpath.dirname(path)
  while _STEP_DIR.fullmatch(posixpath.basename(folder)) or posixpath.basename(folder) == "state":
    folder = posixpath.dirname(folder)
  file = posixpath.join(folder, "config.gin")
  return file if fileio.gfile.exists(file) else None


def _settings(path: str, gin_config: str | None, given: dict[str, int | None]
              ) -> tuple[dict[str, Any], list[str]]:
  """Every setting from the arguments, else config.gin, else flaxformer's default."""
  file = gin_config or find_config_gin(path)
  if file and not fileio.gfile.exists(file):
    raise ConversionError(f"gin_config {file} does not exist")
  bindings = gin_text.read_bindings(file) if file else {}
  report = [f"settings from {file}" if file else "no config.gin: flaxformer defaults assumed"]
  values: dict[str, Any] = {}
  for key in _GIN_NAMES:
    found = _lookup(bindings, key, file or "")
    arg = given.get(key)
    if arg is not None and found is not None and arg != found:
      raise ConversionError(f"{key}={arg} was given but {file} has {key}={found}")
    values[key] = arg if arg is not None else found
    if values[key] is None and key in _DEFAULTS:
      values[key] = _DEFAULTS[key]
      report.append(f"default (flaxformer): {key}={_DEFAULTS[key]!r}")
  for key in ("num_heads", "num_latents"):
    if values[key] is None:
      raise ConversionError(f"{key} is not in a T5X checkpoint: pass {key}= (--{key}) or put "
                            f"the run's config.gin in the model dir")
  for key in _INTS:
    if values[key] is not None and not isinstance(values[key], int):
      raise ConversionError(f"{file}: expected an integer {key}, found {values[key]!r}")
  if not values["use_rotary"]:
    raise ConversionError("use_rotary_embedding=False: a flaxformer Perceiver AR without "
                          "position information has no equivalent in ours")
  return values, report


def _unstack_scanned(flat: dict[str, np.ndarray], axis: int) -> dict[str, np.ndarray]:
  """`layers_1/...` stacked on `axis` (scan_layers=True) -> layers_1..layers_{L-1}."""
  scale = flat.get("layers_1/pre_mlp_layer_norm/scale")
  if scale is None or scale.ndim == 1:
    return flat
  if any(name.startswith("layers_2/") for name in flat) or not 0 <= axis < scale.ndim:
    raise ConversionError(f"layers_1 is stacked {scale.shape} but the layout is not "
                          f"flaxformer's scanned one (layers_0 + layers_1, scan axis {axis})")
  out = {k: v for k, v in flat.items() if not k.startswith("layers_1/")}
  out.update({f"layers_{1 + j}/{k[9:]}": np.take(v, j, axis=axis) for k, v in flat.items()
              if k.startswith("layers_1/") for j in range(scale.shape[axis])})
  return out


def _split_heads(x: np.ndarray, heads: int, axis: int) -> np.ndarray:
  """The joined `heads * kv` axis (column h * D + d, C order) -> [..., H, D, ...]."""
  shape = x.shape[:axis] + (heads, x.shape[axis] // heads) + x.shape[axis + 1:]
  return x.reshape(shape)


def _untie(embedding: np.ndarray) -> np.ndarray:
  """The tied head emb^T / sqrt(E) as an untied [E, V] kernel."""
  return embedding.T / np.float32(math.sqrt(embedding.shape[1]))


def _module(flat: dict[str, np.ndarray], s: dict[str, Any], num_layers: int) -> PerceiverAR:
  vocab, embed = flat["token_embedder/embedding"].shape
  joined = flat["layers_0/self_attention/query/kernel"].shape[-1]
  head_dim = joined // s["num_heads"]
  if joined % s["num_heads"]:
    raise ConversionError(f"the query kernel has {joined} head columns, not a multiple of "
                          f"num_heads={s['num_heads']}")
  if s["head_dim"] not in (None, head_dim):
    raise ConversionError(f"head_dim={s['head_dim']} (config) but the query kernel has "
                          f"{joined} = {s['num_heads']} heads x {head_dim}")
  gated = "layers_0/mlp/wi_0/kernel" in flat
  acts = tuple(s["activations"] or (("gelu", "linear") if gated else ()))
  if acts[:1] not in [(a,) for a in _ACTIVATIONS] or acts[1:] != ("linear",) * gated:
    raise ConversionError(f"MlpBlock.activations={acts or 'unknown'} with "
                          f"{'wi_0/wi_1' if gated else 'wi'}: ours has gated or plain "
                          f"{'/'.join(_ACTIVATIONS)} (a plain MLP needs the run's config.gin)")
  options = BlockOptions(norm_epsilon=float(s["epsilon"]), use_bias=False,
                         activation=_ACTIVATIONS[acts[0]], gated_mlp=gated,
                         scale_query=bool(s["rescale_logits"]))
  extra = {"max_length": int(s["max_length"])} if s["max_length"] else {}
  return PerceiverAR(vocab_size=vocab, num_latents=int(s["num_latents"]), embed_dim=embed,
                     num_heads=int(s["num_heads"]), head_dim=head_dim,
                     mlp_dim=flat["layers_0/mlp/wo/kernel"].shape[0], num_layers=num_layers,
                     position_encoding=PositionEncoding.ROTARY,
                     rotary_fraction=float(s["rotary_fraction"]),
                     max_timescale=float(s["max_timescale"]), block=options, **extra)


def convert_params(flat: dict[str, np.ndarray], module: PerceiverAR
                   ) -> tuple[dict[str, Any], list[str]]:
  """Our nested float32 params and one report line a param; unknown/missing: one line."""
  tied = "logits_dense/kernel" not in flat
  mlp_in = ("wi_0", "wi_1") if module.block.gated_mlp else ("wi",)
  layer = _LAYER_ROWS + tuple((f"mlp/{n}/kernel", f"mlp/{n}", "copy") for n in mlp_in)
  rows = [("token_embedder/embedding", "token_embedder/embedding", "copy"),
          ("decoder_norm/scale", "decoder_norm/scale", "copy"),
          ("token_embedder/embedding", "logits_dense/kernel", "untie") if tied else
          ("logits_dense/kernel", "logits_dense/kernel", "copy")]
  rows += [(f"layers_{i}/{a}", f"layers_{i}/{b}", how) for i in range(module.num_layers)
           for a, b, how in layer]
  names = {src for src, _, _ in rows}
  unknown, missing = sorted(set(flat) - names), sorted(names - set(flat))
  if unknown or missing:
    which = f"unknown param decoder/{unknown[0]}" if unknown else f"missing decoder/{missing[0]}"
    raise ConversionError(f"not a flaxformer Perceiver AR layout this importer knows: {which} "
                          f"({len(unknown)} unknown, {len(missing)} missing)")
  heads = module.num_heads
  transforms = {"copy": lambda x: x, "untie": _untie,
                "heads_out": lambda x: _split_heads(x, heads, 1),
                "heads_in": lambda x: _split_heads(x, heads, 0)}
  ours, report = {}, []
  for src, dst, how in rows:
    ours[dst] = value = np.asarray(transforms[how](flat[src].astype(np.float32)), np.float32)
    report.append(f"decoder/{src} {flat[src].dtype}{list(flat[src].shape)} -> {dst} "
                  f"{list(value.shape)}: {how}")
  params = model_dir.nest(ours)
  if module.scan_layers and module.num_layers > 1:
    latent = [params.pop(f"layers_{i}") for i in range(1, module.num_layers)]
    params["latent_layers"] = jax.tree.map(lambda *xs: np.stack(xs), *latent)
  return params, report


def load_t5x(path: str, *, num_heads: int | None = None, num_latents: int | None = None,
             gin_config: str | None = None, max_length: int | None = None,
             scan_layers: bool = False) -> Converted:
  """A T5X checkpoint of a flaxformer Perceiver AR DecoderOnly as our model.

  path: a T5X model dir (its latest checkpoint_<step>), a checkpoint_<step> dir or its
  `checkpoint` file. num_heads / num_latents / max_length override nothing: they must
  agree with `gin_config` (default: the model dir's config.gin), which supplies them when
  they are not given. scan_layers: our params under `latent_layers` (else `layers_i`).
  """
  try:
    target, step = read_t5x_checkpoint(path)
  except ValueError as e:  # the reader's one-line errors
    raise ConversionError(str(e)) from None
  if sorted(target) != ["decoder"]:
    raise ConversionError(f"{path}: expected a flaxformer DecoderOnly target {{'decoder': ...}}"
                          f", found keys {sorted(target)}")
  s, report = _settings(path, gin_config, dict(num_heads=num_heads, num_latents=num_latents,
                                                max_length=max_length))
  raw = {k: np.asarray(v) for k, v in model_dir.flatten(target["decoder"]).items()}
  flat = _unstack_scanned(raw, int(s["scan_axis"]))
  for name in ("token_embedder/embedding", "layers_0/self_attention/query/kernel",
               "layers_0/mlp/wo/kernel"):
    if name not in flat or flat[name].ndim != 2:
      found = list(flat[name].shape) if name in flat else "missing"
      raise ConversionError(f"{path}: expected decoder/{name} as a 2-D array (flaxformer's "
                            f"reshaped kernels), found {found}")
  num_layers = next(i for i in itertools.count() if f"layers_{i}/pre_mlp_layer_norm/scale"
                    not in flat)
  module = _module(flat, s, num_layers).clone(scan_layers=scan_layers)
  params, rows = convert_params(flat, module)
  check_params(module, params)
  notes = [f"query kernel as stored: scale_query={module.block.scale_query} (rescale_logits="
           f"{s['rescale_logits']}); rotary fraction {module.rotary_fraction}, max_timescale "
           f"{module.max_timescale:g}; bfloat16 cast exactly to float32",
           "flaxformer computes in ACTIVATION_DTYPE (bfloat16 by default); ours in the module "
           "dtype (float32 unless ACTIVATION_DTYPE says otherwise)"]
  if flat is not raw:
    notes.append(f"scanned: layers_1 stacked on axis {s['scan_axis']} unstacked into "
                 f"layers_1..layers_{num_layers - 1}")
  if "logits_dense/kernel" not in flat:
    notes.append(f"tied embedding head (no logits_dense; flaxformer's logits / sqrt(E)): "
                 f"imported as untied logits_dense/kernel = embedding^T / sqrt({module.embed_dim})")
  return Converted(module=module, params=params, step=step,
                   source=f"T5X flaxformer Perceiver AR {path}", report=report + notes + rows)
