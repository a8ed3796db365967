"""Our checkpoints export as model.safetensors + config.json and import back bit-identically."""

from __future__ import annotations

import json
import struct

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_ar_t5x import checkpoints
from perceiver_ar_t5x.convert import export, model_dir
from perceiver_ar_t5x.layers.block import BlockOptions, CrossKvNorm
from perceiver_ar_t5x.layers.embedding import PositionEncoding
from perceiver_ar_t5x.layers.mlp import Activation
from perceiver_ar_t5x.layers.norms import NormKind
from perceiver_ar_t5x.models import PerceiverARModel
from perceiver_ar_t5x.perceiver_ar import PerceiverAR

# Every kind of field off its default: enums, BlockOptions, optional ints, a dtype, floats.
MODULE = PerceiverAR(
    vocab_size=13, num_latents=4, embed_dim=12, num_heads=3, head_dim=8, mlp_dim=20,
    num_layers=3, position_encoding=PositionEncoding.LEARNED, rotary_layers=1,
    rotary_fraction=0.75, max_timescale=37.0, max_length=32, position_table_trainable=False,
    output_bias=True, latent_query_projection=True, cross_mlp_dim=24, dropout_rate=0.1,
    dtype=jnp.bfloat16,
    block=BlockOptions(norm=NormKind.LAYER, norm_epsilon=1e-5, use_bias=True,
                       activation=Activation.GELU, gated_mlp=False,
                       cross_kv_norm=CrossKvNorm.SEPARATE))


def _converted(module: PerceiverAR) -> model_dir.Converted:
  params = nn.unbox(PerceiverARModel(module).init(jax.random.key(0), module.num_latents))
  rng = np.random.default_rng(0)
  noisy = jax.tree.map(lambda x: np.asarray(x) + rng.normal(0, 0.1, x.shape).astype(np.float32),
                       params)  # biases and scales non-trivial
  return model_dir.Converted(module=module, params=noisy, step=7, source="test")


def _stored_params(folder) -> dict:
  module_fields = checkpoints.Checkpointer(str(folder), read_only=True).read_meta(7)["model"]
  module, _ = export.module_from_fields(module_fields, str(folder))
  params, step, _ = checkpoints.load_params(PerceiverARModel(module), str(folder), 4)
  assert step == 7
  return jax.tree.map(np.asarray, params)


def _assert_bit_identical(a: dict, b: dict) -> None:
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype == np.float32 and x.shape == y.shape
    assert x.tobytes() == y.tobytes()


@pytest.mark.parametrize("module", [MODULE, MODULE.clone(scan_layers=True, rotary_layers=None)],
                         ids=["options", "scanned"])
def test_export_import_rewrite_is_bit_identical(tmp_path, module):
  converted = _converted(module)
  model_dir.write_model_dir(str(tmp_path / "first"), converted)
  written = export.export_safetensors(str(tmp_path / "first" / "checkpoints" / "7"),
                                      str(tmp_path / "hub"))
  assert written == [str(tmp_path / "hub" / n) for n in ("model.safetensors", "config.json")]
  loaded = export.load_safetensors(str(tmp_path / "hub"))
  assert loaded.module == module and loaded.step == 7 and loaded.source == "test"
  _assert_bit_identical(loaded.params, converted.params)
  model_dir.write_model_dir(str(tmp_path / "second"), loaded)
  _assert_bit_identical(_stored_params(tmp_path / "second"), _stored_params(tmp_path / "first"))
  assert ((tmp_path / "second" / "model.gin").read_text()
          == (tmp_path / "first" / "model.gin").read_text())
  config = json.loads((tmp_path / "hub" / "config.json").read_text())
  assert config["format_version"] == 1 and config["step"] == 7
  assert config["model"]["block"]["norm"] == "NormKind.LAYER"
  assert config["model"]["dtype"] == "bfloat16"


def test_the_file_is_safetensors(tmp_path):
  """The layout, checked here without the importer: header length, JSON, sorted buffers."""
  converted = _converted(MODULE)
  model_dir.write_model_dir(str(tmp_path / "m"), converted)
  export.export_safetensors(str(tmp_path / "m"), str(tmp_path / "hub"))
  data = (tmp_path / "hub" / "model.safetensors").read_bytes()
  (size,) = struct.unpack("<Q", data[:8])
  assert (8 + size) % 8 == 0
  header = json.loads(data[8:8 + size])
  assert header.pop("__metadata__") == {"format": "flax", "producer": "perceiver_ar_t5x"}
  offset = 0
  for name in sorted(header):
    assert header[name]["dtype"] == "F32" and header[name]["data_offsets"][0] == offset
    offset = header[name]["data_offsets"][1]
  assert offset == len(data) - 8 - size
  begin, end = header["layers_0/attention/query"]["data_offsets"]
  query = np.frombuffer(data[8 + size + begin:8 + size + end], "<f4").reshape(12, 3, 8)
  np.testing.assert_array_equal(query, converted.params["layers_0"]["attention"]["query"])
  assert "latent_query/kernel" in header and "position_embedder/embedding" in header


def _error(fn, *args) -> str:
  with pytest.raises(model_dir.ConversionError) as e:
    fn(*args)
  assert "\n" not in str(e.value)
  return str(e.value)


def test_corrupt_or_foreign_files_are_one_line(tmp_path):
  model_dir.write_model_dir(str(tmp_path / "m"), _converted(MODULE))
  hub = tmp_path / "hub"
  export.export_safetensors(str(tmp_path / "m"), str(hub))
  assert "exists; export into a new" in _error(export.export_safetensors, str(tmp_path / "m"),
                                               str(hub))
  assert "no checkpoint at" in _error(export.export_safetensors, str(tmp_path), str(tmp_path / "x"))
  weights = hub / "model.safetensors"
  good = weights.read_bytes()
  (size,) = struct.unpack("<Q", good[:8])
  weights.write_bytes(struct.pack("<Q", 10**12) + good[8:])
  assert "header length 1000000000000 exceeds" in _error(export.load_safetensors, str(hub))
  weights.write_bytes(good[:8] + b"{" * size + good[8 + size:])
  assert "header is not JSON" in _error(export.load_safetensors, str(hub))
  weights.write_bytes(good[:-4])  # truncated: the last tensor's bytes run past the end
  assert "data_offsets" in _error(export.load_safetensors, str(weights))
  weights.write_bytes(good)
  config = json.loads((hub / "config.json").read_text())
  (hub / "config.json").write_text(json.dumps({**config, "format_version": 2}))
  assert "format_version 2" in _error(export.load_safetensors, str(hub))
  config["model"]["block"]["norm"] = "NormKind.BATCH"
  (hub / "config.json").write_text(json.dumps(config))
  assert "block.norm='NormKind.BATCH' is not a NormKind" in _error(export.load_safetensors,
                                                                   str(hub))
  config["model"]["block"]["norm"] = "NormKind.LAYER"
  config["model"]["moe_experts"] = 4
  (hub / "config.json").write_text(json.dumps(config))
  assert "unknown field moe_experts" in _error(export.load_safetensors, str(hub))
  del config["model"]["moe_experts"]
  config["model"]["num_heads"] = 4
  (hub / "config.json").write_text(json.dumps(config))
  assert "do not fit the model" in _error(export.load_safetensors, str(hub))
