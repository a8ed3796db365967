"""Imports krasserm perceiver-io 0.11 Perceiver AR models (CausalLanguageModel, SymbolicAudioModel).

A Hugging Face hub folder (`config.json` with `model_config`, and `model.safetensors` or
`pytorch_model.bin`, keys prefixed `backend_model.`) or a state_dict file plus its config
is read without torch (torch_files.py) and mapped onto our model; the math is in
scripts/fixtures/krasserm_numpy_reference.py and the proof in tests/convert/test_krasserm.py.
What differs from a plain copy (`_mapping`, `_transforms`):
  - torch Linear weights are [out, in]: transposed; heads are split head-major `(h c)`.
  - rotary rotates interleaved pairs (2i, 2i+1) of the first r channels of each head; ours
    rotates halves (i, r/2 + i), so the rotated query/key columns are reordered (`_pair_order`);
    q.k is unchanged, the frequencies are the same (10000 ** (-2i / r), max_timescale 1e4).
  - layer 0's latent keys take the query norm (CrossKvNorm.PREFIX); only its out projection
    has a bias; every other projection bias of ours is zero.
  - the output is the tied embedding (+ an optional bias), after an optional out_norm.
Inputs: krasserm pads on the left and counts positions from the first real token
(`call_inputs`); the latents are the last n - prefix_len tokens.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from perceiver_ar_t5x import fileio
from perceiver_ar_t5x.convert import model_dir, torch_files
from perceiver_ar_t5x.convert.model_dir import ConversionError, Converted, check_params
from perceiver_ar_t5x.layers import rotary
from perceiver_ar_t5x.layers.block import BlockOptions, CrossKvNorm
from perceiver_ar_t5x.layers.embedding import PositionEncoding
from perceiver_ar_t5x.layers.mlp import Activation
from perceiver_ar_t5x.layers.norms import NormKind
from perceiver_ar_t5x.perceiver_ar import PerceiverAR

PREFIX = "backend_model."  # the HF wrapper's name for CausalSequenceModel
MODEL_TYPES = ("perceiver-ar-causal-language-model", "perceiver-ar-symbolic-audio-model")
MAX_TIMESCALE = 1e4  # FrequencyPositionEncoding: inv_freq = 10000 ** (-2i / r)
# CausalSequenceModelConfig's fields and defaults (perceiver/model/core/config.py, 0.11.0).
CONFIG_DEFAULTS = dict(
    num_heads=8, max_heads_parallel=None, num_self_attention_layers=8,
    num_self_attention_rotary_layers=1, self_attention_widening_factor=4,
    cross_attention_widening_factor=4, cross_attention_dropout=0.5, post_attention_dropout=0.0,
    residual_dropout=0.0, activation_checkpointing=False, activation_offloading=False,
    vocab_size=262, max_seq_len=4096, max_latents=512, num_channels=512, output_norm=False,
    output_bias=True, abs_pos_emb=True, init_scale=0.02)


def read_config(config: Mapping[str, Any] | str) -> tuple[dict[str, Any], list[str]]:
  """The model_config (from a hub config.json, a JSON path or a dict), defaults filled in."""
  where = config if isinstance(config, str) else "the config"
  if isinstance(config, str):
    with fileio.gfile.GFile(config) as f:
      config = json.load(f)
  model_type = config.get("model_type")
  if model_type is not None and model_type not in MODEL_TYPES:
    raise ConversionError(f"{where}: model_type {model_type!r} is not a krasserm Perceiver AR "
                          f"model ({', '.join(MODEL_TYPES)})")
  if "model_config" in config:
    config = config["model_config"]
  elif model_type is not None or "architectures" in config:
    raise ConversionError(f"{where} has no model_config; not a krasserm perceiver-io model")
  unknown = sorted(set(config) - set(CONFIG_DEFAULTS))
  if unknown:
    raise ConversionError(f"{where}: keys {unknown[:4]} are not krasserm "
                          f"CausalSequenceModelConfig fields; not a krasserm Perceiver AR model")
  taken = [f"config default (CausalSequenceModelConfig): {k}={v!r}"
           for k, v in CONFIG_DEFAULTS.items() if k not in config]
  return {**CONFIG_DEFAULTS, **config}, taken


def rotated_channels(cfg: Mapping[str, Any]) -> int:
  """r, krasserm's rotated channels per head: half of each head with abs_pos_emb, else all."""
  head_dim = cfg["num_channels"] // cfg["num_heads"]
  return head_dim // 2 if cfg["abs_pos_emb"] else head_dim


def architecture(cfg: Mapping[str, Any]) -> PerceiverAR:
  """Our module for a krasserm CausalSequenceModelConfig."""
  channels, heads, layers = cfg["num_channels"], cfg["num_heads"], cfg["num_self_attention_layers"]
  r = rotated_channels(cfg)
  if channels % heads or r % 2 or r == 0:
    raise ConversionError(f"num_channels {channels} / num_heads {heads} gives {r} rotated "
                          f"channels per head; ours needs an even, nonzero number")
  rotary_sa = cfg["num_self_attention_rotary_layers"]
  rotary_sa = layers if rotary_sa == -1 else min(max(rotary_sa, 0), layers)
  mlp, cross_mlp = (cfg[f"{k}_widening_factor"] * channels for k in ("self_attention",
                                                                      "cross_attention"))
  block = BlockOptions(norm=NormKind.LAYER, norm_epsilon=1e-5, use_bias=True,
                       activation=Activation.GELU, gated_mlp=False, scale_query=True,
                       cross_kv_norm=CrossKvNorm.PREFIX)
  module = PerceiverAR(
      vocab_size=cfg["vocab_size"], num_latents=cfg["max_latents"], embed_dim=channels,
      num_heads=heads, head_dim=channels // heads, mlp_dim=mlp, num_layers=1 + layers,
      position_encoding=PositionEncoding.LEARNED if cfg["abs_pos_emb"] else PositionEncoding.ROTARY,
      rotary_fraction=0.5 if cfg["abs_pos_emb"] else 1.0, rotary_layers=1 + rotary_sa,
      max_timescale=MAX_TIMESCALE, max_length=cfg["max_seq_len"], tie_embeddings=True,
      output_bias=bool(cfg["output_bias"]), final_norm=bool(cfg["output_norm"]),
      cross_mlp_dim=None if cross_mlp == mlp else cross_mlp, block=block)
  assert rotary.rotary_dim(module.head_dim, module.rotary_fraction) == r
  return module


Row = tuple[str | None, tuple[int, ...], str, str]  # (krasserm key, its shape*, ours, how)


def _mapping(cfg: Mapping[str, Any], module: PerceiverAR) -> list[Row]:
  """Every param of ours with its krasserm key (None: a zero bias krasserm does not have;
  *the shape is then ours)."""
  c, v, heads = cfg["num_channels"], cfg["vocab_size"], (module.num_heads, module.head_dim)
  rows: list[Row] = [("input_adapter.txt_embedding.weight", (v, c), "token_embedder/embedding",
                      "copy"),
                     ("input_adapter.frq_pos_encoding.inv_freq", (rotated_channels(cfg) // 2,),
                      "", "check")]
  if cfg["abs_pos_emb"]:
    rows.append(("input_adapter.pos_embedding.weight", (cfg["max_seq_len"], c),
                 "position_embedder/embedding", "copy"))
  for i in range(module.num_layers):
    src = "cross_attention.0.module." if i == 0 else f"self_attention.{i - 1}.0.module."
    mlp_src = "cross_attention.1.module." if i == 0 else f"self_attention.{i - 1}.1.module."
    dst, width = f"layers_{i}/", module.block_kwargs(i)["mlp_dim"]
    norms = ([(src + "q_norm", "pre_attention_norm"), (src + "kv_norm", "pre_attention_kv_norm")]
             if i == 0 else [(src + "norm", "pre_attention_norm")])
    for theirs, ours in norms + [(mlp_src + "0", "pre_mlp_norm")]:
      rows += [(f"{theirs}.weight", (c,), f"{dst}{ours}/scale", "copy"),
               (f"{theirs}.bias", (c,), f"{dst}{ours}/bias", "copy")]
    qk = "rotary_heads" if i < module.num_rotary_layers else "heads"
    for theirs, ours, how in (("q", "query", qk), ("k", "key", qk), ("v", "value", "heads")):
      rows += [(f"{src}attention.{theirs}_proj.weight", (c, c), f"{dst}attention/{ours}", how),
               (None, heads, f"{dst}attention/{ours}_bias", "zeros")]
    rows += [(f"{src}attention.o_proj.weight", (c, c), f"{dst}attention/out", "heads_in"),
             (f"{src}attention.o_proj.bias" if i == 0 else None, (c,),
              f"{dst}attention/out_bias", "copy" if i == 0 else "zeros"),
             (mlp_src + "1.weight", (width, c), f"{dst}mlp/wi", "linear"),
             (None, (width,), f"{dst}mlp/wi_bias", "zeros"),
             (mlp_src + "3.weight", (c, width), f"{dst}mlp/wo", "linear"),
             (None, (c,), f"{dst}mlp/wo_bias", "zeros")]
  if cfg["output_norm"]:
    rows += [("out_norm.weight", (c,), "decoder_norm/scale", "copy"),
             ("out_norm.bias", (c,), "decoder_norm/bias", "copy")]
  if cfg["output_bias"]:
    rows.append(("output_adapter.bias", (v,), "logits_bias", "copy"))
  return rows


def pair_order(r: int, head_dim: int) -> np.ndarray:
  """Our column j of a head <- krasserm's: pairs (2i, 2i+1) of the first r -> (i, r/2 + i)."""
  return np.concatenate([np.arange(0, r, 2), np.arange(1, r, 2), np.arange(r, head_dim)])


def _transforms(module: PerceiverAR, r: int
                ) -> dict[str, tuple[Callable[[np.ndarray], np.ndarray], str]]:
  """How name -> (function of the krasserm array, what the report says it does)."""
  heads, d, c = module.num_heads, module.head_dim, module.embed_dim
  order = pair_order(r, d)

  def split(w: np.ndarray) -> np.ndarray:  # torch [(h c), in] -> ours [in, heads, head_dim]
    return w.T.reshape(c, heads, d)

  return {"copy": (lambda x: x, "copied"), "linear": (lambda w: w.T, "transposed"),
          "heads": (split, "transposed, head-major (h c) -> [embed, heads, head_dim]"),
          "rotary_heads": (lambda w: split(w)[..., order],
                           f"transposed, head-major (h c) -> [embed, heads, head_dim], rotary "
                           f"pairs (2i, 2i+1) of the first {r} -> (i, {r // 2}+i)"),
          "heads_in": (lambda w: w.T.reshape(heads, d, c),
                       "transposed, head-major (h c) rows -> [heads, head_dim, embed]")}


def convert_params(raw: Mapping[str, np.ndarray], cfg: Mapping[str, Any], module: PerceiverAR
                   ) -> tuple[dict[str, Any], list[str]]:
  """Our nested params and one report line per krasserm key; unknown/missing -> ConversionError."""
  raw = {k.removeprefix(PREFIX): v for k, v in raw.items()}
  rows, r = _mapping(cfg, module), rotated_channels(cfg)
  names = {src for src, _, _, _ in rows if src is not None}
  unknown, missing = sorted(set(raw) - names), sorted(names - set(raw))
  if unknown or missing:
    which = f"unknown key {unknown[0]}" if unknown else f"missing key {missing[0]}"
    raise ConversionError(f"not a krasserm Perceiver AR state_dict for this config: {which} "
                          f"({len(unknown)} unknown, {len(missing)} missing)")
  transforms, flat, report, zeros = _transforms(module, r), {}, [], []
  for src, shape, dst, how in rows:
    if src is not None and raw[src].shape != shape:
      raise ConversionError(f"{PREFIX}{src} is {list(raw[src].shape)}, the config needs "
                            f"{list(shape)}")
    if how == "check":
      want = 1.0 / MAX_TIMESCALE ** (np.arange(0, r, 2, dtype=np.float32) / r)
      if not np.allclose(raw[src], want, rtol=1e-2, atol=0.0):  # 1e-2: f16/bf16 files too
        raise ConversionError(f"{PREFIX}{src} is not 1e4 ** (-2i / {r}); ours has no equal")
      report.append(f"{PREFIX}{src} {list(shape)}: checked, = 1e4 ** (-2i / {r}) (ours: "
                    f"max_timescale 1e4 over halves, the same frequencies)")
      continue
    if how == "zeros":
      value = np.zeros(shape, np.float32)
      zeros.append(dst)
    else:
      fn, what = transforms[how]
      value = np.asarray(fn(raw[src]), np.float32)
      report.append(f"{PREFIX}{src} {list(shape)} -> {dst} {list(value.shape)}: {what}")
    flat[dst] = value
  report.append(f"zeros (biases krasserm does not have): {', '.join(zeros)}")
  return model_dir.nest(flat), report


def load_krasserm(path: str, config: Mapping[str, Any] | str | None = None) -> Converted:
  """A krasserm hub folder, or a weights file (safetensors / torch.save'd state_dict) and config.

  config: a hub config.json, a JSON of CausalSequenceModelConfig fields, or such a dict
  (default: config.json in the folder / beside the file). State_dict keys may lack the
  `backend_model.` prefix (a bare CausalSequenceModel's). Feed the converted model with
  `call_inputs`; its ids are krasserm's tokenizer's (vocab.remap_krasserm re-indexes them).
  """
  weights, config = torch_files.locate_hub(path, config, "krasserm")
  cfg, taken = read_config(config)
  module = architecture(cfg)
  with fileio.gfile.GFile(weights, "rb") as f:
    raw = torch_files.read_weights(f.read(), weights)
  params, report = convert_params(raw, cfg, module)
  check_params(module, params)
  return Converted(module=module, params=params, step=0,
                   source=f"krasserm perceiver-io {weights}", report=taken + report)


def call_inputs(pad_mask: np.ndarray, prefix_len: int) -> tuple[int, dict[str, np.ndarray]]:
  """(num_latents, apply kwargs) for krasserm's call (tokens, prefix_len, pad_mask).

  pad_mask [batch, n] (True = pad) must be left padding, as krasserm's tokenizers make it;
  positions count from each row's first real token (krasserm's max(arange - pads, 0)),
  padding is segment 0 (never attended to by real tokens), the latents are tokens
  prefix_len..n-1: run `module.clone(num_latents=num_latents).apply(..., **kwargs)`.
  """
  pad_mask = np.asarray(pad_mask, bool)
  batch, n = pad_mask.shape
  pads = pad_mask.sum(axis=1, keepdims=True)
  if not np.array_equal(pad_mask, np.arange(n)[None, :] < pads):
    raise ValueError("krasserm models take left padding only (pads before every real token)")
  if not 0 <= prefix_len < n:
    raise ValueError(f"prefix_len must be in [0, {n}) for {n} tokens, got {prefix_len}")
  return n - prefix_len, dict(
      positions=np.maximum(np.arange(n)[None, :] - pads, 0).astype(np.int32),
      segment_ids=(~pad_mask).astype(np.int32),
      latent_starts=np.full((batch,), prefix_len, np.int32))
