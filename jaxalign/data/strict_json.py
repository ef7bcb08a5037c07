"""JSON parsing that refuses, with a position and a path, what Python's ``json`` module mishandles.

- Nesting deeper than the interpreter's recursion limit allows raises ``RecursionError`` in ``json``.
- An integer longer than ``sys.get_int_max_str_digits()`` (4300 by default) raises a bare ``ValueError``.
- A key given twice in one object is silently reduced to its last value (other readers keep the first).

:func:`loads` raises :class:`StrictJSONError` for all three, naming the offset in the text and the path
(keys and indices) of the offending value, so a caller can cite the line, column, record and field. The
common path costs one hook call per object (the duplicate-key check); the position and path are only
worked out, by scanning the text again, once parsing has failed.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

# The tokens that matter to the scan: strings (whole, so their contents are skipped), numbers, punctuation.
_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|[][{}:,]')


class StrictJSONError(ValueError):
    """JSON that Python cannot read faithfully: ``path`` (keys and indices, outermost first) leads to the
    offending value, ``offset`` is its 0-based position in the text (None when it could not be found).

    The problem reads ``f"{what} (at <position>){rest}"``; :meth:`problem` fills in the position.
    """

    def __init__(self, what: str, rest: str, path: list[str | int], offset: int | None, *, nest: bool = False):
        self.what, self.rest, self.path, self.offset, self.nest = what, rest, path, offset, nest
        super().__init__(self.problem(None if offset is None else f"offset {offset}"))

    def problem(self, position: str | None) -> str:
        return f"{self.what} (at {position}){self.rest}" if position else f"{self.what}{self.rest}"

    def field(self, start: int = 0) -> str | None:
        """The field the path leads to, counted from ``path[start]`` (the record): ``"chosen[1].content"``;
        None when that is not a key. A nest too deep is named by the field holding it, not by every index
        down to the limit."""
        path = self.path[start:]
        if self.nest:
            while path and isinstance(path[-1], int):
                path = path[:-1]
            path = path[:8]
        if not path or not isinstance(path[0], str):
            return None
        name = path[0]
        for part in path[1:]:
            name += f"[{part}]" if isinstance(part, int) else f".{part}"
        return name


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        self.key = key


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):  # the only cost on the common path: a call, a dict and two lengths per object
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return value


_DECODER = json.JSONDecoder(object_pairs_hook=_object)


def loads(text: str) -> Any:
    """``text`` parsed as JSON, like :func:`json.loads`.

    Raises:
        json.JSONDecodeError: not valid JSON.
        StrictJSONError: valid JSON nested too deeply, holding an integer with too many digits, or giving a
            key twice in one object.
    """
    try:
        return _DECODER.decode(text)
    except RecursionError:
        raise _too_deep(text) from None
    except _DuplicateKey as duplicate:
        path, offset = _find(text, duplicates=True) or ([], None)
        key = path[-1] if path else duplicate.key
        raise StrictJSONError(f"duplicate key {key!r}", ": the object holds it twice, and JSON readers disagree on "
                              "which value counts", path, offset) from None
    except json.JSONDecodeError:
        raise
    except ValueError as failure:  # "Exceeds the limit (4300 digits) for integer string conversion"
        limit = sys.get_int_max_str_digits()
        found = _find(text, digits=limit) if limit else None
        if found is None:  # not expected: still an error a caller can place, never a bare ValueError
            raise StrictJSONError(f"not readable as JSON ({failure})", "", [], None) from None
        path, offset = found
        digits = len(_TOKEN.match(text, offset).group().lstrip("-"))
        raise StrictJSONError(f"an integer of {digits} digits", f", over Python's limit of {limit} "
                              "(sys.set_int_max_str_digits)", path, offset) from None


def _too_deep(text: str) -> StrictJSONError:
    limit = sys.getrecursionlimit() // 2  # the parser fails between this and the limit (frames already in use)
    found = _find(text, depth=limit)
    if found is None:  # the stack was nearly full already
        return StrictJSONError("nested too deeply for the stack left to Python's json parser", "", [], None)
    return StrictJSONError("nested too deeply", f": over {limit} levels of arrays/objects (Python's json parser "
                           f"stops near {sys.getrecursionlimit()})", *found, nest=True)


def _find(text: str, *, depth: int | None = None, duplicates: bool = False,
          digits: int | None = None) -> tuple[list[str | int], int] | None:
    """The path and offset of the first array/object nested more than ``depth`` levels, the first key given
    twice in one object (``duplicates``), or the first integer of more than ``digits`` digits."""
    # One frame per open container: [index, None, _] for an array; [key, keys seen, expecting a key] for an object.
    stack: list[list] = []
    for match in _TOKEN.finditer(text):
        start = match.start()
        first = text[start]
        if first in "[{":
            stack.append([0, None, False] if first == "[" else [None, set(), True])
            if depth is not None and len(stack) > depth:
                return [frame[0] for frame in stack[:-1]], start
        elif first in "]}":
            if stack:
                stack.pop()
        elif first == ",":
            if stack:
                frame = stack[-1]
                if frame[1] is None:
                    frame[0] += 1
                else:
                    frame[2] = True
        elif first == '"':
            frame = stack[-1] if stack else None
            if frame is not None and frame[1] is not None and frame[2]:
                key = json.loads(match.group())
                if duplicates and key in frame[1]:
                    return [f[0] for f in stack[:-1]] + [key], start
                frame[0], frame[2] = key, False
                frame[1].add(key)
        elif first != ":" and digits is not None:
            token = match.group()
            if not any(mark in token for mark in ".eE") and len(token.lstrip("-")) > digits:
                return [frame[0] for frame in stack], start
    return None
