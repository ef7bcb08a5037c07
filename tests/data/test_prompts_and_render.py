"""Implicit prompts (against TRL's extract_prompt), HH transcripts, the text rendering styles, score conditioning."""

import pytest

from jaxalign.data import (
    Message,
    PreferenceGroup,
    PreferenceRecord,
    PromptRecord,
    ScoredConversation,
    SFTRecord,
    conversation_to_sft,
    flatten_groups,
    record_as_text,
    render_text,
    text_as_chat,
)
from jaxalign.data.errors import DataError, Location
from jaxalign.data.fields import Fields
from jaxalign.data.prompts import parse_hh_transcript, split_implicit_prompt

HERE = Location("test", 1)
HUMAN, BOT = Message("user", "Hi there"), Message("assistant", "Hello!")


def split(chosen, rejected):
    return split_implicit_prompt(Fields({"chosen": chosen, "rejected": rejected}, HERE))


@pytest.mark.parametrize("chosen, rejected", [
    ("Q: sky? A: blue", "Q: sky? A: green"),
    ("The cat sat", "The cat ran"),
    ("\n\nHuman: hi\n\nAssistant: yes", "\n\nHuman: hi\n\nAssistant: no"),
])
def test_text_prompt_matches_trl_when_responses_differ_from_their_first_word(chosen, rejected):
    import trl
    expected = trl.extract_prompt({"chosen": chosen, "rejected": rejected})
    assert split(chosen, rejected) == (expected["prompt"], expected["chosen"], expected["rejected"])


def test_text_prompt_never_splits_a_word():
    # TRL would give the prompt "Q: A: blue" and the response "s"; the shared word start stays in the responses.
    assert split("Q: A: blue sky", "Q: A: blues") == ("Q: A:", " blue sky", " blues")
    assert split("Q:\n\nA", "Q:\n\nB") == ("Q:", "\n\nA", "\n\nB")
    with pytest.raises(DataError, match="share no prompt"):
        split("abc", "abd")


def test_conversational_prompt_is_a_message_prefix_and_matches_trl():
    import trl
    chosen = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes"},
              {"role": "user", "content": "More?"}, {"role": "assistant", "content": "Sure"}]
    rejected = chosen[:3] + [{"role": "assistant", "content": "No"}]
    prompt, good, bad = split(chosen, rejected)
    expected = trl.extract_prompt({"chosen": chosen, "rejected": rejected})
    assert [m.as_dict() for m in prompt] == expected["prompt"]
    assert ([m.as_dict() for m in good], [m.as_dict() for m in bad]) == (expected["chosen"], expected["rejected"])
    user_turn = chosen[:1] + [{"role": "user", "content": "again"}]
    with pytest.raises(DataError, match="field 'chosen': after the shared prompt the response starts with a 'user'"):
        split(user_turn, chosen[:1] + [{"role": "user", "content": "other"}])


def test_hh_transcript_parsing_and_role_markers_round_trip():
    text = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Sky?\n\nAssistant: Blue."
    messages = parse_hh_transcript(Fields({"chosen": text}, HERE), "chosen")
    assert messages == (HUMAN, BOT, Message("user", "Sky?"), Message("assistant", "Blue."))
    assert render_text(messages, "role_markers") == text
    with pytest.raises(DataError, match="must start with a Human turn"):
        parse_hh_transcript(Fields({"chosen": "\n\nAssistant: x\n\nHuman: y\n\nAssistant: z"}, HERE), "chosen")
    with pytest.raises(DataError, match="text before the first"):
        parse_hh_transcript(Fields({"chosen": "hello\n\nHuman: y\n\nAssistant: z"}, HERE), "chosen")


def test_text_styles_split_prompt_and_response():
    record = PreferenceRecord((HUMAN,), (BOT,), (Message("assistant", "Go away."),))
    assert record_as_text(record, "role_markers") == PreferenceRecord(
        "\n\nHuman: Hi there\n\nAssistant:", " Hello!", " Go away.")
    conversation = SFTRecord((Message("system", "Be brief."), HUMAN, BOT, Message("user", "Sky?")),
                             (Message("assistant", "Blue."),))
    assert record_as_text(conversation, "turn_markers") == SFTRecord(
        "[System] Be brief.\n[Turn 1] Human: Hi there\n[Turn 1] Assistant: Hello!\n[Turn 2] Human: Sky?\n"
        "[Turn 2] Assistant:", " Blue.")
    assert record_as_text(PromptRecord((HUMAN,)), "turn_markers") == PromptRecord(
        "[Turn 1] Human: Hi there\n[Turn 1] Assistant:")
    # Language modelling (no prompt): the whole rendering is the completion.
    assert record_as_text(SFTRecord((), (HUMAN, BOT)), "role_markers") == SFTRecord(
        "", "\n\nHuman: Hi there\n\nAssistant: Hello!")


def test_scored_conversation_to_sft_with_and_without_score_conditioning():
    conversation = ScoredConversation((HUMAN, BOT), 4.5, "good")
    assert conversation_to_sft(conversation) == SFTRecord((HUMAN,), (BOT,), score=4.5)
    conditioned = conversation_to_sft(conversation, score_template="Score: {score:g}")
    assert conditioned == SFTRecord((Message("system", "Score: 4.5"), HUMAN), (BOT,), score=4.5)
    with_system = ScoredConversation((Message("system", "Be kind."), HUMAN, BOT), 2.0)
    assert conversation_to_sft(with_system, score_template="Score: {score:g}").prompt[0] == Message(
        "system", "Score: 2\nBe kind.")


def test_text_as_chat_and_group_flattening():
    assert text_as_chat(PreferenceRecord("Sky?", "Blue.", "Red.")) == PreferenceRecord(
        (Message("user", "Sky?"),), (Message("assistant", "Blue."),), (Message("assistant", "Red."),))
    assert text_as_chat(SFTRecord("", "Just text")) == SFTRecord((), (Message("assistant", "Just text"),))
    conversational = SFTRecord((HUMAN,), (BOT,))
    assert text_as_chat(conversational) == conversational
    group = PreferenceGroup((PreferenceRecord("p", "a", "b", dimension="helpfulness"),
                             PreferenceRecord("p", "b", "a", dimension="safety")))
    assert flatten_groups([group], "safety") == [group.pairs[1]]
    assert len(flatten_groups([group, group])) == 4


def test_record_validation():
    with pytest.raises(ValueError, match="mix plain strings and message lists"):
        SFTRecord("a prompt", [{"role": "assistant", "content": "x"}])
    with pytest.raises(ValueError, match="every pair needs its own dimension"):
        PreferenceGroup((PreferenceRecord("p", "a", "b", dimension="x"),) * 2)
    with pytest.raises(ValueError, match="the last message must be the assistant's"):
        ScoredConversation((HUMAN,), 1.0)
    assert SFTRecord("", [{"role": "assistant", "content": "x"}]).prompt == ()  # empty prompt takes the kind
