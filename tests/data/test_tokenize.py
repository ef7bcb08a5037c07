"""Exact token ids and masks with a tiny word-level ChatML tokenizer; truncation policies and their counts."""

import numpy as np
import pytest

from jaxalign.data import (
    BestOfNRecord,
    Message,
    PreferenceGroup,
    PreferenceRecord,
    PromptRecord,
    Rendering,
    ScoredConversation,
    SFTRecord,
    Truncation,
    UnpairedRecord,
    collate,
    tokenize,
)
from tests.data.conftest import EOS_NEWLINE, GENERATION_PROMPT, IM_END, PAD, VOCAB, chatml, ids

SP, NL = VOCAB[" "], VOCAB["\n"]


def user(text):
    return Message("user", text)


def assistant(text):
    return Message("assistant", text)


def sequences(dataset, index=0):
    return [(s.ids.tolist(), s.prompt_length) if s is not None else None for s in dataset.examples[index].sequences]


def test_conversational_sft_ids_masks_and_padding(tiny_tokenizer):
    records = [SFTRecord((user("Hi"),), (assistant("Hello !"),)),
               SFTRecord((user("What color is the sky ?"),), (assistant("blue"),))]
    dataset = tokenize(records, tiny_tokenizer)
    prompt = chatml("user", "Hi") + GENERATION_PROMPT
    completion = ids("Hello", " ", "!") + EOS_NEWLINE  # the template's end of turn is trained
    assert sequences(dataset) == [(prompt + completion, len(prompt))]

    batch = collate(dataset, [0, 1], 24)
    assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
        "input_ids": ((2, 24), "int32"), "attention_mask": ((2, 24), "int32"), "loss_mask": ((2, 24), "int32"),
        "positions": ((2, 24), "int32"), "example_mask": ((2,), "int32")}
    length = len(prompt + completion)
    np.testing.assert_array_equal(batch["input_ids"][0], prompt + completion + [PAD] * (24 - length))
    np.testing.assert_array_equal(batch["loss_mask"][0],
                                  [0] * len(prompt) + [1] * len(completion) + [0] * (24 - length))
    np.testing.assert_array_equal(batch["attention_mask"][0], [1] * length + [0] * (24 - length))
    np.testing.assert_array_equal(batch["positions"][0], list(range(length)) + [0] * (24 - length))
    # "the" is not in the vocabulary: <unk> (0).
    assert batch["input_ids"][1, 9] == 0 and batch["example_mask"].tolist() == [1, 1]


def test_standard_text_gets_eos_and_boundary_merges_are_noted(tiny_tokenizer):
    dataset = tokenize([SFTRecord("The sky is", " blue"), SFTRecord("The sk", "y is")], tiny_tokenizer)
    assert sequences(dataset, 0) == [(ids("The", " ", "sky", " ", "is", " ", "blue") + [IM_END], 5)]
    # "The sk" encodes as The, ␠, <unk>; "The sky is" as The, ␠, sky, ...: the completion starts where they diverge.
    assert sequences(dataset, 1) == [(ids("The", " ", "sky", " ", "is") + [IM_END], 2)]
    assert dataset.report.notes == {"prompt_boundary": 1}
    no_eos = tokenize([SFTRecord("The sky is", " blue")], tiny_tokenizer, rendering=Rendering(add_eos=False))
    assert sequences(no_eos) == [(ids("The", " ", "sky", " ", "is", " ", "blue"), 5)]


def test_language_modelling_trains_every_token_but_the_first(tiny_tokenizer):
    dataset = tokenize([SFTRecord((), (user("Hi"), assistant("yes")))], tiny_tokenizer)
    full = chatml("user", "Hi") + chatml("assistant", "yes")
    assert sequences(dataset) == [(full, 0)]
    batch = collate(dataset, [0], len(full))
    np.testing.assert_array_equal(batch["loss_mask"][0], [0] + [1] * (len(full) - 1))


def test_preference_pairs_are_b_2_t_with_chosen_first_and_margins(tiny_tokenizer):
    records = [PreferenceRecord((user("Hi"),), (assistant("Hello !"),), (assistant("Go away ."),), margin=1.5),
               PreferenceRecord((user("Hi"),), (assistant("yes"),), (assistant("no"),), margin=-0.5)]
    dataset = tokenize(records, tiny_tokenizer)
    assert dataset.kind == "preference" and dataset.layout == (2,) and dataset.value_keys == ("margin",)
    prompt = chatml("user", "Hi") + GENERATION_PROMPT
    assert sequences(dataset) == [(prompt + ids("Hello", " ", "!") + EOS_NEWLINE, 9),
                                  (prompt + ids("Go", " ", "away", " ", ".") + EOS_NEWLINE, 9)]
    batch = collate(dataset, [1, None], 16)
    assert batch["input_ids"].shape == (2, 2, 16)
    np.testing.assert_array_equal(batch["input_ids"][0, 0, :12], prompt + ids("yes") + EOS_NEWLINE)
    np.testing.assert_array_equal(batch["input_ids"][0, 1, :12], prompt + ids("no") + EOS_NEWLINE)
    np.testing.assert_array_equal(batch["loss_mask"][0, 1], [0] * 9 + [1] * 3 + [0] * 4)
    assert batch["margin"].tolist() == [-0.5, 0.0] and batch["example_mask"].tolist() == [1, 0]
    assert batch["attention_mask"][1].sum() == 0  # the padding row


def test_preference_groups_are_b_d_2_t_with_pair_masks(tiny_tokenizer):
    both = PreferenceGroup((PreferenceRecord("Hi", " yes", " no", dimension="helpfulness"),
                            PreferenceRecord("Hi", " no", " yes", dimension="safety")))
    only_safety = PreferenceGroup((PreferenceRecord("Hi", " a", " b", dimension="safety"),))
    dataset = tokenize([both, only_safety], tiny_tokenizer)
    assert dataset.layout == (2, 2) and dataset.dimensions == ("helpfulness", "safety")
    batch = collate(dataset, [0, 1], 4)
    assert batch["input_ids"].shape == (2, 2, 2, 4)
    np.testing.assert_array_equal(batch["input_ids"][0, 1, 0], ids("Hi", " ", "no") + [IM_END])  # safety: chosen
    np.testing.assert_array_equal(batch["input_ids"][0, 1, 1], ids("Hi", " ", "yes") + [IM_END])
    assert batch["pair_mask"].tolist() == [[1, 1], [0, 1]]
    assert batch["attention_mask"][1, 0].sum() == 0  # no helpfulness pair for the second prompt
    np.testing.assert_array_equal(batch["loss_mask"][1, 1, 0], [0, 1, 1, 1])


def test_best_of_n_unpaired_and_scores(tiny_tokenizer):
    records = [BestOfNRecord("The", (" sky", " is", " blue"), best=2), BestOfNRecord("The", (" a", " b"), best=0)]
    best = tokenize(records, tiny_tokenizer)
    batch = collate(best, [0, 1], 4)
    assert batch["input_ids"].shape == (2, 3, 4) and batch["best"].tolist() == [2, 0]
    assert batch["candidate_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    np.testing.assert_array_equal(batch["input_ids"][0, 2], ids("The", " ", "blue") + [IM_END])

    unpaired = tokenize([UnpairedRecord("The", " sky", True), UnpairedRecord("The", " is", False)], tiny_tokenizer)
    assert collate(unpaired, [0, 1], 4)["label"].tolist() == [1, 0]

    scored = tokenize([ScoredConversation((user("Hi"), assistant("yes")), 4.5)], tiny_tokenizer)
    batch = collate(scored, [0], 16)
    assert batch["score"].dtype == np.float32 and batch["score"].tolist() == [4.5]
    np.testing.assert_array_equal(batch["input_ids"][0, :12], chatml("user", "Hi") + GENERATION_PROMPT + ids("yes")
                                  + EOS_NEWLINE)


def test_prompts_are_left_padded_for_generation(tiny_tokenizer):
    dataset = tokenize([PromptRecord((user("Hi"),)), PromptRecord("The sky is")], tiny_tokenizer)
    batch = collate(dataset, [0, 1], 10)
    assert "loss_mask" not in batch
    prompt = chatml("user", "Hi") + GENERATION_PROMPT
    np.testing.assert_array_equal(batch["input_ids"][0], [PAD] + prompt)
    np.testing.assert_array_equal(batch["input_ids"][1], [PAD] * 5 + ids("The", " ", "sky", " ", "is"))
    np.testing.assert_array_equal(batch["attention_mask"][1], [0] * 5 + [1] * 5)
    np.testing.assert_array_equal(batch["positions"][1], [0] * 5 + [0, 1, 2, 3, 4])


def test_role_markers_render_hh_style_text(tiny_tokenizer):
    record = PreferenceRecord((user("Hi"),), (assistant("yes"),), (assistant("no"),))
    dataset = tokenize([record], tiny_tokenizer, rendering=Rendering(conversation_style="role_markers"))
    prompt = ids("\n", "\n", "Human", ":", " ", "Hi", "\n", "\n", "Assistant", ":")
    assert sequences(dataset) == [(prompt + ids(" ", "yes") + [IM_END], len(prompt)),
                                  (prompt + ids(" ", "no") + [IM_END], len(prompt))]


# A prompt of 6 tokens and completions of 4 and 2 (+ EOS): "a b c" + " d e" / " f".
PAIR = PreferenceRecord("a b c", " d e", " f")
PROMPT, CHOSEN, REJECTED = ids("a", " ", "b", " ", "c"), ids(" ", "d", " ", "e") + [IM_END], ids(" ", "f") + [IM_END]


@pytest.mark.parametrize("truncation, chosen, rejected, counts", [
    (Truncation(max_length=10), (PROMPT + CHOSEN, 5), (PROMPT + REJECTED, 5), {}),
    (Truncation(max_length=8), (PROMPT + CHOSEN[:3], 5), (PROMPT + REJECTED, 5), {"completion": 1, "tokens": 2}),
    # keep_end: the shared prompt loses the longer side's excess (3), so both sides keep the same prompt ...
    (Truncation(max_length=7, mode="keep_end"), (PROMPT[3:] + CHOSEN, 2), (PROMPT[3:] + REJECTED, 2),
     {"prompt": 2, "tokens": 6}),
    # ... and only once it is gone does a completion that is still too long lose its start.
    (Truncation(max_length=4, mode="keep_end"), (CHOSEN[1:], 0), (REJECTED, 0),
     {"prompt": 2, "completion_start": 1, "tokens": 11}),
    (Truncation(max_length=7, max_prompt_length=3, mode="prompt_first"), (PROMPT[2:] + CHOSEN[:4], 3),
     (PROMPT[2:] + REJECTED, 3), {"prompt": 2, "completion": 1, "tokens": 5}),
])
def test_truncation_policies_and_their_counts(tiny_tokenizer, truncation, chosen, rejected, counts):
    dataset = tokenize([PAIR], tiny_tokenizer, truncation=truncation)
    assert sequences(dataset) == [chosen, rejected]
    assert dict(dataset.report.truncated) == counts


def test_keep_end_gives_every_sequence_of_a_record_the_same_prompt(tiny_tokenizer):
    # The prompt "a b c" is 5 tokens; with the EOS " d" is 2 + 1, " e f" 4 + 1, " a b c d e" 10 + 1.
    short, middle, long = ids(" ", "d") + [IM_END], ids(" ", "e", " ", "f") + [IM_END], ids(
        " ", "a", " ", "b", " ", "c", " ", "d", " ", "e") + [IM_END]
    keep_end = Truncation(max_length=12, mode="keep_end")  # the longest sequence is 16 tokens: 4 over
    best_of_n = tokenize([BestOfNRecord("a b c", (" d", " e f", " a b c d e"), best=0)], tiny_tokenizer,
                         truncation=keep_end)
    assert sequences(best_of_n) == [(ids("c") + short, 1), (ids("c") + middle, 1), (ids("c") + long, 1)]
    assert dict(best_of_n.report.truncated) == {"prompt": 3, "tokens": 12}
    group = PreferenceGroup((PreferenceRecord("a b c", " d", " a b c d e", dimension="helpfulness"),
                             PreferenceRecord("a b c", " a b c d e", " d", dimension="safety")))
    pairs = tokenize([group], tiny_tokenizer, truncation=keep_end)
    assert sequences(pairs) == [(ids("c") + short, 1), (ids("c") + long, 1), (ids("c") + long, 1),
                                (ids("c") + short, 1)]


def test_prompt_first_keeps_long_prompts_that_fit_and_caps_prompt_only_records(tiny_tokenizer):
    # The cap only applies when the sequence does not fit (TRL 0.x DPO semantics).
    capped = Truncation(max_length=16, max_prompt_length=3, mode="prompt_first")
    fits = tokenize([PAIR], tiny_tokenizer, truncation=capped)
    assert sequences(fits)[0] == (PROMPT + CHOSEN, 5)
    prompts = tokenize([PromptRecord("a b c")], tiny_tokenizer,
                       truncation=Truncation(max_length=8, max_prompt_length=3, mode="prompt_first"))
    assert sequences(prompts) == [(ids("b", " ", "c"), 3)] and prompts.report.truncated["prompt"] == 1


def test_truncation_validates_itself():
    with pytest.raises(ValueError, match="'prompt_first' needs both"):
        Truncation(max_length=8, mode="prompt_first")
    with pytest.raises(ValueError, match="must be smaller than max_length"):
        Truncation(max_length=8, max_prompt_length=8)
    with pytest.raises(ValueError, match="mode must be one of"):
        Truncation(mode="middle")
