"""The T5X checkpoint reader against checkpoints written in T5X's layouts.

The msgpack + TensorStore layout comes from `t5x_writer` (written from t5x's checkpoints.py);
the orbax layout is written by orbax itself, configured as t5x's OrbaxCheckpointManagerInterface
configures it. bfloat16 comes back as numpy arrays of dtype ml_dtypes.bfloat16, bit-exact.
"""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

from perceiver_ar_t5x.convert.t5x_format import read_t5x_checkpoint
from tests.convert import t5x_writer

# flaxformer Perceiver AR, tiny and distinct: vocab 13, embed 6, heads 3 x head_dim 4, mlp 10.
V, E, H, D, F, LAYERS = 13, 6, 3, 4, 10, 2
NORMS = ("pre_self_attention_layer_norm", "pre_mlp_layer_norm")


def perceiver_ar_params(seed: int) -> dict:
  """A flaxformer Perceiver AR `target` tree (names and 2-D kernel shapes as flaxformer's)."""
  rng = np.random.default_rng(seed)

  def normal(*shape: int) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32)

  layers = {f"layers_{i}": {
      **{norm: {"scale": normal(E)} for norm in NORMS},
      "self_attention": {"query": {"kernel": normal(E, H * D)},
                         "key": {"kernel": normal(E, H * D)},
                         "value": {"kernel": normal(E, H * D)},
                         "out": {"kernel": normal(H * D, E)}},
      "mlp": {"wi_0": {"kernel": normal(E, F)}, "wi_1": {"kernel": normal(E, F)},
              "wo": {"kernel": normal(F, E)}},
  } for i in range(LAYERS)}
  return {"decoder": {"token_embedder": {"embedding": normal(V, E)}, **layers,
                      "decoder_norm": {"scale": normal(E)},
                      "logits_dense": {"kernel": normal(E, V)}}}


def train_state(seed: int, step: int) -> dict:
  """T5X `state_dict()`: target + Adafactor-like factored state the reader must skip."""
  target = perceiver_ar_params(seed)
  emb = target["decoder"]["token_embedder"]["embedding"]
  param_states = {"decoder": {"token_embedder": {"embedding": {
      "v_row": np.ones(V, np.float32), "v_col": np.ones(E, np.float32),
      "v": np.zeros(1, np.float32), "m": np.zeros_like(emb)}}}}
  return {"target": target, "state": {"step": step, "param_states": param_states}}


def flat(tree: dict) -> dict:
  return t5x_writer.flatten(tree)


def bits(a: np.ndarray) -> np.ndarray:
  """bfloat16 compared by its bits (numpy's equality on ml_dtypes goes through float)."""
  return a.view(np.uint16) if a.dtype == ml_dtypes.bfloat16 else a


def cast(tree: dict, dtype: np.dtype) -> dict:
  return {k: cast(v, dtype) if isinstance(v, dict) else v.astype(dtype) for k, v in tree.items()}


def assert_same(got: dict, want: dict) -> None:
  """Same names, and per leaf the same type, dtype, shape and bits."""
  got, want = flat(got), flat(want)
  assert sorted(got) == sorted(want)
  for name, expected in want.items():
    assert isinstance(got[name], np.ndarray), name
    assert (got[name].dtype, got[name].shape) == (expected.dtype, expected.shape), name
    np.testing.assert_array_equal(bits(got[name]), bits(expected), err_msg=name)


def test_model_dir_reads_latest_step_bfloat16(tmp_path):
  """Save dtype bfloat16: TensorStore and inline (msgpack) target leaves both come back bf16."""
  model_dir = str(tmp_path)
  inline = [f"target/decoder/layers_{i}/{n}/scale" for i in range(LAYERS) for n in NORMS]
  t5x_writer.write_t5x_checkpoint(model_dir, train_state(0, 10), save_dtype="bfloat16",
                                  inline=inline)
  latest = train_state(1, 200)
  t5x_writer.write_t5x_checkpoint(model_dir, latest, save_dtype="bfloat16", inline=inline)
  os.makedirs(os.path.join(model_dir, "checkpoint_300.tmp-1234"))  # an unfinished save
  target, step = read_t5x_checkpoint(model_dir)
  assert step == 200
  assert_same(target, cast(latest["target"], np.dtype(ml_dtypes.bfloat16)))
  assert target["decoder"]["layers_1"]["self_attention"]["query"]["kernel"].shape == (E, H * D)


@pytest.mark.parametrize("driver", ["file", "gfile", "gcs"])
def test_step_dir_float32_chunked_and_sharded(tmp_path, monkeypatch, driver):
  """float32; several chunks (small chunk target), zstd shards, the three kvstore spellings."""
  monkeypatch.setattr(t5x_writer, "DESIRED_CHUNK_SIZE_BYTES", 64)  # 16 f32 per chunk
  state = train_state(2, 7)
  shards = {"target/decoder/token_embedder/embedding": (V, 3),
            "target/decoder/logits_dense/kernel": (3, V)}
  step_dir = t5x_writer.write_t5x_checkpoint(str(tmp_path), state, shard_shapes=shards,
                                             inline=["target/decoder/decoder_norm/scale"],
                                             kvstore_driver=driver)
  emb_files = os.listdir(os.path.join(step_dir, "target.decoder.token_embedder.embedding"))
  assert sorted(emb_files) == [".zarray", "0.0", "0.1"]
  wo_files = os.listdir(os.path.join(step_dir, "target.decoder.layers_0.mlp.wo.kernel"))
  assert len(wo_files) > 2  # [10, 6] in chunks of <= 16 elements
  for path in (step_dir, os.path.join(step_dir, "checkpoint")):
    target, step = read_t5x_checkpoint(path)
    assert step == 7
    assert_same(target, state["target"])


def test_orbax_layout(tmp_path):
  """checkpoint_<step>/state/ written by orbax with t5x's options (OCDBT, 'checkpoint' prefix)."""
  state = train_state(3, 5)
  state["target"]["decoder"]["decoder_norm"]["scale"] = (
      state["target"]["decoder"]["decoder_norm"]["scale"].astype(ml_dtypes.bfloat16))
  state["state"]["step"] = np.int32(5)
  options = ocp.CheckpointManagerOptions(step_prefix="checkpoint", cleanup_tmp_directories=True)
  handlers = {"state": ocp.PyTreeCheckpointHandler(use_ocdbt=True)}
  with ocp.CheckpointManager(str(tmp_path), options=options, item_handlers=handlers) as manager:
    manager.save(5, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state)))
    manager.wait_until_finished()
  assert os.path.exists(tmp_path / "checkpoint_5" / "state" / "_METADATA")
  target, step = read_t5x_checkpoint(str(tmp_path))
  assert step == 5
  assert target["decoder"]["decoder_norm"]["scale"].dtype == ml_dtypes.bfloat16
  assert_same(target, state["target"])


def test_orbax_aggregate_placeholders(tmp_path):
  """Older orbax: a 'checkpoint' msgpack of PLACEHOLDER:// strings and zarr dirs beside it."""
  state = train_state(6, 11)
  t5x_writer.write_orbax_aggregate_checkpoint(str(tmp_path), state)
  target, step = read_t5x_checkpoint(str(tmp_path / "checkpoint_11"))
  assert step == 11
  assert_same(target, state["target"])


def one_line_error(path: str) -> str:
  with pytest.raises(ValueError) as info:
    read_t5x_checkpoint(path)
  message = str(info.value)
  assert "\n" not in message, message
  return message


def test_not_a_checkpoint_is_one_line_error(tmp_path):
  (tmp_path / "notes.txt").write_text("hello")
  (tmp_path / "checkpoint_old").mkdir()
  message = one_line_error(str(tmp_path))
  assert "Not a T5X checkpoint" in message and "notes.txt" in message, message
  assert "does not exist" in one_line_error(str(tmp_path / "missing"))


def test_truncated_msgpack_is_one_line_error(tmp_path):
  step_dir = t5x_writer.write_t5x_checkpoint(str(tmp_path), train_state(4, 3),
                                             inline=["target/decoder/decoder_norm/scale"])
  file = os.path.join(step_dir, "checkpoint")
  with open(file, "rb") as f:
    raw = f.read()
  with open(file, "wb") as f:
    f.write(raw[: len(raw) // 2])
  message = one_line_error(str(tmp_path))
  assert "not a readable msgpack" in message and file in message, message


def test_missing_tensorstore_array_names_the_parameter(tmp_path):
  step_dir = t5x_writer.write_t5x_checkpoint(str(tmp_path), train_state(5, 4))
  zarray = os.path.join(step_dir, "target.decoder.layers_1.mlp.wi_1.kernel", ".zarray")
  os.remove(zarray)
  message = one_line_error(step_dir)
  assert "target/decoder/layers_1/mlp/wi_1/kernel" in message, message
