"""Tiny random models (2-layer Llama, V = 97) and the word-level ChatML tokenizer of tests/test_cli.py, shared by
the evaluation tests; a text judge that tells any two different responses apart."""

from __future__ import annotations

import zlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign.models import LlamaForCausalLM, RewardModel
from tests.models.conftest import TINY
from tests.test_cli import tiny_tokenizer

PROMPTS = ["Hi", "sky ?", "Go away ."]


def tiny_lm(seed: int) -> LlamaForCausalLM:
    return LlamaForCausalLM(TINY, rngs=nnx.Rngs(seed))


def tiny_reward_model(seed: int, num_objectives: int | None = None) -> RewardModel:
    model = RewardModel(tiny_lm(seed), num_objectives=num_objectives, rngs=nnx.Rngs(seed + 100))
    # A larger head than the N(0, 1/(D+1)) init, so rewards of different sequences are far apart and their
    # order is not decided by float32 rounding.
    model.reward_head.kernel[...] = 10.0 * model.reward_head.kernel[...]
    return model


class TextJudge:
    """A deterministic score of the response text (CRC32): equal texts tie, different texts almost never do."""

    name = "crc"

    def score(self, prompts, responses):
        assert len(prompts) == len(responses)
        return np.asarray([zlib.crc32(text.encode()) / 2**32 for text in responses])


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


# The oracles run the model's plain __call__ (jitted) on one padded shape, so every test shares a program.
ORACLE_ROWS, ORACLE_LENGTH = 16, 32
_forward = nnx.jit(lambda model, tokens, mask: model(tokens, attention_mask=mask))


def _plain_forward(model, sequences) -> list[np.ndarray]:
    """The model's outputs for each token list, right-padded (causal: padding after a sequence changes
    nothing before it) into ``[ORACLE_ROWS, ORACLE_LENGTH]`` batches."""
    assert max(len(ids) for ids in sequences) <= ORACLE_LENGTH
    outputs = []
    for start in range(0, len(sequences), ORACLE_ROWS):
        tokens = np.zeros((ORACLE_ROWS, ORACLE_LENGTH), np.int32)
        mask = np.zeros((ORACLE_ROWS, ORACLE_LENGTH), np.int32)
        for row, ids in enumerate(sequences[start:start + ORACLE_ROWS]):
            tokens[row, :len(ids)], mask[row, :len(ids)] = ids, 1
        out = _forward(model, jnp.asarray(tokens), jnp.asarray(mask))
        outputs += list(np.asarray(out[0] if isinstance(out, tuple) else out))
    return outputs[:len(sequences)]


def lm_logits(model, sequences) -> list[np.ndarray]:
    """Logits ``[T_i, V]`` of each token list from the causal LM's plain forward pass."""
    return [logits[:len(ids)] for ids, logits in zip(sequences, _plain_forward(model, sequences))]


def plain_rewards(model, sequences) -> np.ndarray:
    """Rewards ``[S]`` (or ``[S, D]``) of token lists, read at each one's last token, from the reward model's
    plain forward pass."""
    return np.stack(_plain_forward(model, sequences))


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def policy():
    return tiny_lm(0)


@pytest.fixture(scope="session")
def twin():
    """The policy's weights in another object (sampled and scored separately)."""
    return tiny_lm(0)


@pytest.fixture(scope="session")
def other():
    return tiny_lm(1)


@pytest.fixture(scope="session")
def reward_model():
    return tiny_reward_model(2)


@pytest.fixture(scope="session")
def multi_reward_model():
    """Two objectives (D = 2)."""
    return tiny_reward_model(5, num_objectives=2)
