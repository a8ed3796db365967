"""Re-indexing a converted vocabulary: same logits for every kept id, our ids in and out."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_ar_t5x.convert import model_dir, vocab
from perceiver_ar_t5x.models import PerceiverARModel
from perceiver_ar_t5x.perceiver_ar import PerceiverAR


def test_remapped_model_reads_and_predicts_our_byte_ids():
  module = PerceiverAR(vocab_size=262, num_latents=4, embed_dim=16, num_heads=2, head_dim=8,
                       mlp_dim=24, num_layers=2, output_bias=True)
  params = nn.unbox(PerceiverARModel(module).init(jax.random.key(0), 8))
  params["logits_bias"] = np.arange(262, dtype=np.float32) / 100  # non-trivial
  converted = vocab.remap_krasserm(model_dir.Converted(module, params, 3, "test"), "bytes")
  assert converted.module.vocab_size == 259 and "re-indexed" in converted.report[-1]
  text = np.frombuffer(b"hello, bytes!", np.uint8).astype(np.int32)[None, :]
  theirs = module.apply({"params": params}, jnp.asarray(text + 6))
  ours = converted.module.apply({"params": converted.params}, jnp.asarray(text + 3))
  np.testing.assert_allclose(ours, np.asarray(theirs)[..., vocab.TABLES[
      ("perceiver_bytes", "bytes")]], atol=1e-6)


def test_unknown_vocabulary_is_one_error():
  module = PerceiverAR(vocab_size=100, num_latents=4, embed_dim=8, num_heads=1, head_dim=8,
                       mlp_dim=8, num_layers=1)
  with pytest.raises(model_dir.ConversionError, match="neither the text"):
    vocab.remap_krasserm(model_dir.Converted(module, {}, 0, "test"), "bytes")
