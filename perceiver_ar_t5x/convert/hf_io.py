"""Imports Hugging Face `PerceiverForMaskedLM` checkpoints (transformers 4.x) as our PerceiverIO.

A hub folder (`config.json`, `model.safetensors` or `pytorch_model.bin`) or a weights
file plus its config is read without torch (torch_files.py) and mapped onto
perceiver_io.PerceiverIO; tests/convert/test_hf_io.py proves the logits equal HF's
(fixture from scripts/fixtures/make_hf_perceiver_io_fixtures.py). What HF's code
fixes that its config does not say (modeling_perceiver.py, 4.30), and we set:
  - every LayerNorm is torch's default (eps 1e-5): `layer_norm_eps` is never read.
  - the encoder's cross-attention query/key channels default to d_model
    (cross_attention_shape_for_attention "kv"; "q": d_latents), values to those;
    the latent self-attends get no query-residual switch (always on), and their
    `num_self_attends_per_block` weights are reused by all `num_blocks` repeats.
  - the MLM decoder (PerceiverForMaskedLM.__init__): max_position_embeddings learned
    queries of d_model channels, 8 heads, qk 8 * 32, v d_model, widening 1, no query
    residual, no final projection; the logits are the tied token embedding plus
    `embedding_decoder.bias`. HF ignores the attention mask in the decoder (it only
    masks the encoder's keys), as we do.
Weights: torch Linear is [out, in] (transposed); heads are split head-major `(h c)`.
Ids stay HF's (PerceiverTokenizer, 262); `remap_to_mlm_vocab` re-indexes them onto the
byte MLM task's 260 ids.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from perceiver_ar_t5x import fileio
from perceiver_ar_t5x.convert import model_dir, torch_files
from perceiver_ar_t5x.convert.model_dir import ConversionError, Converted
from perceiver_ar_t5x.layers.mlp import Activation
from perceiver_ar_t5x.perceiver_io import IO_BLOCK, Head, PerceiverIO, TokenInput

ARCHITECTURE = "PerceiverForMaskedLM"
# PerceiverForMaskedLM's decoder, fixed in its __init__ (not in the config).
DECODER_HEADS, DECODER_QK = 8, 8 * 32
# PerceiverConfig's defaults for the fields the MLM model reads (4.30).
CONFIG_DEFAULTS = dict(
    num_latents=256, d_latents=1280, d_model=768, num_blocks=1, num_self_attends_per_block=26,
    num_self_attention_heads=8, num_cross_attention_heads=8, qk_channels=None, v_channels=None,
    cross_attention_shape_for_attention="kv", self_attention_widening_factor=1,
    cross_attention_widening_factor=1, hidden_act="gelu", use_query_residual=True,
    vocab_size=262, max_position_embeddings=2048)
ACTIVATIONS = {"gelu": Activation.GELU, "gelu_new": Activation.GELU_TANH,
               "gelu_pytorch_tanh": Activation.GELU_TANH, "relu": Activation.RELU}


def read_config(config: Mapping[str, Any] | str) -> tuple[dict[str, Any], list[str]]:
  """The fields the MLM model reads (from a config.json path or a dict), defaults filled in."""
  where = config if isinstance(config, str) else "the config"
  if isinstance(config, str):
    with fileio.gfile.GFile(config) as f:
      config = json.load(f)
  if config.get("model_type", "perceiver") != "perceiver":
    raise ConversionError(f"{where}: model_type {config['model_type']!r} is not 'perceiver'")
  archs = config.get("architectures") or [ARCHITECTURE]
  if ARCHITECTURE not in archs:
    raise ConversionError(f"{where}: {archs} is not {ARCHITECTURE}; only the masked LM is "
                          f"imported")
  taken = [f"config default (PerceiverConfig): {k}={v!r}"
           for k, v in CONFIG_DEFAULTS.items() if k not in config]
  cfg = {**CONFIG_DEFAULTS, **{k: config[k] for k in CONFIG_DEFAULTS if k in config}}
  if cfg["hidden_act"] not in ACTIVATIONS:
    raise ConversionError(f"{where}: hidden_act {cfg['hidden_act']!r}; ours has "
                          f"{sorted(ACTIVATIONS)}")
  return cfg, taken


def architecture(cfg: Mapping[str, Any]) -> PerceiverIO:
  """Our module for a PerceiverForMaskedLM config (read_config's)."""
  shape = cfg["cross_attention_shape_for_attention"]
  if shape not in ("kv", "q"):
    raise ConversionError(f"cross_attention_shape_for_attention {shape!r} is neither kv nor q")
  d, qk, v = cfg["d_latents"], cfg["qk_channels"], cfg["v_channels"]
  if (v or qk or d) != d:  # HF's self-attention output is v wide and added to the latents
    raise ConversionError(f"self-attention values of {v or qk} channels on {d} latent "
                          f"channels: HF's own model cannot run this config")
  cross_qk = qk if qk is not None else (d if shape == "q" else None)  # None: ours = d_model
  return PerceiverIO(
      input_adapter=TokenInput(cfg["vocab_size"], cfg["d_model"], cfg["max_position_embeddings"]),
      num_latents=cfg["num_latents"], latent_dim=d,
      num_outputs=cfg["max_position_embeddings"], decoder_dim=cfg["d_model"], head=Head.MLM,
      num_blocks=cfg["num_blocks"], num_self_attends_per_block=cfg["num_self_attends_per_block"],
      num_self_attend_heads=cfg["num_self_attention_heads"], self_attend_qk_channels=qk,
      self_attend_v_channels=v,
      self_attend_widening_factor=cfg["self_attention_widening_factor"],
      num_cross_attend_heads=cfg["num_cross_attention_heads"],
      cross_attend_qk_channels=cross_qk, cross_attend_v_channels=v,
      cross_attend_widening_factor=cfg["cross_attention_widening_factor"],
      use_query_residual=bool(cfg["use_query_residual"]), num_decoder_heads=DECODER_HEADS,
      decoder_qk_channels=DECODER_QK, decoder_v_channels=cfg["d_model"],
      decoder_widening_factor=1, decoder_query_residual=False,
      block=dataclasses.replace(IO_BLOCK, activation=ACTIVATIONS[cfg["hidden_act"]]))


Row = tuple[str, str, str]  # (HF key, our name, how)


def _block_rows(src: str, dst: str, cross: bool) -> list[Row]:
  """One PerceiverLayer (`src`) onto one of our Blocks (`dst`)."""
  att = f"{src}attention.self."
  norms = [(f"{att}layernorm1", "pre_attention_norm"), (f"{src}layernorm", "pre_mlp_norm")]
  if cross:
    norms.append((f"{att}layernorm2", "pre_attention_kv_norm"))
  rows: list[Row] = []
  for theirs, ours in norms:
    rows += [(f"{theirs}.weight", f"{dst}{ours}/scale", "copy"),
             (f"{theirs}.bias", f"{dst}{ours}/bias", "copy")]
  for name in ("query", "key", "value"):
    rows += [(f"{att}{name}.weight", f"{dst}attention/{name}", "heads"),
             (f"{att}{name}.bias", f"{dst}attention/{name}_bias", "head_bias")]
  return rows + [(f"{src}attention.output.dense.weight", f"{dst}attention/out", "heads_in"),
                 (f"{src}attention.output.dense.bias", f"{dst}attention/out_bias", "copy"),
                 (f"{src}mlp.dense1.weight", f"{dst}mlp/wi", "linear"),
                 (f"{src}mlp.dense1.bias", f"{dst}mlp/wi_bias", "copy"),
                 (f"{src}mlp.dense2.weight", f"{dst}mlp/wo", "linear"),
                 (f"{src}mlp.dense2.bias", f"{dst}mlp/wo_bias", "copy")]


def _mapping(module: PerceiverIO) -> list[Row]:
  """Every param of ours with the HF state_dict key it comes from."""
  rows: list[Row] = [
      ("perceiver.input_preprocessor.embeddings.weight", "input_adapter/token_embed/embedding",
       "copy"),
      ("perceiver.input_preprocessor.position_embeddings.weight",
       "input_adapter/positions/embedding", "copy"),
      ("perceiver.embeddings.latents", "latents", "copy"),
      ("perceiver.decoder.output_position_encodings.position_embeddings", "output_queries",
       "copy"),
      ("embedding_decoder.bias", "logits_bias", "copy")]
  rows += _block_rows("perceiver.encoder.cross_attention.", "encoder/", cross=True)
  for i in range(module.num_self_attends_per_block):
    rows += _block_rows(f"perceiver.encoder.self_attends.{i}.", f"self_attend_{i}/", cross=False)
  return rows + _block_rows("perceiver.decoder.decoding_cross_attention.", "decoder/",
                            cross=True)


def _transforms(heads: int) -> dict[str, tuple[Callable[[np.ndarray], np.ndarray], str]]:
  """how -> (function of the HF array, what the report says); `heads` of the block."""

  def split(w: np.ndarray) -> np.ndarray:  # torch [(h c), in] -> ours [in, heads, c]
    return w.T.reshape(w.shape[1], heads, -1)

  return {"copy": (lambda x: x, "copied"), "linear": (lambda w: w.T, "transposed"),
          "heads": (split, f"transposed, head-major (h c) -> [in, {heads}, c]"),
          "head_bias": (lambda b: b.reshape(heads, -1), f"head-major (h c) -> [{heads}, c]"),
          "heads_in": (lambda w: w.T.reshape(heads, -1, w.shape[0]),
                       f"transposed, head-major (h c) rows -> [{heads}, c, out]")}


def _block_heads(module: PerceiverIO, name: str) -> int:
  if name.startswith("encoder/"):
    return module.num_cross_attend_heads
  if name.startswith("decoder/"):
    return module.num_decoder_heads
  return module.num_self_attend_heads


def convert_params(raw: Mapping[str, np.ndarray], module: PerceiverIO
                   ) -> tuple[dict[str, Any], list[str]]:
  """Our nested params and one report line per HF key; unknown/missing -> ConversionError."""
  rows = _mapping(module)
  names = {src for src, _, _ in rows}
  unknown, missing = sorted(set(raw) - names), sorted(names - set(raw))
  if unknown or missing:
    which = f"unknown key {unknown[0]}" if unknown else f"missing key {missing[0]}"
    raise ConversionError(f"not a {ARCHITECTURE} state_dict for this config: {which} "
                          f"({len(unknown)} unknown, {len(missing)} missing)")
  flat, report = {}, []
  for src, dst, how in rows:
    fn, what = _transforms(_block_heads(module, dst))[how]
    try:
      value = np.asarray(fn(np.asarray(raw[src])), np.float32)
    except ValueError as e:  # a reshape that does not fit the config's heads
      raise ConversionError(f"{src} {list(raw[src].shape)} does not fit {dst}: {e}") from None
    flat[dst] = value
    report.append(f"{src} {list(raw[src].shape)} -> {dst} {list(value.shape)}: {what}")
  return model_dir.nest(flat), report


def load(path: str, config: Mapping[str, Any] | str | None = None) -> Converted:
  """A PerceiverForMaskedLM hub folder, or a weights file (safetensors / torch.save'd
  state_dict) and its config (a config.json path or dict; default: config.json in the
  folder / beside the file). Call the result as
  `module.apply({'params': params}, input_ids, input_mask=attention_mask)`; the ids are
  PerceiverTokenizer's (remap_to_mlm_vocab re-indexes them onto ours).
  """
  weights, config = torch_files.locate_hub(path, config, "Hugging Face")
  cfg, taken = read_config(config)
  module = architecture(cfg)
  with fileio.gfile.GFile(weights, "rb") as f:
    raw = torch_files.read_weights(f.read(), weights)
  params, report = convert_params(raw, module)
  model_dir.check_params(module, params)
  return Converted(module=module, params=params, step=0,
                   source=f"Hugging Face {ARCHITECTURE} {weights}", report=taken + report)


# Our id -> the HF id whose rows it takes. Ours is the byte MLM task's (tasks/mlm.py:
# ByteVocabulary(extra_ids=1), 260 ids): PAD 0, EOS 1, UNK 2, byte b as b + 3, [MASK]
# 259. HF's PerceiverTokenizer: [PAD] 0, [BOS] 1, [EOS] 2, [MASK] 3, [CLS] 4, [SEP] 5,
# byte b as b + 6. UNK (never in byte text, never a target) takes [CLS]'s rows.
HF_VOCAB = 262
MLM_VOCAB_TABLE = np.concatenate([[0, 2, 4], 6 + np.arange(256), [3]]).astype(np.int64)


def remap_to_mlm_vocab(converted: Converted) -> Converted:
  """The model re-indexed onto our MLM task's ids (MLM_VOCAB_TABLE): the embedding rows
  and the logit bias; every kept id's logit is unchanged, its input embedding too."""
  module, table = converted.module, MLM_VOCAB_TABLE
  adapter = module.input_adapter
  if adapter.vocab_size != HF_VOCAB:
    raise ConversionError(f"a model with {adapter.vocab_size} ids is not PerceiverTokenizer's "
                          f"{HF_VOCAB}")
  flat = model_dir.flatten(converted.params)
  for name in ("input_adapter/token_embed/embedding", "logits_bias"):
    flat[name] = np.asarray(flat[name])[table]
  note = (f"vocabulary: PerceiverTokenizer ({HF_VOCAB} ids) re-indexed to the byte MLM "
          f"task's ({len(table)})")
  return dataclasses.replace(
      converted, module=module.clone(input_adapter=adapter.clone(vocab_size=len(table))),
      params=model_dir.nest(flat), report=[*converted.report, note])
