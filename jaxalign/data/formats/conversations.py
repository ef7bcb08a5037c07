"""Conversations: scored transcripts, Medical-QA / ShareGPT conversations, and ShareGPT preference pairs.

- ``scored_conversation``: ``{"conversation": [{"role": "human"|"assistant", "content"}],
  "meta_eval_score": number, "score_reason": str (optional)}`` -> ScoredConversation. Speaker names are
  mapped to chat roles (human -> user); the conversation must end with the assistant's reply.
- ``medical_qa``: ``{"conversations": [{"from": "human"|"gpt", "value"}], "answer": str, "score": number}``
  -> ScoredConversation. With ``answer`` the conversation must end before the reply and ``answer`` is
  appended as the assistant's message; without it (plain ShareGPT SFT data) the conversation must end
  with the assistant. ``score`` is optional.
- ``sharegpt_preference``: ``{"conversations": [...], "chosen": reply, "rejected": reply}`` where a reply is
  a message, a list of messages or a string (the assistant's) -> conversational PreferenceRecord.
"""

from __future__ import annotations

from jaxalign.data.errors import Reason
from jaxalign.data.fields import SPEAKER_ROLES, Fields
from jaxalign.data.formats.base import Format, ReadOptions, build
from jaxalign.data.records import Message, Messages, PreferenceRecord, ScoredConversation


def _as_roles(messages: Messages) -> Messages:
    return tuple(Message(SPEAKER_ROLES.get(m.role.lower(), m.role), m.content) for m in messages)


def _require_reply(fields: Fields, key: str, messages: Messages) -> None:
    if messages[-1].role != "assistant":
        raise fields.error(key, f"must end with the assistant's reply, ends with a {messages[-1].role!r} message")
    if not messages[-1].content.strip():
        raise fields.error(f"{key}[{len(messages) - 1}].content", "empty response", Reason.EMPTY_RESPONSE)


def parse_scored_conversation(fields: Fields, options: ReadOptions) -> ScoredConversation:
    messages = _as_roles(fields.messages("conversation"))
    _require_reply(fields, "conversation", messages)
    reason = fields.text("score_reason", nonempty=False) if fields.has("score_reason") else None
    return build(fields, ScoredConversation, messages=messages, score=fields.number("meta_eval_score"), reason=reason)


def parse_medical_qa(fields: Fields, options: ReadOptions) -> ScoredConversation:
    messages = fields.messages("conversations")
    if fields.has("answer"):
        if messages[-1].role == "assistant":
            raise fields.error("conversations", "ends with an assistant message although 'answer' holds the reply")
        messages += (Message("assistant", fields.text("answer")),)
    else:
        _require_reply(fields, "conversations", messages)
    score = fields.number("score") if fields.has("score") else None
    return build(fields, ScoredConversation, messages=messages, score=score)


def _reply(fields: Fields, key: str) -> Messages:
    value = fields.raw(key)
    if isinstance(value, dict):
        return (fields.message(key),)
    if isinstance(value, str):
        return (Message("assistant", fields.text(key)),)
    return fields.messages(key)


def parse_sharegpt_preference(fields: Fields, options: ReadOptions) -> PreferenceRecord:
    prompt = fields.messages("conversations")
    chosen, rejected = _reply(fields, "chosen"), _reply(fields, "rejected")
    for key, reply in (("chosen", chosen), ("rejected", rejected)):
        if not any(m.content.strip() for m in reply):
            raise fields.error(key, "empty response", Reason.EMPTY_RESPONSE)
    return build(fields, PreferenceRecord, prompt=prompt, chosen=chosen, rejected=rejected)


SCORED_CONVERSATION = Format("scored_conversation", ScoredConversation, parse_scored_conversation,
                             lambda row: {"conversation", "meta_eval_score"} <= row.keys(),
                             "conversation + meta_eval_score + score_reason",
                             fields={"conversation", "meta_eval_score", "score_reason"})
SHAREGPT_PREFERENCE = Format("sharegpt_preference", PreferenceRecord, parse_sharegpt_preference,
                             lambda row: {"conversations", "chosen", "rejected"} <= row.keys(),
                             "ShareGPT conversations + chosen/rejected replies",
                             fields={"conversations", "chosen", "rejected"})
MEDICAL_QA = Format("medical_qa", ScoredConversation, parse_medical_qa, lambda row: "conversations" in row,
                    "ShareGPT-style conversations (from/value) + answer + score",
                    fields={"conversations", "answer", "score"})
