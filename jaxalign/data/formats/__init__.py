"""The registry of file formats and their detection from a source's first record.

Detection tries the formats in :data:`FORMATS` order (most specific first) on the first record that is a
JSON object; ``format=`` overrides it. Each format's module documents its fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxalign.data.errors import DataError, Location, Reason
from jaxalign.data.formats.base import OPENAI_PAD_TOKEN_ID, Format, ReadOptions
from jaxalign.data.formats.conversations import MEDICAL_QA, SCORED_CONVERSATION, SHAREGPT_PREFERENCE
from jaxalign.data.formats.hh_rlhf import HH_RLHF
from jaxalign.data.formats.openai import OPENAI_PREFERENCES
from jaxalign.data.formats.pku_saferlhf import PKU_SAFERLHF
from jaxalign.data.formats.trl import PREFERENCE, PROMPT_ONLY, SFT, UNPAIRED
from jaxalign.data.formats.ultrafeedback import ULTRAFEEDBACK, ULTRAFEEDBACK_BINARIZED

FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        SCORED_CONVERSATION,
        SHAREGPT_PREFERENCE,
        MEDICAL_QA,
        PKU_SAFERLHF,
        ULTRAFEEDBACK,
        ULTRAFEEDBACK_BINARIZED,
        OPENAI_PREFERENCES,
        HH_RLHF,
        PREFERENCE,
        UNPAIRED,
        SFT,
        PROMPT_ONLY,
    )
}


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise ValueError(f"unknown format {name!r}; known formats: {', '.join(FORMATS)}")
    return FORMATS[name]


def detect_format(row: Mapping[str, Any], where: Location) -> Format:
    """The first format of :data:`FORMATS` whose detector accepts ``row``.

    Raises:
        DataError: no format matches (the message lists the record's fields and the known formats).
    """
    for candidate in FORMATS.values():
        if candidate.detect(row):
            return candidate
    known = "; ".join(f"{f.name} ({f.summary})" for f in FORMATS.values())
    raise DataError(f"cannot tell the format from the fields {sorted(row)}; pass format= one of: {known}",
                    where=where, reason=Reason.MISSING_FIELD)


__all__ = ["FORMATS", "OPENAI_PAD_TOKEN_ID", "Format", "ReadOptions", "detect_format", "get_format"]
