"""One frozen config from sources to batches: :class:`DataConfig`, :func:`build_dataset`, :func:`build_batches`.

A dataset is read from one ``source`` or from a mixture of ``sources``: each is read on its own (its own format,
split and read report), ``dedup`` then leaves out duplicates across all of them, they are tokenised together
(one kind of example, ``filter`` applied before truncation), and the dataset remembers each example's source,
the weights and what every stage removed per source (``dataset.mixture``), which it logs as a table.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from jaxalign.data.errors import OnError, Report, check_on_error
from jaxalign.data.formats import get_format
from jaxalign.data.loader import BatchIterator, check_batching
from jaxalign.data.mixture import MixtureSource, SourceSpec, allocate, composition_table
from jaxalign.data.reader import read_records
from jaxalign.data.records import PreferenceGroup, PreferenceRecord, flatten_groups
from jaxalign.data.render import ConversationStyle
from jaxalign.data.selection import LengthFilter, check_dedup, deduplicate
from jaxalign.data.tokenize import KINDS, Rendering, TokenizedDataset, tokenize_sources
from jaxalign.data.truncation import Truncation, TruncationMode

log = logging.getLogger("jaxalign.data")


@dataclass(frozen=True)
class DataConfig:
    """A dataset and how to batch it. Validates itself; ``dataclasses.asdict`` gives plain values to save.

    Attributes:
        source: a ``.jsonl`` / ``.json`` (optionally ``.gz``) file, or a hub dataset name (online only).
        sources: a mixture instead of ``source``: entries ``{source, weight, split, format}`` (a bare file name
            is ``{source: NAME}``), interleaved by weight (:mod:`jaxalign.data.mixture`); weight 1 each unless
            given. Exactly one of ``source`` and ``sources``.
        weights: the mixture's weights as one list, one per entry of ``sources`` (then no entry gives its own);
            moved into the entries when the config is built.
        dedup: ``exact`` or ``prompt``: leave out duplicate records, across sources
            (:mod:`jaxalign.data.selection`); None keeps them.
        filter: ``{min_length, max_length}``: leave out examples whose longest sequence has fewer or more tokens,
            counted before truncation (:class:`~jaxalign.data.selection.LengthFilter`).
        format: a format name (:data:`jaxalign.data.formats.FORMATS`); None detects it (each source's own).
        split: the hub dataset split (of every source that names none).
        on_error: ``"raise"`` at the first bad record, or ``"skip"`` bad records and report them.
        limit: keep at most this many records (for quick experiments), of each source.
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

    source: str | None = None
    sources: tuple[SourceSpec | str, ...] | None = None
    weights: tuple[float, ...] | None = None
    dedup: str | None = None
    filter: LengthFilter | None = None
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
        try:
            self._check_sources()
            check_dedup(self.dedup)
            object.__setattr__(self, "filter", LengthFilter.parse(self.filter))
        except ValueError as error:
            raise ValueError(f"DataConfig: {error}") from None
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

    def _check_sources(self) -> None:
        if (self.source is None) == (self.sources is None):
            raise ValueError("give source (one file) or sources (a mixture), not both" if self.source is not None
                             else "no data: give source (one file) or sources (a mixture)")
        if self.source is not None:
            if not isinstance(self.source, str) or not self.source:
                raise ValueError(f"source must be a file or dataset name, got {self.source!r}"
                                 + ("; mix several with sources: [...]" if isinstance(self.source, (list, tuple))
                                    else ""))
            if self.weights is not None:
                raise ValueError("weights are a mixture's: give sources, one weight each")
            return
        if isinstance(self.sources, (str, bytes)) or not isinstance(self.sources, Sequence) or not self.sources:
            raise ValueError(f"sources must be a list of one or more sources, got {self.sources!r}")
        specs = tuple(SourceSpec.parse(value, index) for index, value in enumerate(self.sources))
        if self.weights is not None:
            weights = self.weights
            if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) or len(weights) != len(specs):
                raise ValueError(f"weights {weights!r} do not match the {len(specs)} sources: give one weight per "
                                 "source, in the order of sources")
            given = [i for i, spec in enumerate(specs) if spec.weight is not None]
            if given:
                raise ValueError(f"sources[{given[0]}] gives its own weight and weights gives them all: use one of "
                                 "the two")
            try:
                specs = tuple(replace(spec, weight=weight) for spec, weight in zip(specs, weights, strict=True))
            except ValueError as error:
                raise ValueError(f"weights: {error}") from None
            object.__setattr__(self, "weights", None)  # now the entries': the resolved config reads back the same
        for spec in specs:
            if spec.format is not None:
                get_format(spec.format)
        object.__setattr__(self, "sources", specs)

    def source_specs(self) -> tuple[SourceSpec, ...]:
        """The sources to read, each with its weight, split and format resolved (one for ``source``)."""
        specs = self.sources if self.sources is not None else (SourceSpec(self.source),)
        return tuple(replace(spec, weight=1.0 if spec.weight is None else float(spec.weight),
                             split=spec.split or self.split, format=spec.format or self.format) for spec in specs)

    @property
    def name(self) -> str:
        """How messages cite the data: ``source``, or the mixture's sources joined with ``+``."""
        return self.source if self.source is not None else " + ".join(spec.source for spec in self.sources)

    def truncation_policy(self) -> Truncation:
        """The truncation settings (``max_length``, ``max_prompt_length``, ``truncation``) as one value."""
        return Truncation(self.max_length, self.max_prompt_length, self.truncation)

    def rendering(self) -> Rendering:
        """How records become text (``conversation_style``, ``score_template``, ``text_as_chat``, ``add_eos``)."""
        return Rendering(self.conversation_style, self.score_template, self.text_as_chat, self.add_eos)


def build_dataset(config: DataConfig, tokenizer, *, source_tokenizer=None,
                  progress: bool | None = None) -> TokenizedDataset:
    """Read and tokenise ``config``'s source or sources (the module docstring); ``dataset.reports`` holds every
    stage's reports (reading each source, de-duplicating, tokenising), ``dataset.mixture`` the per-source counts.

    Raises:
        DataError: bad records (``on_error="raise"``), or a source left without records (every one of them
            skipped, a duplicate or filtered out): naming the file, record and field where one is to blame.
    """
    specs = config.source_specs()
    groups, reports = [], []
    for spec in specs:
        records, read_report = read_records(spec.source, format=spec.format, split=spec.split,
                                            on_error=config.on_error, limit=config.limit,
                                            source_tokenizer=source_tokenizer, progress=progress)
        if config.dimension is not None:
            records = _one_dimension(records, config.dimension, read_report)
        groups.append((read_report.source, records))
        reports.append(read_report)
    _check_one_kind(groups)
    dedup_reports = []
    if config.dedup is not None:
        kept, dedup_reports = deduplicate(groups, config.dedup)
        groups = [(name, records) for (name, _), records in zip(groups, kept, strict=True)]
    dataset = tokenize_sources(groups, tokenizer, truncation=config.truncation_policy(),
                               rendering=config.rendering(), on_error=config.on_error, progress=progress,
                               length_filter=config.filter)
    reports += dedup_reports + list(dataset.reports)
    mixture = ()
    if len(specs) > 1 or config.dedup is not None or config.filter is not None:
        mixture = _composition(specs, reports[:len(specs)], dedup_reports, dataset)
        per_epoch = allocate([s.counts["examples"] for s in mixture], [s.weight for s in mixture]).tolist()
        log.warning("data: %d source(s), %d examples%s\n%s", len(mixture), len(dataset),
                    f" ({config.dedup} de-duplicated)" if config.dedup else "", composition_table(mixture, per_epoch))
    return replace(dataset, reports=tuple(reports), mixture=mixture)


def _check_one_kind(groups: Sequence[tuple[str, Sequence]]) -> None:
    """The sources of a mixture hold one kind of record (they become one dataset): else a line naming each's."""
    kinds = {name: sorted({KINDS.get(type(record), type(record).__name__) for record in records})
             for name, records in groups}
    if len({kind for found in kinds.values() for kind in found}) > 1 and len(groups) > 1:
        described = "; ".join(f"{name}: {', '.join(found)}" for name, found in kinds.items())
        raise ValueError(f"data.sources mix kinds of records ({described}): the sources of a mixture become one "
                         "dataset and must all hold the same kind (SFT, pairs, groups, ...)")


def _composition(specs: Sequence, read_reports: Sequence[Report], dedup_reports: Sequence[Report],
                 dataset: TokenizedDataset) -> tuple[MixtureSource, ...]:
    """Each source's weight and counts: records read, duplicates, too short/long, skipped, examples kept."""
    sources = []
    for index, spec in enumerate(specs):
        tokenized = dataset.reports[index]
        counts: dict[str, Any] = {"read": read_reports[index].kept,
                                  "duplicates": dedup_reports[index].notes["duplicates"] if dedup_reports else 0,
                                  "too_short": tokenized.notes["too_short"], "too_long": tokenized.notes["too_long"],
                                  "skipped": sum(tokenized.skipped.values()), "examples": tokenized.kept}
        sources.append(MixtureSource(read_reports[index].source, spec.weight, counts))
    return tuple(sources)


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
    """:func:`build_dataset`, then its :class:`BatchIterator` (``iterator.dataset.reports`` for the reports); a
    mixture's batches interleave its sources by weight."""
    dataset = build_dataset(config, tokenizer, source_tokenizer=source_tokenizer, progress=progress)
    return BatchIterator(dataset, batch_size=config.batch_size, seed=config.seed, shuffle=config.shuffle,
                         drop_last=config.drop_last, num_epochs=config.num_epochs, buckets=config.buckets,
                         pad_to_multiple_of=config.pad_to_multiple_of,
                         pack_length=config.max_length if config.packing else None,
                         process_index=process_index, process_count=process_count)
