"""What a format is: a name, the record type it yields, a field parser and a detector."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from jaxalign.data.errors import DataError, Reason
from jaxalign.data.fields import Fields
from jaxalign.data.records import Record

#: The pad id of OpenAI's lm-human-preferences label files (outside GPT-2's 50257-token vocabulary).
OPENAI_PAD_TOKEN_ID = 50259


@dataclass(frozen=True)
class ReadOptions:
    """Settings some formats need.

    Attributes:
        source_tokenizer: the tokenizer that produced token-id fields (lm-human-preferences stores GPT-2
            ids); they are decoded to text with it and re-tokenised later with the training tokenizer.
        openai_pad_token_id: the id that pads those token-id fields; dropped before decoding.
    """

    source_tokenizer: Any = None
    openai_pad_token_id: int = OPENAI_PAD_TOKEN_ID


@dataclass(frozen=True)
class Format:
    """A file format: ``parse`` turns one record's fields into a canonical record (or a DataError).

    ``detect`` looks at a record (a dict; the reader passes the union of the first records' fields, see
    :func:`jaxalign.data.formats.detect_format`) and says whether it is in this format; formats are tried
    in registry order, most specific first.

    ``fields`` are the fields the format reads (``field_pattern``, a regular expression, adds numbered ones
    such as ``sample0``, ``sample1``...); ``tolerated`` are fields of other formats that real files of this
    format carry as copies of what it reads (UltraFeedback-binarized's ``messages``). A record holding a
    field that another format reads, and that this one neither reads nor tolerates, would lose it: the
    registry's :func:`~jaxalign.data.formats.parse_record` refuses it (``foreign_field``). Fields no format
    reads (ids, sources, model names) are ignored.
    """

    name: str
    record_type: type
    parse: Callable[[Fields, ReadOptions], Record]
    detect: Callable[[Mapping[str, Any]], bool]
    summary: str
    fields: frozenset[str] = frozenset()
    tolerated: frozenset[str] = frozenset()
    field_pattern: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "fields", frozenset(self.fields))
        object.__setattr__(self, "tolerated", frozenset(self.tolerated))

    def reads(self, key: str) -> bool:
        """Whether ``key`` is one of the fields this format reads."""
        return key in self.fields or bool(self.field_pattern and re.fullmatch(self.field_pattern, key))

    def allows(self, key: str) -> bool:
        """Whether a record of this format may hold ``key`` (read or tolerated)."""
        return self.reads(key) or key in self.tolerated


def build(fields: Fields, record_type: type, **values) -> Record:
    """``record_type(**values)``, its validation failures reported as DataErrors at ``fields``' record."""
    try:
        return record_type(**values, origin=fields.where)
    except DataError:  # the record named the field and reason itself (e.g. identical responses)
        raise
    except ValueError as error:
        raise DataError(str(error), where=fields.where, reason=Reason.INVALID_VALUE) from None
