"""Data, as one import: :mod:`.records` (read and validate files) and :mod:`.batching` (tokenize,
label, collate, order). Every name of both is available here, as before the split.
"""

from .batching import (
    IGNORE_INDEX,
    OVERLONG_CHOICES,
    Batch,
    ExampleOrder,
    OverlongReport,
    Row,
    TrainExample,
    build_examples,
    collate,
    encode_prompt,
    encode_response,
    examples_fingerprint,
    has_chat_template,
    make_row,
    shifted_labels,
)
from .records import DataError, PromptRecord, SampleRecord, read_prompt_records, read_sample_records

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "PromptRecord",
    "SampleRecord",
    "Row",
    "TrainExample",
    "Batch",
    "read_prompt_records",
    "read_sample_records",
    "has_chat_template",
    "encode_prompt",
    "encode_response",
    "make_row",
    "OVERLONG_CHOICES",
    "OverlongReport",
    "build_examples",
    "examples_fingerprint",
    "shifted_labels",
    "collate",
    "ExampleOrder",
]
