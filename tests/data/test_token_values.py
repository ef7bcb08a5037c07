"""Per-token values (``TokenizedDataset.with_token_values``): validation naming the example and sequence, their
place in a collated batch (right padding for training kinds, left for prompts, 0 on padding and padding rows),
the typed batch that carries them, and the fingerprint that sees every value."""

from __future__ import annotations

import numpy as np
import pytest

from jaxalign.data import BatchIterator, PairBatch, PreferenceRecord, PromptRecord, tokenize
from jaxalign.data.collate import collate
from tests.data.conftest import GENERATION_PROMPT, chatml


def pair(prompt: str, chosen: str, rejected: str) -> PreferenceRecord:
    return PreferenceRecord(prompt=[{"role": "user", "content": prompt}],
                            chosen=[{"role": "assistant", "content": chosen}],
                            rejected=[{"role": "assistant", "content": rejected}])


@pytest.fixture
def pairs(tiny_tokenizer):
    # Different lengths in every slot: a value put at the wrong offset or in the wrong slot shows.
    return tokenize([pair("Hi", "The sky is blue .", "no"), pair("What color ?", "green", "a b c d e f")],
                    tiny_tokenizer)


def ramp(dataset, scale: float = 1.0):
    """Distinct values for every token of every sequence: example i, slot s, token j -> scale*(100i + 10s + j + 1)."""
    return [tuple(scale * (100 * i + 10 * s + np.arange(len(seq), dtype=np.float32) + 1)
                  for s, seq in enumerate(example.sequences)) for i, example in enumerate(dataset.examples)]


def test_the_tokenised_pairs_are_what_the_tests_assume(pairs):
    first = pairs.examples[0].sequences[0]
    assert list(first.ids[:first.prompt_length]) == chatml("user", "Hi") + GENERATION_PROMPT
    assert len({len(s) for e in pairs.examples for s in e.sequences}) == 4


def test_collate_puts_each_value_under_its_token_and_zero_on_padding(pairs):
    dataset = pairs.with_token_values("token_rewards", ramp(pairs))
    assert dataset.value_keys[-1] == "token_rewards" and "token_rewards" not in pairs.value_keys
    length = int(dataset.lengths.max()) + 3
    batch = collate(dataset, [1, None, 0], length)
    values = batch["token_rewards"]
    assert values.shape == batch["input_ids"].shape == (3, 2, length) and values.dtype == np.float32
    for row, index in ((0, 1), (2, 0)):
        for slot, sequence in enumerate(dataset.examples[index].sequences):
            n = len(sequence)
            np.testing.assert_array_equal(values[row, slot, :n], 100 * index + 10 * slot + np.arange(n) + 1)
            np.testing.assert_array_equal(values[row, slot, n:], 0.0)
            np.testing.assert_array_equal(batch["input_ids"][row, slot, :n], sequence.ids)  # the same columns
    np.testing.assert_array_equal(values[1], 0.0)  # the padding row of a partial batch
    # Through the loader: a checked PairBatch carries them [B, 2, T], aligned with input_ids.
    loaded = next(iter(BatchIterator(dataset, batch_size=2, shuffle=False, drop_last=False)))
    assert isinstance(loaded, PairBatch) and loaded.token_rewards.shape == loaded.input_ids.shape
    np.testing.assert_array_equal(loaded.token_rewards, collate(dataset, [0, 1], loaded.input_ids.shape[-1])
                                  ["token_rewards"])


def test_left_padded_prompts_put_the_values_at_the_end(tiny_tokenizer):
    prompts = tokenize([PromptRecord(prompt=[{"role": "user", "content": "Hi"}]),
                        PromptRecord(prompt=[{"role": "user", "content": "What color is the sky ?"}])],
                       tiny_tokenizer)
    dataset = prompts.with_token_values("token_rewards", ramp(prompts))
    length = int(dataset.lengths.max()) + 2
    batch = collate(dataset, [0, 1], length)
    for row, example in enumerate(dataset.examples):
        n = len(example.sequences[0])
        np.testing.assert_array_equal(batch["token_rewards"][row, length - n:], 100 * row + np.arange(n) + 1)
        np.testing.assert_array_equal(batch["token_rewards"][row, :length - n], 0.0)
        np.testing.assert_array_equal(batch["input_ids"][row, length - n:], example.sequences[0].ids)


def test_fingerprint_sees_every_token_value(pairs):
    values = ramp(pairs)
    base = pairs.with_token_values("token_rewards", values).fingerprint
    assert base != pairs.fingerprint
    assert pairs.with_token_values("token_rewards", ramp(pairs)).fingerprint == base  # a function of the values
    last = len(pairs.examples[1].sequences[1]) - 1
    changed = [tuple(np.array(a) for a in example) for example in values]
    changed[1][1][last] += 1e-3  # one value of the last token of the last sequence
    assert pairs.with_token_values("token_rewards", changed).fingerprint != base


def size(dataset, example: int, slot: int) -> int:
    return len(dataset.examples[example].sequences[slot])


@pytest.mark.parametrize("edit, message", [
    (lambda v: v[:1], lambda d: r"with_token_values\('token_rewards'\): 1 values for 2 examples"),
    (lambda v: [v[0], v[1][:1]], lambda d: r"example 1 has 2 sequences, got values for 1"),
    (lambda v: [v[0], (v[1][0], v[1][1][:-1])],
     lambda d: rf"example 1, sequence 1: \({size(d, 1, 1) - 1},\) values for {size(d, 1, 1)} tokens"),
    (lambda v: [(v[0][0], None), v[1]], lambda d: rf"example 0, sequence 1: None values for {size(d, 0, 1)} tokens"),
    (lambda v: [(v[0][0][:, None], v[0][1]), v[1]],
     lambda d: rf"example 0, sequence 0: \({size(d, 0, 0)}, 1\) values for {size(d, 0, 0)} tokens"),
])
def test_values_that_do_not_fit_name_the_example_and_sequence(pairs, edit, message):
    with pytest.raises(ValueError, match=message(pairs)):
        pairs.with_token_values("token_rewards", edit(ramp(pairs)))


def test_unknown_or_repeated_keys_are_refused(pairs):
    with pytest.raises(ValueError, match=r"per-token keys are \('token_rewards', 'prior_logps'\)"):
        pairs.with_token_values("rewards", ramp(pairs))
    carried = pairs.with_token_values("token_rewards", ramp(pairs))
    with pytest.raises(ValueError, match="already carries 'token_rewards'"):
        carried.with_token_values("token_rewards", ramp(pairs))
