"""Preference-data formats -> canonical records -> token arrays (padding, masks, packing). No jax is imported here.

Quick path::

    from jaxalign import data

    tokenizer = data.load_tokenizer(models.default_model_path())           # SmolLM2's, from its GGUF
    config = data.DataConfig("hh_rlhf.jsonl", max_length=512, buckets=(128, 256, 512), batch_size=8)
    batches = data.build_batches(config, tokenizer)                         # format detected: hh_rlhf
    batch = next(batches)        # input_ids/attention_mask/loss_mask/positions [8, 2, T], example_mask [8]
    state = batches.state_dict() # save with the checkpoint; batches.load_state_dict(state) resumes

Step by step: :func:`read_records` (file -> records + report), :func:`tokenize` (records ->
:class:`TokenizedDataset`), :class:`BatchIterator` (dataset -> batches). Mixtures of several sources
(``DataConfig(sources=[...])``), de-duplication and the length filter: :mod:`jaxalign.data.mixture`,
:mod:`jaxalign.data.selection`. See ``docs/data.md``.
"""

from jaxalign.data.batches import (
    Batch,
    CandidateBatch,
    GroupBatch,
    PairBatch,
    PromptBatch,
    SequenceBatch,
    SharedPairBatch,
    batch_class,
)
from jaxalign.data.collate import collate, collate_packed
from jaxalign.data.config import DataConfig, build_batches, build_dataset
from jaxalign.data.errors import DataError, Location, Reason, Report
from jaxalign.data.formats import FORMATS, OPENAI_PAD_TOKEN_ID, Format, ReadOptions, detect_format, get_format
from jaxalign.data.loader import BatchIterator, epoch_order
from jaxalign.data.mixture import MixtureSource, SourceSpec, mixture_order
from jaxalign.data.reader import read_prompt_file, read_records
from jaxalign.data.records import (
    BestOfNRecord,
    Message,
    PreferenceGroup,
    PreferenceRecord,
    PromptRecord,
    Record,
    ScoredConversation,
    SFTRecord,
    UnpairedRecord,
    flatten_groups,
    text_as_chat,
)
from jaxalign.data.render import conversation_to_sft, record_as_text, render_text
from jaxalign.data.selection import DEDUP_MODES, LengthFilter
from jaxalign.data.tokenize import (
    TOKEN_VALUES,
    Rendering,
    TokenizedDataset,
    TokenizedExample,
    tokenize,
    tokenize_sources,
)
from jaxalign.data.tokenizer import load_tokenizer
from jaxalign.data.truncation import TokenSequence, Truncation

__all__ = [
    "Batch",
    "CandidateBatch",
    "GroupBatch",
    "PairBatch",
    "PromptBatch",
    "SequenceBatch",
    "SharedPairBatch",
    "batch_class",
    "DEDUP_MODES",
    "FORMATS",
    "OPENAI_PAD_TOKEN_ID",
    "TOKEN_VALUES",
    "BatchIterator",
    "BestOfNRecord",
    "DataConfig",
    "DataError",
    "Format",
    "LengthFilter",
    "Location",
    "Message",
    "MixtureSource",
    "PreferenceGroup",
    "PreferenceRecord",
    "PromptRecord",
    "ReadOptions",
    "Reason",
    "Record",
    "Rendering",
    "Report",
    "SFTRecord",
    "ScoredConversation",
    "SourceSpec",
    "TokenSequence",
    "TokenizedDataset",
    "TokenizedExample",
    "Truncation",
    "UnpairedRecord",
    "build_batches",
    "build_dataset",
    "collate",
    "collate_packed",
    "conversation_to_sft",
    "detect_format",
    "epoch_order",
    "flatten_groups",
    "get_format",
    "load_tokenizer",
    "mixture_order",
    "read_prompt_file",
    "read_records",
    "record_as_text",
    "render_text",
    "text_as_chat",
    "tokenize",
    "tokenize_sources",
]
