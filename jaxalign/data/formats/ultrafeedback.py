"""UltraFeedback: binarized pairs (HuggingFaceH4) and the raw per-aspect ratings (openbmb).

- ``ultrafeedback_binarized``: ``prompt``, ``chosen``/``rejected`` (full conversations),
  ``score_chosen``/``score_rejected`` -> PreferenceRecord with ``margin = score_chosen - score_rejected``.
  ``messages`` (HuggingFaceH4's copy of the chosen conversation) is allowed and not read.
- ``ultrafeedback``: ``instruction`` and ``completions[i]`` with ``response`` and
  ``annotations.<aspect>.Rating`` (1-5, a number or a numeric string; ``"N/A"`` = unrated) for the
  aspects helpfulness, honesty, instruction_following and truthfulness -> PreferenceGroup with one pair
  per aspect: the highest-rated completion against the lowest-rated (the first in file order on ties),
  ``margin`` their rating gap. An aspect whose ratings all tie has no pair; a prompt whose aspects all
  tie is an error (nothing to learn).
"""

from __future__ import annotations

import contextlib
import math

from jaxalign.data.errors import Reason
from jaxalign.data.fields import Fields, shown
from jaxalign.data.formats.base import Format, ReadOptions, build
from jaxalign.data.formats.trl import preference_parts
from jaxalign.data.records import PreferenceGroup, PreferenceRecord

ASPECTS = ("helpfulness", "honesty", "instruction_following", "truthfulness")
UNRATED = "N/A"


def parse_binarized(fields: Fields, options: ReadOptions) -> PreferenceRecord:
    prompt, chosen, rejected = preference_parts(fields)
    margin = fields.number("score_chosen") - fields.number("score_rejected")
    return build(fields, PreferenceRecord, prompt=prompt, chosen=chosen, rejected=rejected, margin=margin)


def _rating(annotations: Fields, aspect: str) -> float | None:
    """The aspect's rating, or None when the completion was not rated on it."""
    if not annotations.has(aspect):
        return None
    annotation = annotations.nested(aspect)
    value = annotation.raw("Rating")
    if value == UNRATED:
        return None
    rating = None
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        with contextlib.suppress(ValueError, OverflowError):  # OverflowError: an integer beyond 1.8e308
            rating = float(value)
    if rating is None or not math.isfinite(rating):
        raise annotation.error("Rating", f"expected a number or {UNRATED!r}, got {shown(value)}", Reason.WRONG_TYPE)
    return rating


def parse_ultrafeedback(fields: Fields, options: ReadOptions) -> PreferenceGroup:
    instruction = fields.text("instruction")
    completions = fields.items("completions")
    responses, ratings = [], []
    for index in range(len(completions.data)):
        completion = completions.nested(index)
        responses.append(completion.text("response"))
        annotations = completion.nested("annotations")
        ratings.append({aspect: _rating(annotations, aspect) for aspect in ASPECTS})
    pairs = []
    for aspect in ASPECTS:
        rated = [(rating[aspect], i) for i, rating in enumerate(ratings) if rating[aspect] is not None]
        if len(rated) < 2:
            continue
        best = min(rated, key=lambda item: (-item[0], item[1]))
        worst = min(rated, key=lambda item: (item[0], item[1]))
        if best[0] > worst[0]:
            pairs.append(build(fields, PreferenceRecord, prompt=instruction, chosen=responses[best[1]],
                               rejected=responses[worst[1]], margin=best[0] - worst[0], dimension=aspect))
    if not pairs:
        raise fields.error("completions", "no aspect separates the completions (every aspect's ratings tie "
                           "or fewer than two completions are rated)")
    return build(fields, PreferenceGroup, pairs=tuple(pairs))


ULTRAFEEDBACK_BINARIZED = Format(
    "ultrafeedback_binarized", PreferenceRecord, parse_binarized,
    lambda row: {"chosen", "rejected", "score_chosen", "score_rejected"} <= row.keys(),
    "UltraFeedback binarized pairs, margin = score gap",
    fields={"prompt", "chosen", "rejected", "score_chosen", "score_rejected"},
    tolerated={"messages"})  # HuggingFaceH4's release repeats the chosen conversation as `messages`
ULTRAFEEDBACK = Format("ultrafeedback", PreferenceGroup, parse_ultrafeedback,
                       lambda row: {"instruction", "completions"} <= row.keys(),
                       "UltraFeedback per-aspect ratings, one pair per aspect", fields={"instruction", "completions"})
