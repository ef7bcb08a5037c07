"""Conversation rendering styles, score conditioning, and scored conversations as SFT records.

Three styles turn messages into model input:

- ``"standard"``: the tokenizer's chat template (ChatML for SmolLM2); the prompt ends with the template's
  generation prompt. Records stay conversational and :mod:`jaxalign.data.tokenize` renders them.
- ``"role_markers"``: plain text in HH-RLHF's layout, each message as ``"\\n\\n<Label>: <content>"``
  (labels ``Human``, ``Assistant``, ``System``; other roles capitalised). The prompt ends with
  ``"\\n\\nAssistant:"`` and the response starts with a space, so an HH-RLHF transcript read by
  :func:`jaxalign.data.prompts.parse_hh_transcript` renders back to its original text (up to
  whitespace around the contents, which parsing strips).
- ``"turn_markers"``: plain text with numbered exchanges, one message per line:
  ``"[Turn 1] Human: hi\\n[Turn 1] Assistant: hello\\n[Turn 2] Human: ..."`` (``[System] ...`` for
  system messages). A turn number counts the user messages so far, so turns stay unambiguous even when a
  content contains blank lines or the word "Human:". The prompt ends with ``"\\n[Turn k] Assistant:"``.

The two text styles produce standard (string) records, tokenised without a chat template; the end of a
response is then marked by the tokenizer's EOS token (see :mod:`jaxalign.data.tokenize`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from jaxalign.data.records import (
    BestOfNRecord,
    Message,
    Messages,
    PreferenceGroup,
    PreferenceRecord,
    PromptRecord,
    Record,
    ScoredConversation,
    SFTRecord,
    Turns,
    UnpairedRecord,
)

ConversationStyle = Literal["standard", "role_markers", "turn_markers"]
STYLES = ("standard", "role_markers", "turn_markers")

ROLE_LABELS = {"user": "Human", "assistant": "Assistant", "system": "System"}


def _label(role: str) -> str:
    return ROLE_LABELS.get(role, role.capitalize())


def _turn_lines(messages: Messages) -> list[str]:
    lines, turn = [], 0
    for message in messages:
        if message.role == "system":
            lines.append(f"[System] {message.content}")
            continue
        turn += message.role == "user"
        lines.append(f"[Turn {max(turn, 1)}] {_label(message.role)}: {message.content}")
    return lines


def render_text(messages: Messages, style: ConversationStyle) -> str:
    """``messages`` as one string in a text style (``"role_markers"`` or ``"turn_markers"``)."""
    if style == "role_markers":
        return "".join(f"\n\n{_label(m.role)}: {m.content}" for m in messages)
    if style == "turn_markers":
        return "\n".join(_turn_lines(messages))
    raise ValueError(f"render_text: style must be 'role_markers' or 'turn_markers', got {style!r}")


def assistant_opening(prompt: Messages, style: ConversationStyle) -> str:
    """The text that opens the assistant's reply after ``prompt`` (the text styles' generation prompt)."""
    if style == "role_markers":
        return "\n\nAssistant:"
    turn = max(sum(m.role == "user" for m in prompt), 1)
    return ("\n" if prompt else "") + f"[Turn {turn}] Assistant:"


def split_text(prompt: Messages, response: Messages, style: ConversationStyle) -> tuple[str, str]:
    """``(prompt text, response text)`` in a text style; the prompt ends with the assistant's opening.

    ``prompt + response`` concatenate to the rendering of the whole conversation. With an empty prompt
    the response is the whole rendering (language modelling on every token).
    """
    full = render_text(prompt + response, style)
    if not prompt:
        return "", full
    head = render_text(prompt, style)
    if response and response[0].role == "assistant":
        head += assistant_opening(prompt, style)
    return head, full[len(head):]


def _as_text(prompt: Turns, response: Turns, style: ConversationStyle) -> tuple[str, str]:
    if isinstance(response, str):
        return prompt, response
    return split_text(prompt, response, style)


def record_as_text(record: Record, style: ConversationStyle) -> Record:
    """A conversational record rendered to standard strings in a text style (standard records unchanged)."""
    if style == "standard":
        return record
    if isinstance(record, PreferenceGroup):
        return replace(record, pairs=tuple(record_as_text(pair, style) for pair in record.pairs))
    if isinstance(record, (SFTRecord, UnpairedRecord)):
        prompt, completion = _as_text(record.prompt, record.completion, style)
        return replace(record, prompt=prompt, completion=completion)
    if isinstance(record, PreferenceRecord):
        prompt, chosen = _as_text(record.prompt, record.chosen, style)
        rejected = _as_text(record.prompt, record.rejected, style)[1]
        return replace(record, prompt=prompt, chosen=chosen, rejected=rejected)
    if isinstance(record, BestOfNRecord):
        samples = tuple(_as_text(record.prompt, sample, style)[1] for sample in record.samples)
        return replace(record, prompt=_as_text(record.prompt, record.samples[0], style)[0], samples=samples)
    if isinstance(record, PromptRecord):
        if isinstance(record.prompt, str):
            return record
        return replace(record, prompt=render_text(record.prompt, style) + assistant_opening(record.prompt, style))
    raise TypeError(f"record_as_text: cannot render a {type(record).__name__}; convert it first")


def with_score(messages: Messages, score: float, template: str) -> Messages:
    """``messages`` conditioned on ``score``: ``template.format(score=score)`` as (or atop) the system message."""
    line = template.format(score=score)
    if messages and messages[0].role == "system":
        return (Message("system", f"{line}\n{messages[0].content}"),) + messages[1:]
    return (Message("system", line),) + messages


def conversation_to_sft(conversation: ScoredConversation, *, score_template: str | None = None) -> SFTRecord:
    """The SFT record of a scored conversation: train on its final assistant reply, given all before it.

    Args:
        conversation: the scored conversation.
        score_template: for score-conditioned SFT, e.g. ``"Quality score: {score:.1f}"``; the formatted
            line becomes (or is put atop) the system message, so at inference the desired score is asked
            for the same way. None trains without it.

    Returns:
        ``SFTRecord(prompt=messages[:-1], completion=messages[-1:], score=conversation.score)``; the score
        also travels as ``score [B]`` in SFT batches (weights, or external rewards).
    """
    messages = conversation.messages
    if score_template is not None:
        if conversation.score is None:
            raise ValueError("conversation_to_sft: a score_template needs a conversation with a score")
        messages = with_score(messages, conversation.score, score_template)
    return SFTRecord(messages[:-1], messages[-1:], score=conversation.score, origin=conversation.origin)
