"""OpenAI lm-human-preferences labels: ``query``, ``sample0`` .. ``sample{N-1}``, ``best`` -> BestOfNRecord.

The published label files store GPT-2 token ids (lists of ints, padded with id 50259); a list field is
decoded with ``ReadOptions.source_tokenizer`` after dropping the pad id, and the text is re-tokenised
later with the training tokenizer. Text fields are taken as they are. Records are standard (strings): the
original task continues the query (book text, a news article), without a chat template.
"""

from __future__ import annotations

import re

from jaxalign.data.errors import Reason
from jaxalign.data.fields import Fields, shown
from jaxalign.data.formats.base import Format, ReadOptions, build
from jaxalign.data.records import BestOfNRecord

SAMPLE = r"sample(0|[1-9][0-9]*)"


def _text(fields: Fields, key: str, options: ReadOptions, *, nonempty: bool) -> str:
    value = fields.raw(key)
    if not isinstance(value, list):
        return fields.text(key, nonempty=nonempty)
    if options.source_tokenizer is None:
        raise fields.error(key, "holds token ids; pass source_tokenizer= (the tokenizer that made the file, "
                           "GPT-2's for OpenAI's) to decode them", Reason.WRONG_TYPE)
    vocabulary = len(options.source_tokenizer)
    ids = [token for token in value if token != options.openai_pad_token_id]
    bad = next((token for token in ids if not isinstance(token, int) or isinstance(token, bool)
                or not 0 <= token < vocabulary), None)
    if bad is not None:
        raise fields.error(key, f"{shown(bad)} is not a token id of the source tokenizer (vocabulary {vocabulary})")
    text = options.source_tokenizer.decode(ids)
    if nonempty and not text.strip():
        raise fields.error(key, "is empty", Reason.EMPTY_RESPONSE)
    return text


def parse_openai(fields: Fields, options: ReadOptions) -> BestOfNRecord:
    query = _text(fields, "query", options, nonempty=False)
    count = 0
    while f"sample{count}" in fields.data:
        count += 1
    beyond = sorted((key for key in fields.data if re.fullmatch(SAMPLE, key) and int(key[6:]) > count),
                    key=lambda key: int(key[6:]))
    if beyond:  # a gap in the numbering would silently drop the samples after it
        raise fields.error(beyond[0], f"is given but 'sample{count}' is missing (samples are numbered from 0 "
                           "without gaps)", Reason.MISSING_FIELD)
    samples = tuple(_text(fields, f"sample{i}", options, nonempty=True) for i in range(count))
    return build(fields, BestOfNRecord, prompt=query, samples=samples, best=fields.integer("best", range(count)))


OPENAI_PREFERENCES = Format("openai_preferences", BestOfNRecord, parse_openai,
                            lambda row: {"query", "sample0", "sample1", "best"} <= row.keys(),
                            "OpenAI lm-human-preferences best-of-N labels", fields={"query", "best"},
                            field_pattern=SAMPLE)
