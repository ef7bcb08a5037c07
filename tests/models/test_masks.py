"""Derived positions, attention masks, and packed sequences equal to separate ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.models import derive_positions, load_hf
from jaxalign.models.masks import attention_mask
from tests.models.conftest import V, left_padded, right_padded


def test_positions_from_left_and_right_padding():
    mask = np.concatenate([left_padded([3, 5], 5), right_padded([2, 5], 5)])
    np.testing.assert_array_equal(
        derive_positions(jnp.asarray(mask)),
        [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 1, 1, 1, 1], [0, 1, 2, 3, 4]],
    )


def test_positions_restart_per_segment_and_continue_from_offset():
    segments = jnp.asarray([[1, 1, 2, 2, 2, 3, 0, 0]])
    mask = jnp.asarray([[1, 1, 1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(derive_positions(mask, segments), [[0, 1, 0, 1, 2, 0, 0, 0]])
    np.testing.assert_array_equal(
        derive_positions(jnp.asarray([[0, 1, 1]]), offset=jnp.asarray([4])), [[3, 4, 5]]
    )


def test_mask_is_causal_windowed_and_segmented():
    valid = jnp.asarray([[0, 1, 1, 1, 1]], bool)
    got = attention_mask(valid, jnp.arange(5), sliding_window=2)
    expected = np.array([[0, 0, 0, 0, 0],  # a padded query sees nothing
                         [0, 1, 0, 0, 0],
                         [0, 1, 1, 0, 0],
                         [0, 0, 1, 1, 0],
                         [0, 0, 0, 1, 1]], bool)
    np.testing.assert_array_equal(got[0], expected)
    segments = jnp.asarray([[1, 1, 2, 2, 2]])
    got = attention_mask(jnp.ones((1, 5), bool), jnp.arange(5), query_segments=segments, key_segments=segments)
    np.testing.assert_array_equal(got[0], np.tril(np.ones((5, 5), bool)) & (segments.T == segments))


def test_packed_segments_equal_separate_sequences(hf_checkpoint, rng):
    model = load_hf(hf_checkpoint("mistral_window"))  # the window must restart with each segment too
    first, second = rng.integers(0, V, size=(1, 3)), rng.integers(0, V, size=(1, 6))
    packed = np.concatenate([first, second, np.zeros((1, 2), int)], axis=1)
    segment_ids = np.array([[1] * 3 + [2] * 6 + [0] * 2])
    mask = (segment_ids > 0).astype(np.int32)

    forward = jax.jit(lambda tokens, **kw: model(tokens, **kw)[0])
    packed_logits = forward(jnp.asarray(packed), attention_mask=jnp.asarray(mask),
                            segment_ids=jnp.asarray(segment_ids))
    np.testing.assert_allclose(packed_logits[:, :3], forward(jnp.asarray(first)), atol=1e-5, rtol=0)
    np.testing.assert_allclose(packed_logits[:, 3:9], forward(jnp.asarray(second)), atol=1e-5, rtol=0)
    assert np.isfinite(np.asarray(packed_logits)).all()


def test_branches_see_the_prefix_and_themselves_and_positions_continue_from_it():
    branches = jnp.asarray([[0, 0, 0, 1, 1, 2, 2, 2, 0]])
    mask = jnp.asarray([[1, 1, 1, 1, 1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(derive_positions(mask, branch_ids=branches)[0, :8], [0, 1, 2, 3, 4, 3, 4, 5])
    got = np.asarray(attention_mask(mask.astype(bool), jnp.arange(9), query_branches=branches,
                                    key_branches=branches))[0]
    assert got[5, :3].all() and not got[5, 3:5].any() and got[5, 5]  # rejected: prompt + itself, never chosen
    assert got[4, :5].all() and not got[4, 5:].any()
    assert not got[:3, 3:].any()  # the prefix sees no branch


def test_branch_rows_equal_separate_sequences(hf_checkpoint, rng):
    model = load_hf(hf_checkpoint("llama"))
    prefix, first, second = (rng.integers(0, V, size=(1, n)) for n in (4, 3, 5))
    row = np.concatenate([prefix, first, second], axis=1)
    branches = np.array([[0] * 4 + [1] * 3 + [2] * 5])
    hidden, _ = model.hidden_states(jnp.asarray(row), branch_ids=jnp.asarray(branches))
    for branch, tokens in ((1, first), (2, second)):
        alone, _ = model.hidden_states(jnp.asarray(np.concatenate([prefix, tokens], axis=1)))
        np.testing.assert_allclose(np.asarray(hidden)[0, branches[0] == branch], np.asarray(alone)[0, 4:],
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="branch_ids"):
        load_hf(hf_checkpoint("mistral_window")).hidden_states(jnp.asarray(row), branch_ids=jnp.asarray(branches))
