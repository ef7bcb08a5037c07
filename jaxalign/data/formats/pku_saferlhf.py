"""PKU-SafeRLHF: two responses, which is more helpful and which is safer -> PreferenceGroup.

Fields: ``prompt``, ``response_0``, ``response_1``, ``better_response_id`` (0/1, helpfulness) and
``safer_response_id`` (0/1, safety; optional, for the single-dimension variants). The group holds one
pair per dimension, ``helpfulness`` then ``safety``, each with its preferred response as ``chosen``.
"""

from __future__ import annotations

from jaxalign.data.fields import Fields
from jaxalign.data.formats.base import Format, ReadOptions, build
from jaxalign.data.records import PreferenceGroup, PreferenceRecord, identical_responses

DIMENSIONS = {"helpfulness": "better_response_id", "safety": "safer_response_id"}


def parse_pku_saferlhf(fields: Fields, options: ReadOptions) -> PreferenceGroup:
    prompt = fields.text("prompt")
    responses = (fields.text("response_0"), fields.text("response_1"))
    if responses[0] == responses[1]:  # named by its own field, before the pairs' shared check
        raise identical_responses(fields.where, fields.name("response_1"), "response_0")
    pairs = []
    for dimension, key in DIMENSIONS.items():
        if key == "better_response_id" or fields.has(key):
            preferred = fields.integer(key, range(2))
            pairs.append(build(fields, PreferenceRecord, prompt=prompt, chosen=responses[preferred],
                               rejected=responses[1 - preferred], dimension=dimension))
    return build(fields, PreferenceGroup, pairs=tuple(pairs))


PKU_SAFERLHF = Format("pku_saferlhf", PreferenceGroup, parse_pku_saferlhf,
                      lambda row: {"response_0", "response_1", "better_response_id"} <= row.keys(),
                      "PKU-SafeRLHF helpfulness + safety pairs",
                      fields={"prompt", "response_0", "response_1", *DIMENSIONS.values()})
