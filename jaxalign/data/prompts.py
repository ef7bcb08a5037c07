"""Prompts that a source leaves implicit: the shared start of ``chosen`` and ``rejected``, and HH-RLHF text.

Implicit prompt (TRL's ``extract_prompt`` when a preference record has no ``prompt``):

- **conversational**: the longest common prefix of the two message lists, at a message boundary; what
  follows must start with an assistant message.
- **standard** (plain strings): the longest common prefix, cut back to the start of its last run of
  whitespace, so a word is never split and the whitespace opens each response (``"Q: sky? A:"`` +
  ``" blue"``/``" green"``). TRL cuts at the first differing character and only moves one space:
  ``"... A: blue sky"`` vs ``"... A: blues"`` gives TRL the prompt ``"... A: blue"`` and the response
  ``"s"``; here the prompt is ``"... A:"``. Both agree whenever the responses differ from their first word.

HH-RLHF (Anthropic) stores each side as one transcript ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``; it is
parsed into messages (``Human`` -> user, ``Assistant`` -> assistant, contents stripped of surrounding
whitespace), and the prompt is everything before the final assistant reply, which must be the same on
both sides.
"""

from __future__ import annotations

import re

from jaxalign.data.errors import DataError, Reason
from jaxalign.data.fields import Fields
from jaxalign.data.records import Message, Messages, Turns, identical_responses

_HH_MARKER = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def common_prefix_length(first, second) -> int:
    """How many leading elements two sequences share."""
    length = 0
    for a, b in zip(first, second, strict=False):
        if a != b:
            break
        length += 1
    return length


def _text_prompt_end(chosen: str, rejected: str) -> int:
    """Where the implicit prompt of two strings ends: the start of the last whitespace run of their common prefix."""
    shared = chosen[: common_prefix_length(chosen, rejected)]
    end = len(shared)
    while end and not shared[end - 1].isspace():  # back out of a word the two responses share a start of
        end -= 1
    while end and shared[end - 1].isspace():  # and give the whitespace before it to the responses
        end -= 1
    return end


def split_implicit_prompt(fields: Fields, chosen_key: str = "chosen",
                          rejected_key: str = "rejected") -> tuple[Turns, Turns, Turns]:
    """``(prompt, chosen response, rejected response)`` from two full texts or conversations.

    Raises:
        DataError: the two differ in kind, are identical, share no prompt, or one response is empty after
            the prompt.
    """
    chosen, rejected = fields.turns(chosen_key), fields.turns(rejected_key)
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise fields.error(rejected_key, f"is {'a string' if isinstance(rejected, str) else 'a message list'} while "
                           f"{chosen_key!r} is not", Reason.WRONG_TYPE)
    if chosen == rejected:  # checked before splitting, which would leave two empty responses
        raise identical_responses(fields.where, fields.name(rejected_key), chosen_key)
    end = (_text_prompt_end(chosen, rejected) if isinstance(chosen, str)
           else common_prefix_length(chosen, rejected))
    if end == 0:
        raise fields.error(None, f"{chosen_key!r} and {rejected_key!r} share no prompt to split off; "
                           "give the prompt in a 'prompt' field")
    for key, full in ((chosen_key, chosen), (rejected_key, rejected)):
        response = full[end:]
        if not isinstance(full, str) and response and response[0].role != "assistant":
            raise fields.error(key, f"after the shared prompt the response starts with a {response[0].role!r} "
                               "message, not an assistant one")
        if not (response.strip() if isinstance(response, str) else response):
            raise fields.error(key, "is empty after the shared prompt", Reason.EMPTY_RESPONSE)
    return chosen[:end], chosen[end:], rejected[end:]


def parse_hh_transcript(fields: Fields, key: str) -> Messages:
    """An HH-RLHF transcript (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``) as messages ending with the assistant's."""
    text = fields.text(key)
    if text.startswith(("Human:", "Assistant:")):  # a few exports drop the leading blank line
        text = "\n\n" + text
    parts = _HH_MARKER.split(text)
    if parts[0].strip():
        raise fields.error(key, f"text before the first '\\n\\nHuman:' marker: {parts[0][:40]!r}")
    turns = zip(parts[1::2], parts[2::2], strict=True)
    messages = tuple(Message(_HH_ROLES[role], content.strip()) for role, content in turns)
    if not messages:
        raise fields.error(key, "no '\\n\\nHuman:' / '\\n\\nAssistant:' turns found")
    if messages[0].role != "user":
        raise fields.error(key, "the transcript must start with a Human turn")
    if messages[-1].role != "assistant":
        raise fields.error(key, "the transcript must end with an Assistant turn (the response)")
    if not messages[-1].content:
        raise DataError("empty response (the final Assistant turn)", where=fields.where, field=fields.name(key),
                        reason=Reason.EMPTY_RESPONSE)
    return messages
