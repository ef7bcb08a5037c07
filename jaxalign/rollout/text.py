"""Incremental detokenisation: text pieces from tokens that arrive one at a time (for streaming output)."""

from __future__ import annotations


class TextStream:
    """Turns a growing token list into the text each new token adds.

    Byte-level BPE splits a multi-byte character over several tokens; decoding such a prefix ends in
    U+FFFD, so the piece is held back until the character is complete. The whole list is decoded each
    time, so merges that depend on later tokens come out right (quadratic, fine for responses).

    Args:
        tokenizer: a ``transformers`` tokenizer.
        skip_special_tokens: leave out special tokens (the EOS that ends a reply, ChatML markers).
    """

    def __init__(self, tokenizer, *, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.tokens: list[int] = []
        self._shown = 0

    def push(self, token: int) -> str:
        """Add one token; return the new text it completes ("" while a character is incomplete)."""
        self.tokens.append(int(token))
        text = self.text()
        if text.endswith("\ufffd"):
            return ""
        piece, self._shown = text[self._shown:], len(text)
        return piece

    def text(self) -> str:
        """Everything so far."""
        return self.tokenizer.decode(self.tokens, skip_special_tokens=self.skip_special_tokens)
