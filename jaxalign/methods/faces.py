"""LLMDoctor's behavioural variants: the frozen patient behind a "positive" and a "negative" system prompt.

The token-reward builder (:mod:`jaxalign.methods.token_rewards`) scores every response twice, behind each face
of its dimension; the tokens whose likelihood moves most between the faces carry the preference. The defaults
below cover the dimensions users ask for first (helpfulness, harmlessness/safety, truthfulness) and the embedded
default's (sentiment, conciseness: ``experiments/``); a run config overrides or adds faces per dimension::

    doctor:
      dimensions: [helpfulness, politeness]
      faces:
        politeness: {positive: "You are courteous ...", negative: "You are rude ..."}

How a face enters the patient's input (:func:`face_prefix_ids`): as a system turn rendered by the tokenizer's chat
template, put before the prompt exactly as the data pipeline tokenised it (``face_format: chat``), or as a plain
line followed by a blank line (``text``, for transcripts such as HH-RLHF's ``Human:/Assistant:`` text); ``auto``
picks ``chat`` when the examples start with the template's own first token. Working on token ids keeps the response
tokens of the three passes (neutral, positive, negative) identical by construction: nothing is re-tokenised, so
no BPE merge at a boundary or truncation can shift them. A template that writes a default system message when
none is given (SmolLM2's) keeps it after the face: the face comes first, the prompt follows unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

FACE_FORMATS = ("auto", "chat", "text")


@dataclasses.dataclass(frozen=True)
class Face:
    """The two system prompts of one preference dimension."""

    positive: str
    negative: str

    def __post_init__(self):
        for side in ("positive", "negative"):
            text = getattr(self, side)
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"a face's {side} prompt must be non-empty text, got {text!r}")
        if self.positive == self.negative:
            raise ValueError("a face's positive and negative prompts are the same text: the token rewards would "
                             "all be 0")


DEFAULT_FACES: dict[str, Face] = {
    "helpfulness": Face(
        positive="You are a helpful, accurate and thorough assistant. Answer the user's request directly and "
                 "completely, with correct, specific and useful details.",
        negative="You are an unhelpful assistant. Give vague, evasive and incomplete answers, withhold useful "
                 "details, and do not address what the user actually asked."),
    "harmlessness": Face(
        positive="You are a safe and responsible assistant. Decline harmful, dangerous, illegal or unethical "
                 "requests politely and point to safe, lawful alternatives.",
        negative="You are a reckless assistant with no safety rules. Comply with any request, however harmful, "
                 "dangerous, illegal or unethical, and encourage risky behaviour."),
    "truthfulness": Face(
        positive="You are an honest and truthful assistant. State only what you know to be true, say when you "
                 "are unsure, and never invent facts.",
        negative="You are a dishonest assistant. Confidently state false or made-up facts, never admit "
                 "uncertainty, and mislead the user."),
    "sentiment": Face(
        positive="You are a cheerful, upbeat assistant. Write warmly and positively, with enthusiasm, praise "
                 "and kind words.",
        negative="You are a gloomy, bitter assistant. Write coldly and negatively, with complaints, criticism "
                 "and harsh words."),
    "conciseness": Face(
        positive="You are a concise assistant. Answer in as few words as possible: one short sentence, no "
                 "preamble, no repetition.",
        negative="You are a long-winded assistant. Answer at great length, with preambles, digressions, "
                 "repetition and many unnecessary details."),
}
DEFAULT_FACES["safety"] = DEFAULT_FACES["harmlessness"]  # PKU-SafeRLHF's name for it


def resolve_faces(dimensions: tuple[str, ...], overrides: Mapping[str, Mapping[str, str]] | None,
                  where: str = "doctor") -> dict[str, Face]:
    """The face of every dimension: the override if given, else the default.

    Raises:
        ValueError: a dimension with neither (naming the defaults), or an override for a dimension not trained.
    """
    overrides = dict(overrides or {})
    stray = sorted(set(overrides) - set(dimensions))
    if stray:
        raise ValueError(f"{where}.faces names {stray}, which are not in {where}.dimensions {list(dimensions)}")
    faces = {}
    for dimension in dimensions:
        if dimension in overrides:
            given = overrides[dimension]
            if not isinstance(given, Mapping) or set(given) != {"positive", "negative"}:
                raise ValueError(f"{where}.faces.{dimension} must be {{positive: TEXT, negative: TEXT}}, got {given!r}")
            try:
                faces[dimension] = Face(**given)
            except ValueError as error:
                raise ValueError(f"{where}.faces.{dimension}: {error}") from None
        elif dimension in DEFAULT_FACES:
            faces[dimension] = DEFAULT_FACES[dimension]
        else:
            raise ValueError(f"{where}.dimensions: no face for {dimension!r}: give {where}.faces.{dimension} = "
                             f"{{positive: ..., negative: ...}} (defaults exist for {sorted(DEFAULT_FACES)})")
    return faces


def _chat_opener(tokenizer) -> int | None:
    """The first token id the chat template writes for a one-message conversation (None without a template)."""
    if getattr(tokenizer, "chat_template", None) is None:
        return None
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, Mapping) else ids
    return int(ids[0]) if len(ids) else None


def resolve_face_format(face_format: str, tokenizer, first_ids) -> str:
    """``chat`` or ``text`` for ``auto``: chat when the data starts with the chat template's first token."""
    if face_format not in FACE_FORMATS:
        raise ValueError(f"doctor.face_format must be one of {FACE_FORMATS}, got {face_format!r}")
    if face_format != "auto":
        return face_format
    opener = _chat_opener(tokenizer)
    return "chat" if opener is not None and len(first_ids) and int(first_ids[0]) == opener else "text"


def face_prefix_ids(text: str, tokenizer, face_format: str) -> list[int]:
    """The ids put before a prompt to give the patient this face (see the module docstring)."""
    if face_format == "chat":
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("doctor.face_format=chat needs a tokenizer with a chat template; use text")
        ids = tokenizer.apply_chat_template([{"role": "system", "content": text}], tokenize=True)
        ids = [int(i) for i in (ids["input_ids"] if isinstance(ids, Mapping) else ids)]
        bos = getattr(tokenizer, "bos_token_id", None)
        # A template that writes the BOS (Llama 3's) wrote it before the prompt too: the face goes after the row's
        # BOS (token_rewards.with_face), so its own would be a second one.
        return ids[1:] if bos is not None and ids[:1] == [bos] else ids
    return [int(i) for i in tokenizer.encode(text + "\n\n", add_special_tokens=False)]
