"""Reading the fields of a raw record with checks: every failure is a :class:`DataError` naming the field.

Nested fields are named by their path (``"conversation[2].content"``,
``"completions[1].annotations.honesty.Rating"``), so an error points at the exact value to fix.
Message lists are accepted in both dialects found in the wild: ``{"role", "content"}`` (OpenAI / TRL)
and ``{"from", "value"}`` (ShareGPT); speaker names (``human``, ``gpt``, ...) are mapped by :data:`SPEAKER_ROLES`
in both forms, other roles (``tool``, ...) kept as they are.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from jaxalign.data.errors import DataError, Location, Reason
from jaxalign.data.records import Message, Messages, Turns

# Speaker names of ShareGPT-style ("from") and scored-conversation messages, as chat-template roles.
# Names not listed are kept verbatim (e.g. "tool"): the chat template decides what they mean.
SPEAKER_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
                 "model": "assistant", "system": "system"}

_TYPE_NAMES = {str: "a string", list: "a list", dict: "an object", bool: "a boolean", type(None): "null",
               int: "an integer", float: "a number"}


def _type_name(value: Any) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def shown(value: Any) -> str:
    """``value`` as an error message quotes it: ``repr``, but a huge integer by its number of digits."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an integer of {len(str(abs(value)))} digits"
    return repr(value)


class Fields:
    """The fields of one raw record (a JSON object), or of an object nested in it (``prefix``)."""

    def __init__(self, data: Mapping[str, Any], where: Location, prefix: str = ""):
        self.data = data
        self.where = where
        self.prefix = prefix

    def name(self, key: str | int) -> str:
        """The full path of ``key`` (``"a.b"`` for a nested key, ``"a[3]"`` for an index)."""
        if isinstance(key, int):
            return f"{self.prefix}[{key}]"
        return f"{self.prefix}.{key}" if self.prefix else key

    def error(self, key: str | int | None, problem: str, reason: Reason = Reason.INVALID_VALUE) -> DataError:
        return DataError(problem, where=self.where, field=None if key is None else self.name(key), reason=reason)

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def raw(self, key: str) -> Any:
        """The value of a required field (present and not null)."""
        if key not in self.data:
            present = ", ".join(sorted(map(str, self.data))) or "none"
            raise self.error(key, f"missing (the record has: {present})", Reason.MISSING_FIELD)
        if self.data[key] is None:
            raise self.error(key, "is null", Reason.MISSING_FIELD)
        return self.data[key]

    def _typed(self, key: str, types: type | tuple[type, ...], expected: str) -> Any:
        value = self.raw(key)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
            raise self.error(key, f"expected {expected}, got {_type_name(value)}", Reason.WRONG_TYPE)
        return value

    def _encodable(self, key: str | int, value: str) -> str:
        """``value`` if it is valid Unicode; JSON's ``\\ud800`` escapes can give lone surrogates (text cut
        inside a UTF-16 pair), which no tokenizer accepts."""
        if value.isascii():  # a flag of the str object: no scan, no copy for the common case
            return value
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            raise self.error(key, f"holds invalid Unicode: a lone surrogate {value[error.start]!r} at character "
                                  f"{error.start} (text cut inside a UTF-16 pair)", Reason.MALFORMED) from None
        return value

    def text(self, key: str, *, nonempty: bool = True) -> str:
        value = self._encodable(key, self._typed(key, str, "a string"))
        if nonempty and not value.strip():
            raise self.error(key, "is empty", Reason.EMPTY_RESPONSE)
        return value

    def number(self, key: str) -> float:
        value = self._typed(key, (int, float), "a number")
        try:
            value = float(value)
        except OverflowError:  # an integer beyond 1.8e308
            raise self.error(key, f"expected a finite number, got {shown(value)}") from None
        if not math.isfinite(value):  # Python's json reads NaN and Infinity
            raise self.error(key, f"expected a finite number, got {value}")
        return value

    def integer(self, key: str, choices: range | None = None) -> int:
        value = self._typed(key, int, "an integer")
        if choices is not None and value not in choices:
            raise self.error(key, f"must be in [{choices.start}, {choices.stop - 1}], got {shown(value)}")
        return value

    def flag(self, key: str) -> bool:
        """A boolean; 0 and 1 are accepted as False and True."""
        value = self.raw(key)
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise self.error(key, f"expected a boolean, got {value!r}", Reason.WRONG_TYPE)

    def nested(self, key: str | int) -> Fields:
        """The object at ``key`` (a field name, or an index when this wraps a list)."""
        value = self.data[key] if isinstance(key, int) else self.raw(key)
        if not isinstance(value, dict):
            raise self.error(key, f"expected an object, got {_type_name(value)}", Reason.WRONG_TYPE)
        return Fields(value, self.where, self.name(key))

    def items(self, key: str) -> Fields:
        """The list at ``key``, wrapped so that its elements are read (and named) by index."""
        value = self._typed(key, list, "a list")
        return Fields(dict(enumerate(value)), self.where, self.name(key))

    def messages(self, key: str, *, nonempty: bool = True) -> Messages:
        """A list of messages, role/content or from/value; contents must be strings."""
        listed = self.items(key)
        if nonempty and not listed.data:
            raise self.error(key, "has no messages", Reason.EMPTY_RESPONSE)
        return tuple(listed.message(index) for index in range(len(listed.data)))

    def message(self, key: str | int) -> Message:
        """One message object, role/content or from/value."""
        fields = self.nested(key)
        if "role" in fields.data or "content" in fields.data:
            # ShareGPT's speaker names turn up under 'role' too; a chat template would print them verbatim.
            role, content = fields.text("role"), fields._content("content")
            role = SPEAKER_ROLES.get(role.lower(), role)
        elif "from" in fields.data or "value" in fields.data:
            speaker = fields.text("from")
            role, content = SPEAKER_ROLES.get(speaker.lower(), speaker), fields._content("value")
        else:
            raise self.error(key, "a message needs 'role' and 'content' (or 'from' and 'value')", Reason.MISSING_FIELD)
        return Message(role, content)

    def _content(self, key: str) -> str:
        value = self.raw(key)
        if not isinstance(value, str):
            hint = " (multimodal content parts are not supported)" if isinstance(value, list) else ""
            raise self.error(key, f"expected a string, got {_type_name(value)}{hint}", Reason.WRONG_TYPE)
        return self._encodable(key, value)

    def turns(self, key: str, *, nonempty: bool = True) -> Turns:
        """A plain string or a list of messages (TRL's standard and conversational kinds)."""
        value = self.raw(key)
        if isinstance(value, list):
            return self.messages(key, nonempty=nonempty)
        if isinstance(value, str):
            return self.text(key, nonempty=nonempty)
        raise self.error(key, f"expected a string or a list of messages, got {_type_name(value)}", Reason.WRONG_TYPE)

    def response(self, key: str) -> Turns:
        """A response: a non-blank string, or messages whose assistant contents are not blank."""
        turns = self.turns(key, nonempty=False)
        if isinstance(turns, str) and not turns.strip() or not turns:
            raise self.error(key, "empty response", Reason.EMPTY_RESPONSE)
        if isinstance(turns, str):
            return turns
        for index, message in enumerate(turns):
            if message.role == "assistant" and not message.content.strip():
                raise DataError("empty response", where=self.where, field=f"{self.name(key)}[{index}].content",
                                reason=Reason.EMPTY_RESPONSE)
        return turns


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)
