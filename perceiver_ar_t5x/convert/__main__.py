r"""Converts Perceiver AR checkpoints from other code bases into a MODEL_DIR, and exports ours.

  python -m perceiver_ar_t5x.convert --from=official /path/checkpoint.dill \
      --config=/path/official_config.json --model_dir=/tmp/official_copy
  python -m perceiver_ar_t5x.convert --from=krasserm /path/hub_folder --model_dir=/tmp/clm \
      --vocab=bytes   # onto our byte tasks' ids (midi: maestro_midi's)
  python -m perceiver_ar_t5x.convert --from=t5x gs://bucket/run/checkpoint_100000 \
      --num_heads=8 --num_latents=1024 --model_dir=/tmp/t5x_run
  python -m perceiver_ar_t5x.convert --from=safetensors /path/exported --model_dir=/tmp/m
  python -m perceiver_ar_t5x.convert --export=/tmp/m --out_dir=/tmp/exported

The MODEL_DIR gets an orbax checkpoint at the source's step (parameters only), a
`model.gin` that rebuilds the architecture, and `convert-report.txt` (what mapped to
what). eval, infer and train then take it as they take our own: put model.gin after
the task's gin file (see its header). Training from it fine-tunes (a fresh optimizer
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

SOURCES = ("official", "krasserm", "t5x", "safetensors")
_FROM = flags.DEFINE_enum("from", None, SOURCES, "Where the checkpoint comes from.")
_MODEL_DIR = flags.DEFINE_string("model_dir", None, "The new MODEL_DIR to write.")
_CONFIG = flags.DEFINE_string(
    "config", None, "official: JSON of the model settings the params do not show, in the "
    "official perceiver_ar_kwargs names (num_cross_attend_heads, num_transformer_heads, "
    "z_index_dim, max_wavelength, ...; a reference.json or experiment config works too).")
_NUM_HEADS = flags.DEFINE_integer("num_heads", None, "t5x: attention heads (not in the "
                                  "checkpoint; read from the run's config.gin if present).")
_NUM_LATENTS = flags.DEFINE_integer("num_latents", None, "t5x: latents (likewise).")
_VOCAB = flags.DEFINE_enum(
    "vocab", None, ["bytes", "midi"], "krasserm: re-index the model's ids onto this "
    "project's byte (text_bytes, pg19_bytes) or MIDI (maestro_midi) vocabulary.")
_EXPORT = flags.DEFINE_string("export", None, "Export this MODEL_DIR (or checkpoint) as "
                              "model.safetensors + config.json into --out_dir.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where --export writes.")


def _load(source: str, path: str) -> model_dir.Converted:
  if source == "official":
    from perceiver_ar_t5x.convert import official
    config = None
    if _CONFIG.value:
      with open(_CONFIG.value) as f:
        config = json.load(f)
    return official.load_official(path, config=config)
  if source == "krasserm":
    from perceiver_ar_t5x.convert import krasserm
    return krasserm.load_krasserm(path)
  if source == "t5x":
    from perceiver_ar_t5x.convert import t5x
    return t5x.load_t5x(path, num_heads=_NUM_HEADS.value, num_latents=_NUM_LATENTS.value)
  from perceiver_ar_t5x.convert import export
  return export.load_safetensors(path)


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
    converted = _load(_FROM.value, argv[1])
    if _VOCAB.value:
      if _FROM.value != "krasserm":
        raise gin_utils.ConfigError("--vocab re-indexes krasserm models only")
      from perceiver_ar_t5x.convert import vocab
      converted = vocab.remap_krasserm(converted, _VOCAB.value)
    gin_path = model_dir.write_model_dir(_MODEL_DIR.value, converted)
    for line in converted.report:
      print(line)
    print(f"converted {converted.source} (step {converted.step}) into {_MODEL_DIR.value}; "
          f"architecture in {gin_path}")


if __name__ == "__main__":
  app.run(main)
