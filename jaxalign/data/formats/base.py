"""What a format is: a name, the record type it yields, a field parser and a detector."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from jaxalign.data.errors import DataError, Reason
from jaxalign.data.fields import Fields
from jaxalign.data.records import Record

# The pad id of OpenAI's lm-human-preferences label files (outside GPT-2's 50257-token vocabulary).
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

    ``detect`` looks at the first record (a dict) and says whether it is in this format; formats are tried
    in registry order, most specific first.
    """

    name: str
    record_type: type
    parse: Callable[[Fields, ReadOptions], Record]
    detect: Callable[[Mapping[str, Any]], bool]
    summary: str


def build(fields: Fields, record_type: type, **values) -> Record:
    """``record_type(**values)``, its validation failures reported as DataErrors at ``fields``' record."""
    try:
        return record_type(**values, origin=fields.where)
    except ValueError as error:
        raise DataError(str(error), where=fields.where, reason=Reason.INVALID_VALUE) from None
