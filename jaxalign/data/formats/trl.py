"""TRL's dataset types, standard (strings) or conversational (message lists).

=================  ==========================================  =====================
format             fields                                      record
=================  ==========================================  =====================
``sft``            ``prompt`` + ``completion``;                :class:`SFTRecord`
                   or ``messages`` / ``text`` (language
                   modelling: every token is trained);
                   optional ``score``
``preference``     ``chosen`` + ``rejected``, optional         :class:`PreferenceRecord`
                   ``prompt`` (implicit when absent) and
                   ``margin``
``unpaired``       ``prompt`` + ``completion`` + ``label``     :class:`UnpairedRecord`
``prompt_only``    ``prompt``                                  :class:`PromptRecord`
=================  ==========================================  =====================

A preference record's ``prompt``, when the key is there, is never dropped or duplicated without a check:

- null: an error (``missing_field``), not an implicit prompt; empty (``""``, ``[]``): an implicit prompt;
- a string beside full conversations (UltraFeedback-binarized): as in TRL's ``maybe_extract_prompt`` the
  prompt is split off ``chosen``/``rejected`` (see :mod:`jaxalign.data.prompts`), and the string must be
  the conversation's first user message, which it repeats (else it would be lost: an error);
- messages beside messages: responses that repeat the prompt's messages have them removed (TRL keeps them,
  training the prompt a second time as part of the response); each response must then start with an
  assistant message;
- messages beside strings, or a string beside assistant-only messages: an error (TRL would drop the prompt).

An SFT record holds one shape: ``completion`` beside ``messages`` or ``text`` (or ``prompt`` beside
``text``) is an error, since one of them would be lost. A ``prompt`` beside ``messages`` (UltraChat ships
one) must repeat their start (the first user message's content, or a leading slice of the messages): it is
not read.
"""

from __future__ import annotations

from jaxalign.data.errors import Reason
from jaxalign.data.fields import Fields
from jaxalign.data.formats.base import Format, ReadOptions, build
from jaxalign.data.prompts import split_implicit_prompt
from jaxalign.data.records import Messages, PreferenceRecord, PromptRecord, SFTRecord, UnpairedRecord

# The three shapes of an SFT record; a record holds one of them (a second one would be lost).
SFT_SHAPES = ("completion", "messages", "text")


def _one_shape(fields: Fields, shape: str, others: tuple[str, ...]) -> None:
    for other in others:
        if fields.has(other):
            raise fields.error(other, f"beside {shape!r}: an sft record holds prompt + completion, messages, or text, "
                               "not several (all but one would be lost)", Reason.FOREIGN_FIELD)


def _prompt_beside_messages(fields: Fields, messages: Messages) -> None:
    """A ``prompt`` next to ``messages`` (as in UltraChat) must repeat their start: it is not read."""
    prompt = fields.turns("prompt", nonempty=False)
    if not prompt:
        return
    if isinstance(prompt, str):
        first_user = next((m.content for m in messages if m.role == "user"), None)
        redundant = first_user is not None and prompt.strip() == first_user.strip()
    else:
        redundant = tuple(messages[: len(prompt)]) == prompt
    if not redundant:
        raise fields.error("prompt", "is not the start of 'messages' (a string prompt must be the first user "
                           "message's content) and would be lost: drop it, or give prompt + completion instead")


def parse_sft(fields: Fields, options: ReadOptions) -> SFTRecord:
    score = fields.number("score") if fields.has("score") else None
    if fields.has("messages") and not fields.has("completion"):
        _one_shape(fields, "messages", ("text",))
        messages = fields.response("messages")
        if fields.has("prompt"):
            _prompt_beside_messages(fields, messages)
        return build(fields, SFTRecord, prompt=(), completion=messages, score=score)
    if fields.has("text") and not fields.has("completion"):
        _one_shape(fields, "text", ("prompt",))
        return build(fields, SFTRecord, prompt="", completion=fields.text("text"), score=score)
    _one_shape(fields, "completion", ("messages", "text"))
    return build(fields, SFTRecord, prompt=fields.turns("prompt", nonempty=False),
                 completion=fields.response("completion"), score=score)


def preference_parts(fields: Fields):
    """``(prompt, chosen, rejected)``: the explicit prompt, or the one ``chosen`` and ``rejected`` share
    (see the module docstring for the checks on an explicit prompt)."""
    chosen = fields.response("chosen")
    if "prompt" not in fields.data:
        return split_implicit_prompt(fields)
    prompt = fields.turns("prompt", nonempty=False)
    if isinstance(prompt, str) and isinstance(chosen, str):
        return prompt, chosen, fields.response("rejected")
    if not (prompt.strip() if isinstance(prompt, str) else prompt):  # "" or []: nothing given, nothing lost
        return split_implicit_prompt(fields)
    if isinstance(prompt, str):
        if chosen[0].role == "assistant":
            raise fields.error("prompt", "is a string while 'chosen' and 'rejected' are messages: give it as "
                               "[{role: user, content: ...}]", Reason.WRONG_TYPE)
        implicit, chosen, rejected = split_implicit_prompt(fields)
        first_user = next((m.content for m in implicit if m.role == "user"), None)
        if first_user is None or first_user.strip() != prompt.strip():
            raise fields.error("prompt", "is not the first user message of 'chosen'/'rejected', which hold the "
                               "whole conversation, and would be lost: drop it, or give the responses only")
        return implicit, chosen, rejected
    if isinstance(chosen, str):
        raise fields.error("prompt", "is a message list while 'chosen' is a string: give both as strings or "
                           "both as messages", Reason.WRONG_TYPE)
    return prompt, *_responses_after(fields, prompt, chosen, fields.response("rejected"))


def _responses_after(fields: Fields, prompt: Messages, chosen: Messages, rejected: Messages):
    """The responses beside an explicit message prompt, without the prompt's messages if both repeat them."""
    repeats = [bool(prompt) and full[:len(prompt)] == prompt for full in (chosen, rejected)]
    if repeats[0] != repeats[1]:
        key = "rejected" if repeats[0] else "chosen"
        raise fields.error(key, "does not repeat the prompt's messages while the other response does")
    if repeats[0]:
        chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
    for key, response in (("chosen", chosen), ("rejected", rejected)):
        if not response:
            raise fields.error(key, "is empty after the prompt's messages", Reason.EMPTY_RESPONSE)
        if response[0].role != "assistant":
            raise fields.error(key, f"starts with a {response[0].role!r} message, not an assistant one: beside "
                               "'prompt' it must hold the response only")
    return chosen, rejected  # PreferenceRecord refuses identical responses


def parse_preference(fields: Fields, options: ReadOptions) -> PreferenceRecord:
    prompt, chosen, rejected = preference_parts(fields)
    margin = fields.number("margin") if fields.has("margin") else None
    return build(fields, PreferenceRecord, prompt=prompt, chosen=chosen, rejected=rejected, margin=margin)


def parse_unpaired(fields: Fields, options: ReadOptions) -> UnpairedRecord:
    return build(fields, UnpairedRecord, prompt=fields.turns("prompt", nonempty=False),
                 completion=fields.response("completion"), label=fields.flag("label"))


def parse_prompt(fields: Fields, options: ReadOptions) -> PromptRecord:
    difficulty = fields.number("difficulty") if fields.has("difficulty") else None
    return build(fields, PromptRecord, prompt=fields.turns("prompt"), difficulty=difficulty)


SFT = Format("sft", SFTRecord, parse_sft,
             lambda row: {"prompt", "completion"} <= row.keys() or "messages" in row or "text" in row,
             "TRL prompt/completion, messages or text, optional score",
             fields={"prompt", *SFT_SHAPES, "score"})
PREFERENCE = Format("preference", PreferenceRecord, parse_preference,
                    lambda row: {"chosen", "rejected"} <= row.keys(),
                    "TRL chosen/rejected with an explicit or implicit prompt, optional margin",
                    fields={"prompt", "chosen", "rejected", "margin"})
UNPAIRED = Format("unpaired", UnpairedRecord, parse_unpaired,
                  lambda row: {"prompt", "completion", "label"} <= row.keys(), "TRL prompt/completion/label",
                  fields={"prompt", "completion", "label"})
PROMPT_ONLY = Format("prompt_only", PromptRecord, parse_prompt, lambda row: "prompt" in row,
                     "TRL prompt only, optional difficulty", fields={"prompt", "difficulty"})
