"""SeqIO tasks. Importing this package registers every task in the TaskRegistry.

Data-backed tasks (text_bytes, c4_en_spm, pg19_bytes, pg19_spm, maestro_midi, and for
Perceiver IO text_bytes_mlm, pg19_bytes_mlm, text_classification) read their
locations lazily (locations.py): set them with `tasks.configure(...)` (gin: see
gin/tasks/*.gin) or with environment variables (locations.ENV_VARS).
"""

from perceiver_ar_t5x.tasks import c4, classification, copy, keywords, maestro, mlm, pg19, text
from perceiver_ar_t5x.tasks.files import SKIPPED
from perceiver_ar_t5x.tasks.locations import configure

copy.register("copy_mirrored", vocab_size=32)
text.register_text_bytes("text_bytes")
c4.register_c4("c4_en_spm")
pg19.register_pg19("pg19_bytes", "pg19_spm")
maestro.register_maestro("maestro_midi")
mlm.register_text_bytes_mlm("text_bytes_mlm")
mlm.register_pg19_bytes_mlm("pg19_bytes_mlm")
classification.register_text_classification("text_classification")
keywords.register_keyword_classification("keyword_classification")

__all__ = ["SKIPPED", "configure"]
