"""`c4_en_spm`: TFDS `c4/en` (Raffel et al. 2020) with a SentencePiece vocabulary.

The paper's C4 runs (Perceiver AR, Sec. 5.3) use 8192-token contexts with 1024 latents.
Data: a prepared TFDS `c4/en` under TFDS_DATA_DIR (or tasks.configure.tfds_data_dir);
nothing is downloaded. Vocabulary: any SentencePiece .model (SPM_MODEL or
tasks.configure.spm_model), e.g. T5's 32k `cc_all.32000/sentencepiece.model`.
"""

from __future__ import annotations

import seqio

from perceiver_ar_t5x.tasks import text
from perceiver_ar_t5x.tasks.tfds_source import LazyTfdsSource

TFDS_NAME = "c4/en:3.1.0"


def register_c4(name: str = "c4_en_spm", tfds_name: str = TFDS_NAME) -> seqio.Task:
  source = LazyTfdsSource(tfds_name, splits=["train", "validation"], text_key="text")
  return text.spm_text_task(name, source)
