"""One frozen config from a source to batches: :class:`DataConfig`, :func:`build_dataset`, :func:`build_batches`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from jaxalign.data.errors import OnError, check_on_error
from jaxalign.data.formats import get_format
from jaxalign.data.loader import BatchIterator, check_batching
from jaxalign.data.reader import read_records
from jaxalign.data.records import PreferenceGroup, PreferenceRecord, flatten_groups
from jaxalign.data.render import ConversationStyle
from jaxalign.data.tokenize import Rendering, TokenizedDataset, tokenize
from jaxalign.data.truncation import Truncation, TruncationMode

log = logging.getLogger("jaxalign.data")


@dataclass(frozen=True)
class DataConfig:
    """A dataset and how to batch it. Validates itself; ``dataclasses.asdict`` gives plain values to save.

    Attributes:
        source: a ``.jsonl`` / ``.json`` (optionally ``.gz``) file, or a hub dataset name (online only).
        format: a format name (:data:`jaxalign.data.formats.FORMATS`); None detects it.
        split: the hub dataset split.
        on_error: ``"raise"`` at the first bad record, or ``"skip"`` bad records and report them.
        limit: keep at most this many records (for quick experiments).
        max_length: tokens per sequence (defaults to the largest bucket when ``buckets`` is set).
        max_prompt_length, truncation: see :class:`~jaxalign.data.truncation.Truncation`.
        conversation_style, score_template, text_as_chat, add_eos: see :class:`~jaxalign.data.tokenize.Rendering`.
        batch_size: rows per process.
        seed, shuffle, drop_last, num_epochs: see :class:`~jaxalign.data.loader.BatchIterator`.
        buckets, pad_to_multiple_of: static padded lengths (see :mod:`jaxalign.data.loader`).
        packing: pack SFT sequences into rows of ``max_length`` tokens.
        dimension: keep only this preference dimension of grouped data (PKU-SafeRLHF's ``helpfulness`` or
            ``safety``, an UltraFeedback aspect): each group becomes its one pair of that dimension, for DPO or
            a one-head reward model. Groups without such a pair (a tie) are counted in the read report's notes.
    """

    source: str
    format: str | None = None
    split: str = "train"
    on_error: OnError = "raise"
    limit: int | None = None
    max_length: int | None = None
    max_prompt_length: int | None = None
    truncation: TruncationMode = "keep_start"
    conversation_style: ConversationStyle = "standard"
    score_template: str | None = None
    text_as_chat: bool = False
    add_eos: bool = True
    batch_size: int = 8
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = True
    num_epochs: int | None = None
    buckets: tuple[int, ...] | None = None
    pad_to_multiple_of: int | None = None
    packing: bool = False
    dimension: str | None = None

    def __post_init__(self):
        check_on_error(self.on_error)
        if self.format is not None:
            get_format(self.format)
        if self.buckets is not None:
            object.__setattr__(self, "buckets", tuple(self.buckets))
        try:
            check_batching(batch_size=self.batch_size, num_epochs=self.num_epochs, buckets=self.buckets,
                           pad_to_multiple_of=self.pad_to_multiple_of)
        except ValueError as error:
            raise ValueError(f"DataConfig: {error}") from None
        if self.buckets is not None:
            if self.max_length is None:
                object.__setattr__(self, "max_length", self.buckets[-1])
            elif self.max_length > self.buckets[-1]:
                raise ValueError(f"DataConfig: max_length {self.max_length} exceeds the largest bucket "
                                 f"{self.buckets[-1]}")
        if self.packing and self.max_length is None:
            raise ValueError("DataConfig: packing needs max_length (the packed row length)")
        if self.packing and (self.buckets is not None or self.pad_to_multiple_of is not None):
            raise ValueError("DataConfig: packed rows are always max_length long; drop buckets/pad_to_multiple_of")
        if self.dimension is not None and (not isinstance(self.dimension, str) or not self.dimension):
            raise ValueError(f"DataConfig: dimension must be a dimension's name, got {self.dimension!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"DataConfig: limit must be positive, got {self.limit}")
        self.truncation_policy()
        self.rendering()

    def truncation_policy(self) -> Truncation:
        return Truncation(self.max_length, self.max_prompt_length, self.truncation)

    def rendering(self) -> Rendering:
        return Rendering(self.conversation_style, self.score_template, self.text_as_chat, self.add_eos)


def build_dataset(config: DataConfig, tokenizer, *, source_tokenizer=None,
                  progress: bool | None = None) -> TokenizedDataset:
    """Read and tokenise ``config.source``; ``dataset.reports`` holds the read and tokenize reports."""
    records, read_report = read_records(config.source, format=config.format, split=config.split,
                                        on_error=config.on_error, limit=config.limit,
                                        source_tokenizer=source_tokenizer, progress=progress)
    if config.dimension is not None:
        records = _one_dimension(records, config.dimension, read_report)
    dataset = tokenize(records, tokenizer, truncation=config.truncation_policy(), rendering=config.rendering(),
                       on_error=config.on_error, progress=progress, source=read_report.source)
    return replace(dataset, reports=(read_report, *dataset.reports))


def _one_dimension(records: list, dimension: str, report) -> list[PreferenceRecord]:
    """The ``dimension`` pair of every group; groups without one are counted in ``report.notes``."""
    if not all(isinstance(record, PreferenceGroup) for record in records):
        kinds = sorted({type(record).__name__ for record in records})
        raise ValueError(f"data.dimension={dimension!r} picks one dimension of grouped preference data "
                         f"(PKU-SafeRLHF, UltraFeedback); {report.source} holds {', '.join(kinds)} records")
    pairs = flatten_groups(records, dimension)
    if not pairs:
        known = sorted({d for group in records for d in group.dimensions})
        raise ValueError(f"data.dimension={dimension!r}: no pair of {report.source} has that dimension "
                         f"(it has {known})")
    if len(pairs) < len(records):
        report.notes[f"groups_without_{dimension}"] += len(records) - len(pairs)
        log.warning("%s: %d of %d groups have no %r pair (a tie) and are left out", report.source,
                    len(records) - len(pairs), len(records), dimension)
    return pairs


def build_batches(config: DataConfig, tokenizer, *, process_index: int = 0, process_count: int = 1,
                  source_tokenizer=None, progress: bool | None = None) -> BatchIterator:
    """:func:`build_dataset`, then its :class:`BatchIterator` (``iterator.dataset.reports`` for the reports)."""
    dataset = build_dataset(config, tokenizer, source_tokenizer=source_tokenizer, progress=progress)
    return BatchIterator(dataset, batch_size=config.batch_size, seed=config.seed, shuffle=config.shuffle,
                         drop_last=config.drop_last, num_epochs=config.num_epochs, buckets=config.buckets,
                         pad_to_multiple_of=config.pad_to_multiple_of,
                         pack_length=config.max_length if config.packing else None,
                         process_index=process_index, process_count=process_count)
