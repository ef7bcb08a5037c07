"""Anthropic HH-RLHF: ``{"chosen": transcript, "rejected": transcript}`` -> conversational PreferenceRecord.

Each transcript is ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``; both must share every turn before the final
Assistant reply, which is the response (see :func:`jaxalign.data.prompts.parse_hh_transcript`). Render with
``conversation_style="role_markers"`` to train on the original text layout, or ``"standard"`` for a chat
template.
"""

from __future__ import annotations

from jaxalign.data.fields import Fields
from jaxalign.data.formats.base import Format, ReadOptions, build
from jaxalign.data.prompts import parse_hh_transcript
from jaxalign.data.records import PreferenceRecord


def parse_hh_rlhf(fields: Fields, options: ReadOptions) -> PreferenceRecord:
    chosen, rejected = parse_hh_transcript(fields, "chosen"), parse_hh_transcript(fields, "rejected")
    if chosen[:-1] != rejected[:-1]:
        raise fields.error("rejected", "its turns before the final Assistant reply differ from those of 'chosen'")
    return build(fields, PreferenceRecord, prompt=chosen[:-1], chosen=chosen[-1:], rejected=rejected[-1:])


def _is_hh(row) -> bool:
    chosen = row.get("chosen")
    return ("prompt" not in row and "rejected" in row and isinstance(chosen, str)
            and chosen.lstrip(" ").startswith(("\n\nHuman:", "Human:")))


HH_RLHF = Format("hh_rlhf", PreferenceRecord, parse_hh_rlhf, _is_hh,
                 "Anthropic HH-RLHF chosen/rejected transcripts", fields={"chosen", "rejected"})
