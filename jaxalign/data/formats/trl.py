"""TRL's dataset types, standard (strings) or conversational (message lists).

=================  ==========================================  =====================
format             fields                                      record
=================  ==========================================  =====================
``sft``            ``prompt`` + ``completion``;                :class:`SFTRecord`
                   or ``messages`` / ``text`` (language
                   modelling: every token is trained)
``preference``     ``chosen`` + ``rejected``, optional         :class:`PreferenceRecord`
                   ``prompt`` (implicit when absent) and
                   ``margin``
``unpaired``       ``prompt`` + ``completion`` + ``label``     :class:`UnpairedRecord`
``prompt_only``    ``prompt``                                  :class:`PromptRecord`
=================  ==========================================  =====================

As in TRL's ``maybe_extract_prompt``, a ``prompt`` whose kind differs from ``chosen``'s (a string prompt
beside full conversations, as in UltraFeedback-binarized) is taken to be redundant, and the prompt is
split off ``chosen``/``rejected`` instead (see :mod:`jaxalign.data.prompts`).
"""

from __future__ import annotations

from jaxalign.data.fields import Fields
from jaxalign.data.formats.base import Format, ReadOptions, build
from jaxalign.data.prompts import split_implicit_prompt
from jaxalign.data.records import PreferenceRecord, PromptRecord, SFTRecord, UnpairedRecord


def parse_sft(fields: Fields, options: ReadOptions) -> SFTRecord:
    if fields.has("messages"):
        return build(fields, SFTRecord, prompt=(), completion=fields.response("messages"))
    if fields.has("text") and not fields.has("completion"):
        return build(fields, SFTRecord, prompt="", completion=fields.text("text"))
    return build(fields, SFTRecord, prompt=fields.turns("prompt", nonempty=False),
                 completion=fields.response("completion"))


def preference_parts(fields: Fields):
    """``(prompt, chosen, rejected)``: the explicit prompt, or the one ``chosen`` and ``rejected`` share."""
    chosen = fields.response("chosen")
    if fields.has("prompt"):
        prompt = fields.turns("prompt", nonempty=False)
        if isinstance(prompt, str) == isinstance(chosen, str):
            return prompt, chosen, fields.response("rejected")
    return split_implicit_prompt(fields)


def parse_preference(fields: Fields, options: ReadOptions) -> PreferenceRecord:
    prompt, chosen, rejected = preference_parts(fields)
    margin = fields.number("margin") if fields.has("margin") else None
    return build(fields, PreferenceRecord, prompt=prompt, chosen=chosen, rejected=rejected, margin=margin)


def parse_unpaired(fields: Fields, options: ReadOptions) -> UnpairedRecord:
    return build(fields, UnpairedRecord, prompt=fields.turns("prompt", nonempty=False),
                 completion=fields.response("completion"), label=fields.flag("label"))


def parse_prompt(fields: Fields, options: ReadOptions) -> PromptRecord:
    return build(fields, PromptRecord, prompt=fields.turns("prompt"))


SFT = Format("sft", SFTRecord, parse_sft,
             lambda row: {"prompt", "completion"} <= row.keys() or "messages" in row or "text" in row,
             "TRL prompt/completion, messages or text")
PREFERENCE = Format("preference", PreferenceRecord, parse_preference,
                    lambda row: {"chosen", "rejected"} <= row.keys(),
                    "TRL chosen/rejected with an explicit or implicit prompt, optional margin")
UNPAIRED = Format("unpaired", UnpairedRecord, parse_unpaired,
                  lambda row: {"prompt", "completion", "label"} <= row.keys(), "TRL prompt/completion/label")
PROMPT_ONLY = Format("prompt_only", PromptRecord, parse_prompt, lambda row: "prompt" in row, "TRL prompt only")
