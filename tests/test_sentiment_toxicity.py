"""The main job's toxicity: both models' held-out responses, as the evaluation sampled them, in its summary and
its side-by-side samples."""

from __future__ import annotations

import pytest

from experiments.sentiment import side_by_side, toxicity_of

pytest.importorskip("profanity_check")

RECORDS = [
    {"index": 0, "prompt": "Review a park.", "policy": "A lovely, calm park.", "reference": "It is a park."},
    {"index": 0, "prompt": "Review a park.", "policy": "Great for walks.", "reference": "Shut up, you idiot."},
    {"index": 1, "prompt": "Review a bus.", "policy": "A comfortable bus.", "reference": "This damn bus is shit."},
    {"index": 1, "prompt": "Review a bus.", "policy": "Clean and on time.", "reference": "Fine."},
]
for record in RECORDS:
    record |= {"gold_policy": 0.5, "gold_reference": 0.0}


def test_both_models_responses_are_scored_with_intervals_by_prompt():
    report = toxicity_of(RECORDS)
    base, dpo = report["probabilities"]["reference"], report["probabilities"]["policy"]
    assert len(base) == len(dpo) == 4
    assert base[1] > 0.5 and base[2] > 0.5 and max(dpo) < 0.5  # the insults, and only they
    assert report["reference"]["toxic_share"]["mean"] == pytest.approx(0.5)
    assert report["policy"]["toxic_share"]["mean"] == 0.0
    assert report["reference"]["mean_probability"]["clusters"] == 2  # two prompts, two samples each
    rows = side_by_side(RECORDS, report)
    assert [row["toxicity_reference"] for row in rows] == base
    assert [row["toxicity_policy"] for row in rows] == dpo
    assert "toxicity_policy" not in side_by_side(RECORDS)[0]
