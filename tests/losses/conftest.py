"""Shared fixtures for the loss tests: tiny prime sizes and padded masks with garbage in the padding."""

import numpy as np
import pytest

B, T, V = 3, 7, 11


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def right_padded_mask(lengths, length=T):
    """``[len(lengths), length]`` float mask with the first ``lengths[b]`` positions valid."""
    return (np.arange(length)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


def poison(values, mask, garbage=np.nan):
    """Copy of ``values`` with ``garbage`` written where ``mask`` is 0 (padding must never leak)."""
    out = np.array(values, dtype=np.float32, copy=True)
    out[np.broadcast_to(np.asarray(mask), out.shape) == 0] = garbage
    return out


# Metrics every pairwise preference loss reports, named as TRL logs them.
PAIR_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)


def close(actual, expected, *, atol=1e-6):
    """Float32 parity: rtol 1e-6 plus a small atol for values near 0."""
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=1e-6, atol=atol)
