"""Whole-split evaluation: every token of every document scored once, checked the slow way.

The corpus is written here: documents of very different lengths, one far longer than
the context (16) and one shorter than the latents (4). The reference scores each
position p in the window that should score it (ending at e(p)), one model.logits call
per window end, and must match the packed, batched scorer.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio

from perceiver_ar_t5x import checkpoints, documents, evaluation, tasks, whole_split
from perceiver_ar_t5x.models import CroppingMethod, PerceiverARModel
from perceiver_ar_t5x.perceiver_ar import PerceiverAR
from perceiver_ar_t5x.tasks import preprocessors

CONTEXT, LATENTS = 16, 4
TEXTS = ["ab", "hello, world", "perceiver ar reads long documents; " * 9 + "end",
         "the quick brown fox jumps over the lazy dog", "héllo wörld ✓"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  for i, text in enumerate(TEXTS):
    (root / f"{i}.txt").write_text(text, encoding="utf-8")
  tasks.configure(text_files=str(root), text_validation_files=str(root))
  yield documents.load_documents("text_bytes", "validation", {"targets": CONTEXT})
  tasks.configure(text_files=None, text_validation_files=None)


@pytest.fixture(scope="module")
def model_and_params():
  module = PerceiverAR(vocab_size=259, num_latents=LATENTS, embed_dim=12, num_heads=3,
                       head_dim=8, mlp_dim=20, num_layers=3, max_length=32)
  model = PerceiverARModel(module=module, cropping=CroppingMethod.NONE)
  part = checkpoints.params_partitioning(model, CONTEXT, checkpoints.pt.PartitioningConfig())
  params = jax.device_put(model.init(jax.random.key(5), CONTEXT), part.state_sharding.params)
  return model, part, params, jax.jit(model.logits)


def reference_nll(logits_fn, params, doc, end_of, context=CONTEXT, latents=LATENTS):
  """[length] per-token NLL, position p scored by the window ending at end_of(p)."""
  nll = np.zeros(doc.length)
  inputs = np.concatenate([[0], doc.tokens[:-1]])
  for p in range(doc.length):
    end = end_of(p)
    offset = max(0, end - context)
    row = np.zeros([1, context], np.int32)
    row[0, :end - offset] = inputs[offset:end]
    start = max(end - latents, 0) - offset
    logits = logits_fn(params, {"decoder_input_tokens": jnp.asarray(row)},
                       jnp.asarray([start], jnp.int32))
    log_probs = jax.nn.log_softmax(logits[0, p - offset - start])
    nll[p] = -float(log_probs[doc.tokens[p]])
  return nll


def end_stride_1(length, latents=LATENTS):
  return lambda p: min(length, latents) if p < latents else p + 1


def end_stride_latents(length, latents=LATENTS):
  return lambda p: min(length, latents * (p // latents + 1))


def test_documents_are_whole_with_eos(corpus):
  vocab = seqio.ByteVocabulary()
  assert len(corpus) == len(TEXTS)
  got = sorted(doc.tokens.tolist() for doc in corpus)
  assert got == sorted(vocab.encode(t) + [vocab.eos_id] for t in TEXTS)
  assert max(doc.length for doc in corpus) > 10 * CONTEXT
  assert min(doc.length for doc in corpus) < LATENTS


@pytest.mark.parametrize("stride,end_of", [(1, end_stride_1), (LATENTS, end_stride_latents)])
def test_whole_split_equals_the_slow_per_token_computation(corpus, model_and_params, stride,
                                                           end_of):
  model, part, params, logits_fn = model_and_params
  scorer = whole_split.Scorer(model=model, part=part, docs=corpus, context=CONTEXT,
                              batch_size=8, stride=stride, first_bucket=8)
  count = documents.byte_counter(seqio.ByteVocabulary())
  summary = whole_split.summarize(scorer(params), num_documents=len(corpus),
                                  num_bytes=sum(count(d) for d in corpus), first_bucket=8)
  nlls = [reference_nll(logits_fn, params, doc, end_of(doc.length)) for doc in corpus]
  num_tokens = sum(len(t.encode("utf-8")) + 1 for t in TEXTS)  # every byte and the EOS
  num_bytes = sum(len(t.encode("utf-8")) for t in TEXTS)
  assert summary["num_tokens"] == num_tokens and summary["num_bytes"] == num_bytes
  assert summary["num_documents"] == len(TEXTS)
  total = sum(float(n.sum()) for n in nlls)
  assert summary["bits_per_byte"] == pytest.approx(total / math.log(2) / num_bytes, rel=1e-5)
  assert summary["cross_ent_loss"] == pytest.approx(total / num_tokens, rel=1e-5)
  for lo, hi in whole_split.bucket_edges(scorer.num_buckets, 8):
    in_bucket = np.concatenate([n[lo:hi] for n in nlls])
    assert summary[f"nll_by_position/{lo}-{hi}"] == pytest.approx(in_bucket.mean(), rel=1e-5)


def test_strides_agree_where_they_must(corpus, model_and_params):
  """Same tokens for every stride; a document no longer than the latents is one window."""
  model, part, params, _ = model_and_params
  short = [doc for doc in corpus if doc.length <= LATENTS]
  assert short
  sums, short_nll = {}, {}
  for stride in (1, 3, LATENTS):
    sums[stride] = whole_split.Scorer(model=model, part=part, docs=corpus, context=CONTEXT,
                                      batch_size=8, stride=stride)(params)
    assert float(sums[stride]["weight_sum"]) == sum(d.num_scored for d in corpus)
    short_nll[stride] = float(whole_split.Scorer(
        model=model, part=part, docs=short, context=CONTEXT, batch_size=8,
        stride=stride)(params)["nll_sum"])
    assert short_nll[stride] == pytest.approx(short_nll[1], rel=1e-6)
  assert sums[1]["num_windows"] > sums[3]["num_windows"] > sums[LATENTS]["num_windows"]


def test_window_ends_cover_every_weighted_position_once():
  for length in (1, 3, 4, 5, 11, 40):
    for stride in (1, 2, 3, 4):
      for first in (0, min(2, length - 1), length - 1):
        weights = (np.arange(length) >= first).astype(np.float32)
        plan = whole_split.window_ends(weights, LATENTS, stride)
        covered = [p for a, e in plan for p in range(a, e) if weights[p]]
        assert covered == list(range(first, length)), (length, stride, first)
        assert all(e - max(a, first) <= max(LATENTS, stride) for a, e in plan)
        assert all(e - a <= stride for a, e in plan[1:])
  with pytest.raises(ValueError, match="EVAL_STRIDE"):
    whole_split.window_ends(np.ones(8), LATENTS, LATENTS + 1)


def test_position_buckets_double():
  ids = whole_split.position_bucket(np.asarray([0, 63, 64, 127, 128, 255, 256, 1000]))
  assert ids.tolist() == [0, 0, 1, 1, 2, 2, 3, 4]
  assert whole_split.bucket_edges(3) == [(0, 64), (64, 128), (128, 256)]


def test_token_cap_cuts_exactly_and_batch_cap_cuts_documents(corpus, model_and_params):
  model, part, params, _ = model_and_params
  capped = documents.load_documents("text_bytes", "validation", {"targets": CONTEXT},
                                    max_tokens=50)
  assert sum(d.num_scored for d in capped) == 50
  assert [d.tokens.tolist() for d in capped[:-1]] == [d.tokens.tolist() for d in corpus[:len(
      capped) - 1]]
  assert len(documents.load_documents("text_bytes", "validation", {"targets": CONTEXT},
                                      max_documents=2)) == 2
  scorer = whole_split.Scorer(model=model, part=part, docs=corpus, context=CONTEXT,
                              batch_size=8, stride=LATENTS, max_batches=2)
  assert len(scorer.windows) == 16
  assert float(scorer(params)["weight_sum"]) == sum(d.num_scored for d in scorer.docs)


def test_prefix_lm_documents_score_targets_only(model_and_params):
  """copy_mirrored: inputs + targets, loss on the targets; one window each = LAST_LATENTS."""
  docs = list(documents.iter_documents("copy_mirrored", "validation",
                                       {"inputs": 2, "targets": 2}))
  assert len(docs) == 256
  assert all(d.weights.tolist() == [0, 0, 1, 1] for d in docs)
  assert all(d.tokens[2:].tolist() == d.tokens[:2][::-1].tolist() for d in docs)
  plan = whole_split.plan_windows(docs[:3], LATENTS, 1)
  assert [(w.first, w.end) for w in plan] == [(0, 4)] * 3


def test_crop_steps_are_marked_and_dropped():
  assert preprocessors.is_crop_step(preprocessors.random_crop)
  assert not preprocessors.is_crop_step(preprocessors.append_eos)
  task = documents.document_task(seqio.get_mixture_or_task("text_bytes"))
  assert not any(preprocessors.is_crop_step(s) for s in task.preprocessors)
  assert len(task.preprocessors) == len(seqio.get_mixture_or_task("text_bytes").preprocessors) - 2


def test_evaluation_module_default_is_whole_split():
  assert evaluation.ScoringMode.WHOLE_SPLIT.value == "whole_split"


def test_book_and_midi_tasks_give_whole_documents(tmp_path):
  """pg19_bytes / pg19_spm (the c4 path: same text task) and maestro_midi, uncropped."""
  import os

  import pretty_midi

  from perceiver_ar_t5x.tasks import maestro
  spm = os.path.join(os.path.dirname(seqio.__file__), "test_data", "sentencepiece",
                     "sentencepiece.model")
  books = ["a long book. " * 40, "short"]
  (tmp_path / "pg19" / "validation").mkdir(parents=True)
  for i, text in enumerate(books):
    (tmp_path / "pg19" / "validation" / f"{i}.txt").write_text(text)
  midi_dir = tmp_path / "maestro"
  midi_dir.mkdir()
  rows = ["canonical_composer,canonical_title,split,year,midi_filename,audio_filename,duration"]
  for i in range(2):
    pm = pretty_midi.PrettyMIDI()
    piano = pretty_midi.Instrument(program=0)
    piano.notes = [pretty_midi.Note(70, 40 + i + k % 20, 0.1 * k, 0.1 * k + 0.25)
                   for k in range(30 + 20 * i)]
    pm.instruments.append(piano)
    pm.write(str(midi_dir / f"{i}.midi"))
    rows.append(f"C,T,validation,2018,{i}.midi,{i}.wav,3")
  (midi_dir / "maestro-v3.0.0.csv").write_text("\n".join(rows) + "\n")
  tasks.configure(pg19_dir=str(tmp_path / "pg19"), spm_model=spm, maestro_dir=str(midi_dir))
  try:
    lengths = {"targets": 8}
    byte_docs = documents.load_documents("pg19_bytes", "validation", lengths)
    spm_docs = documents.load_documents("pg19_spm", "validation", lengths)
    midi_docs = documents.load_documents("maestro_midi", "validation", lengths)
  finally:
    tasks.configure(pg19_dir=None, spm_model=None, maestro_dir=None)
  vocab = seqio.SentencePieceVocabulary(spm)
  assert sorted(d.length for d in byte_docs) == sorted(len(b) + 1 for b in books)
  assert sorted(d.tokens.tolist() for d in spm_docs) == sorted(
      vocab.encode(b) + [vocab.eos_id] for b in books)
  expected = [maestro._notes_to_events(maestro._parse_notes(str(midi_dir / f"{i}.midi")), 0,
                                       1.0).tolist() + [1] for i in range(2)]
  assert sorted(d.tokens.tolist() for d in midi_docs) == sorted(expected)
  assert min(d.length for d in midi_docs) > 8 * 8  # far longer than the crop
