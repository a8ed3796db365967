r"""Converts Perceiver AR and Perceiver IO checkpoints from other code bases into a MODEL_DIR,
and exports ours.

  python -m perceiver_ar_t5x.convert --from=official /path/checkpoint.dill \
      --config=/path/official_config.json --model_dir=/tmp/official_copy
  python -m perceiver_ar_t5x.convert --from=krasserm /path/hub_folder --model_dir=/tmp/clm \
      --vocab=bytes   # onto our byte tasks' ids (midi: maestro_midi's)
  python -m perceiver_ar_t5x.convert --from=t5x gs://bucket/run/checkpoint_100000 \
      --num_heads=8 --num_latents=1024 --model_dir=/tmp/t5x_run
  python -m perceiver_ar_t5x.convert --from=safetensors /path/exported --model_dir=/tmp/m
  python -m perceiver_ar_t5x.convert --from=hf_io /path/hub_folder --model_dir=/tmp/io \
      --vocab=mlm_bytes   # onto the byte MLM task's ids (text_bytes_mlm, pg19_bytes_mlm)
  python -m perceiver_ar_t5x.convert --from=official_io /path/params_folder --model_dir=/tmp/o
  python -m perceiver_ar_t5x.convert --export=/tmp/m --out_dir=/tmp/exported

The MODEL_DIR gets an orbax checkpoint at the source's step (parameters only), a
`model.gin` that rebuilds the architecture, and `convert-report.txt` (what mapped to
what). eval, infer and train then take it as they take our own: put model.gin after
the task's gin file (Perceiver AR) or after the run's gin file (Perceiver IO; see its
header). hf_io reads a PerceiverForMaskedLM hub folder (or weights + --config);
official_io reads params.npz or a Haiku pickle and the run's kwargs from config.json
beside it (or --config). Training from it fine-tunes (a fresh optimizer
state). Anything unrecognised is one error line and exit status 1; an existing
checkpoint is never overwritten.
"""

from __future__ import annotations

import json

from perceiver_ar_t5x import startup  # first: TF must not be imported before this

startup.quiet_tensorflow()

from absl import app, flags  # noqa: E402

from perceiver_ar_t5x import gin_utils  # noqa: E402
from perceiver_ar_t5x.convert import model_dir  # noqa: E402

SOURCES = ("official", "krasserm", "t5x", "safetensors", "hf_io", "official_io")
# --vocab choices and the source each re-indexes.
VOCABS = {"bytes": "krasserm", "midi": "krasserm", "mlm_bytes": "hf_io"}
_FROM = flags.DEFINE_enum("from", None, SOURCES, "Where the checkpoint comes from.")
_MODEL_DIR = flags.DEFINE_string("model_dir", None, "The new MODEL_DIR to write.")
_CONFIG = flags.DEFINE_string(
    "config", None, "official: JSON of the model settings the params do not show, in the "
    "official perceiver_ar_kwargs names (num_cross_attend_heads, num_transformer_heads, "
    "z_index_dim, max_wavelength, ...; a reference.json or experiment config works too). "
    "official_io: the run's kwargs ({'encoder': ..., 'decoder': ..., 'input_preprocessor': "
    "..., 'image_shape' or 'index_dims'}; default: config.json beside the params). hf_io: "
    "the model's config.json (default: the hub folder's / beside the weights file).")
_NUM_HEADS = flags.DEFINE_integer("num_heads", None, "t5x: attention heads (not in the "
                                  "checkpoint; read from the run's config.gin if present).")
_NUM_LATENTS = flags.DEFINE_integer("num_latents", None, "t5x: latents (likewise).")
_VOCAB = flags.DEFINE_enum(
    "vocab", None, list(VOCABS), "krasserm: re-index the model's ids onto this project's "
    "byte (text_bytes, pg19_bytes) or MIDI (maestro_midi) vocabulary; hf_io: mlm_bytes, "
    "PerceiverTokenizer's ids onto the byte MLM tasks' (text_bytes_mlm, pg19_bytes_mlm).")
_EXPORT = flags.DEFINE_string("export", None, "Export this MODEL_DIR (or checkpoint) as "
                              "model.safetensors + config.json into --out_dir.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where --export writes.")


def _config() -> dict | None:
  """--config's JSON (the settings a source's params do not record), or None."""
  if not _CONFIG.value:
    return None
  with open(_CONFIG.value) as f:
    return json.load(f)


def _load(source: str, path: str) -> model_dir.Converted:
  """The source's importer (imported here: each pulls in only what it reads)."""
  if source == "official":
    from perceiver_ar_t5x.convert import official
    return official.load_official(path, config=_config())
  if source == "hf_io":
    from perceiver_ar_t5x.convert import hf_io
    return hf_io.load(path, config=_config())
  if source == "official_io":
    from perceiver_ar_t5x.convert import official_io
    return official_io.load(path, config=_config())
  if source == "krasserm":
    from perceiver_ar_t5x.convert import krasserm
    return krasserm.load_krasserm(path)
  if source == "t5x":
    from perceiver_ar_t5x.convert import t5x
    return t5x.load_t5x(path, num_heads=_NUM_HEADS.value, num_latents=_NUM_LATENTS.value)
  from perceiver_ar_t5x.convert import export
  return export.load_safetensors(path)


def _remap(converted: model_dir.Converted, vocab_name: str | None) -> model_dir.Converted:
  """The model re-indexed onto one of our vocabularies (--vocab), or as it is."""
  if vocab_name == "mlm_bytes":
    from perceiver_ar_t5x.convert import hf_io
    return hf_io.remap_to_mlm_vocab(converted)
  if vocab_name:
    from perceiver_ar_t5x.convert import vocab
    return vocab.remap_krasserm(converted, vocab_name)
  return converted


def main(argv: list[str]) -> None:
  gin_utils.setup_logging()
  with gin_utils.one_line_errors("convert"):
    if _EXPORT.value:
      if not _OUT_DIR.value or len(argv) > 1:
        raise gin_utils.ConfigError("--export needs --out_dir and no source path")
      from perceiver_ar_t5x.convert import export
      for path in export.export_safetensors(_EXPORT.value, _OUT_DIR.value):
        print(f"wrote {path}")
      return
    if len(argv) != 2 or not _FROM.value or not _MODEL_DIR.value:
      raise gin_utils.ConfigError(
          f"usage: python -m perceiver_ar_t5x.convert --from={{{','.join(SOURCES)}}} SOURCE "
          f"--model_dir=NEW_MODEL_DIR (got arguments {argv[1:]})")
    if _VOCAB.value and VOCABS[_VOCAB.value] != _FROM.value:
      raise gin_utils.ConfigError(f"--vocab={_VOCAB.value} re-indexes "
                                  f"{VOCABS[_VOCAB.value]} models only")
    converted = _remap(_load(_FROM.value, argv[1]), _VOCAB.value)
    gin_path = model_dir.write_model_dir(_MODEL_DIR.value, converted)
    for line in converted.report:
      print(line)
    print(f"converted {converted.source} (step {converted.step}) into {_MODEL_DIR.value}; "
          f"architecture in {gin_path}")


if __name__ == "__main__":
  app.run(main)
