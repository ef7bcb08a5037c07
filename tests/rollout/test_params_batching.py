"""Sampling parameters, prompt padding and buckets, and streaming detokenisation (host-side code)."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from jaxalign.rollout import SamplingParams, TextStream, bucket, check_left_padded, left_pad


@pytest.mark.parametrize(("field", "value", "message"), [
    ("max_new_tokens", 0, "max_new_tokens must be a positive int"),
    ("n", 1.5, "n must be a positive int"),
    ("temperature", -0.1, "temperature must be finite and >= 0"),
    ("temperature", float("nan"), "temperature must be finite and >= 0"),
    ("top_k", -1, r"top_k must be an int >= 0 \(0 = off\)"),
    ("top_p", 0.0, r"top_p must be in \(0, 1\]"),
    ("top_p", 1.5, r"top_p must be in \(0, 1\]"),
    ("min_p", 1.5, r"min_p must be in \[0, 1\]"),
    ("stop_token_ids", [2], "stop_token_ids must be a tuple of token ids"),
    ("stop_token_ids", (-1,), "stop_token_ids must be a tuple of token ids"),
])
def test_invalid_sampling_params_are_named(field, value, message):
    with pytest.raises(ValueError, match=f"SamplingParams.{message}"):
        SamplingParams(**{field: value})


def test_stop_mask_defaults_to_the_model_eos():
    assert np.flatnonzero(SamplingParams().stop_mask(5, (2, 4))).tolist() == [2, 4]
    assert np.flatnonzero(SamplingParams(stop_token_ids=(1,)).stop_mask(5, (2,))).tolist() == [1]
    assert not SamplingParams(stop_token_ids=()).stop_mask(5, (2,)).any()


def test_left_pad():
    tokens, mask = left_pad([[5, 6, 7], [8], []], pad_token_id=0)
    np.testing.assert_array_equal(tokens, [[5, 6, 7], [0, 0, 8], [0, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1], [0, 0, 0]])
    check_left_padded(mask)
    with pytest.raises(ValueError, match="no prompts"):
        left_pad([], pad_token_id=0)


def test_holes_in_the_mask_are_not_left_padding():
    with pytest.raises(ValueError, match="prompt row 0 is not left-padded"):
        check_left_padded(np.array([[1, 0, 1]]))


def test_buckets():
    assert [bucket(n, None, minimum=16) for n in (1, 16, 17, 100)] == [16, 16, 32, 128]
    half_octaves = [bucket(n, None, minimum=16, half_octaves=True) for n in (1, 16, 17, 24, 25, 33, 45, 49, 100)]
    assert half_octaves == [16, 16, 24, 24, 32, 48, 48, 64, 128]
    assert [bucket(n, None) for n in (1, 3, 4, 5)] == [1, 4, 4, 8]
    assert bucket(3, None, multiple=8) == 8 and bucket(9, None, multiple=8) == 16
    assert bucket(5, (4, 8, 32)) == 8
    with pytest.raises(ValueError, match="batch size 40 exceeds the largest bucket 32"):
        bucket(40, (4, 8, 32), what="batch size")


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """One token per UTF-8 byte (no merges), so a character like "é" spans two tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def test_text_stream_holds_back_incomplete_characters():
    tokenizer = byte_level_tokenizer()
    ids = tokenizer("aé!")["input_ids"]
    assert len(ids) == 4
    stream = TextStream(tokenizer)
    pieces = [stream.push(token) for token in ids]
    assert pieces == ["a", "", "é", "!"]
    assert stream.text() == "aé!"
