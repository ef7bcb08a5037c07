"""InfoNCE over pooled sequence states: a float64 NumPy loop, SimCSE/CLIP's cross-entropy in PyTorch on the same
arrays, the pairwise identity, masks, pooling, bad input, and what a sharded batch and micro-batches compute."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import losses
from tests.conftest import host_devices_env

B, D = 5, 7
TAU = 0.07


def arrays(seed: int = 0, batch: int = B):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(batch, D)).astype(np.float32) for _ in range(3)]


def reference(anchors, positives, negatives, valid, *, temperature, in_batch=True, normalize=True):
    """The formula, one row at a time, in float64."""
    a, p = np.asarray(anchors, np.float64), np.asarray(positives, np.float64)
    n = None if negatives is None else np.asarray(negatives, np.float64)
    unit = (lambda x: x / np.linalg.norm(x)) if normalize else (lambda x: x)
    out = np.zeros(len(a))
    for i in range(len(a)):
        if not valid[i]:
            continue
        others = [j for j in range(len(a)) if valid[j] and (in_batch or j == i)]
        sims = [unit(a[i]) @ unit(p[j]) / temperature for j in others if j != i]
        sims += [] if n is None else [unit(a[i]) @ unit(n[j]) / temperature for j in others]
        positive = unit(a[i]) @ unit(p[i]) / temperature
        everything = np.array([positive, *sims])
        top = everything.max()
        out[i] = top + np.log(np.exp(everything - top).sum()) - positive
    return out


@pytest.mark.parametrize("in_batch", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("with_negatives", [True, False])
def test_matches_a_float64_loop(in_batch, normalize, with_negatives):
    if not in_batch and not with_negatives:
        pytest.skip("no negative at all")
    a, p, n = arrays(1)
    n = n if with_negatives else None
    valid = np.array([1, 1, 0, 1, 1], bool)
    temperature = TAU if normalize else 3.0
    per, metrics = losses.contrastive_loss(a, p, n, valid, temperature=temperature, in_batch=in_batch,
                                           normalize=normalize)
    want = reference(a, p, n, valid, temperature=temperature, in_batch=in_batch, normalize=normalize)
    np.testing.assert_allclose(per, want, rtol=2e-5, atol=1e-5)
    assert per.shape == (B,) and per[2] == 0.0
    np.testing.assert_allclose(metrics["loss"], want[valid].mean(), rtol=2e-5)
    negatives_per_row = (3 if in_batch else 0) + (0 if n is None else (4 if in_batch else 1))
    assert metrics["negatives"] == negatives_per_row and metrics["rows_without_negative"] == 0


def test_equals_simcse_and_clip_cross_entropy_in_pytorch():
    """SimCSE's supervised loss with hard negatives (its code: ``cos_sim = cat([z1·z2ᵀ, z1·z3ᵀ]) / temp``, then
    ``CrossEntropyLoss`` with labels ``arange(B)``), which without hard negatives is CLIP's row-wise term."""
    torch = pytest.importorskip("torch")
    functional = torch.nn.functional
    a, p, n = arrays(2)
    z1, z2, z3 = (functional.normalize(torch.tensor(x, dtype=torch.float64), dim=-1) for x in (a, p, n))
    labels = torch.arange(B)
    simcse = functional.cross_entropy(torch.cat([z1 @ z2.T, z1 @ z3.T], dim=1) / TAU, labels, reduction="none")
    clip = functional.cross_entropy(z1 @ z2.T / TAU, labels, reduction="none")
    np.testing.assert_allclose(losses.contrastive_loss(a, p, n, temperature=TAU)[0], simcse.numpy(), rtol=2e-5)
    np.testing.assert_allclose(losses.contrastive_loss(a, p, temperature=TAU)[0], clip.numpy(), rtol=2e-5)


def test_one_pair_falls_back_to_its_own_negative_the_logistic_loss():
    a, p, n = arrays(3, batch=1)
    per, metrics = losses.contrastive_loss(a, p, n, temperature=0.5)
    cos = lambda u, v: float(u @ v / np.linalg.norm(u) / np.linalg.norm(v))  # noqa: E731
    margin = (cos(a[0], p[0]) - cos(a[0], n[0])) / 0.5
    np.testing.assert_allclose(per[0], np.log1p(np.exp(-margin)), rtol=1e-5)
    assert per[0] > 0 and metrics["negatives"] == 1
    # The same fallback when the batch's other rows are padding.
    a5, p5, n5 = arrays(4)
    a5[0], p5[0], n5[0] = a[0], p[0], n[0]
    padded, metrics = losses.contrastive_loss(a5, p5, n5, np.array([1, 0, 0, 0, 0]), temperature=0.5)
    np.testing.assert_allclose(padded[0], per[0], rtol=1e-5)
    assert metrics["negatives"] == 1


def test_padded_rows_without_negatives_are_counted_not_hidden():
    a, p, _ = arrays(5)
    _, metrics = losses.contrastive_loss(a, p, None, np.array([1, 0, 0, 0, 0]), temperature=TAU)
    assert metrics["rows_without_negative"] == 1 and metrics["negatives"] == 0


@pytest.mark.parametrize("temperature", [0.0, -0.1, float("nan"), float("inf")])
def test_a_temperature_that_is_not_positive_is_refused(temperature):
    a, p, n = arrays(6)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        losses.contrastive_loss(a, p, n, temperature=temperature)


def test_one_row_without_negatives_is_refused_not_a_zero_loss():
    a, p, _ = arrays(7, batch=1)
    with pytest.raises(ValueError, match="nothing to contrast"):
        losses.contrastive_loss(a, p, None, temperature=TAU)


def test_gradients_under_jit_match_finite_differences():
    a, p, n = arrays(8)
    valid = np.array([1, 1, 1, 0, 1], bool)

    def total(a, p, n):
        per, _ = losses.contrastive_loss(a, p, n, valid, temperature=0.3)
        return jnp.sum(per)

    grads = jax.jit(jax.grad(total, argnums=(0, 1, 2)))(a, p, n)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    assert np.all(np.asarray(grads[0])[3] == 0)  # a padded row's anchor is in no loss
    direction = np.random.default_rng(0).normal(size=a.shape).astype(np.float32)
    eps = 1e-2
    numeric = (reference(a + eps * direction, p, n, valid, temperature=0.3).sum()
               - reference(a - eps * direction, p, n, valid, temperature=0.3).sum()) / (2 * eps)
    np.testing.assert_allclose(np.sum(np.asarray(grads[0], np.float64) * direction), numeric, rtol=1e-3)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_pool_states_reads_the_marked_slots(pooling):
    rng = np.random.default_rng(9)
    hidden = rng.normal(size=(2, 6, 3)).astype(np.float32)
    mask = np.zeros((2, 2, 6), bool)
    mask[0, 0, 1:4] = True
    mask[0, 1, [2, 5]] = True
    mask[1, 0, 0] = True  # row 1's second sequence has nothing marked
    pooled = np.asarray(losses.pool_states(hidden, mask, pooling=pooling))
    if pooling == "last":
        want = [[hidden[0, 3], hidden[0, 5]], [hidden[1, 0], np.zeros(3)]]
    else:
        want = [[hidden[0, 1:4].mean(0), hidden[0, [2, 5]].mean(0)], [hidden[1, 0], np.zeros(3)]]
    np.testing.assert_allclose(pooled, np.asarray(want), rtol=1e-6)
    with pytest.raises(ValueError, match="pooling must be one of"):
        losses.pool_states(hidden, mask, pooling="max")


def test_micro_batches_contrast_within_their_own_rows():
    """What gradient accumulation computes: each micro-batch its own batch, so Σ sums / Σ counts over two halves
    is the loop with candidates restricted to a row's half (not the full-batch loss, which differs)."""
    a, p, n = arrays(10, batch=6)
    valid = np.ones(6, bool)
    parts = (slice(0, 3), slice(3, 6))
    halves = [losses.contrastive_loss(a[s], p[s], n[s], temperature=TAU)[0] for s in parts]
    accumulated = float(sum(np.sum(h) for h in halves)) / 6
    blocks = np.concatenate([reference(a[s], p[s], n[s], valid[s], temperature=TAU) for s in parts])
    np.testing.assert_allclose(accumulated, blocks.mean(), rtol=1e-5)
    full = reference(a, p, n, valid, temperature=TAU).mean()
    assert abs(accumulated - full) > 1e-3


SHARDED = """
import json, jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxalign import losses
rng = np.random.default_rng(0)
a, p, n = (rng.normal(size=(8, 7)).astype(np.float32) for _ in range(3))
valid = np.array([1, 1, 1, 0, 1, 1, 1, 1], bool)
fn = jax.jit(lambda a, p, n, v: losses.contrastive_loss(a, p, n, v, temperature=0.07)[0])
mesh = Mesh(np.array(jax.devices()), ("data",))
rows = NamedSharding(mesh, P("data"))
sharded = fn(*(jax.device_put(x, rows) for x in (a, p, n, valid)))
single = fn(a, p, n, valid)
print(json.dumps({"devices": len(jax.devices()), "shards": len(sharded.addressable_shards),
                  "sharded": np.asarray(sharded).tolist(), "single": np.asarray(single).tolist()}))
"""


def test_a_sharded_batch_contrasts_against_every_devices_rows():
    """Rows split over 4 devices: each row still sees the other devices' responses as negatives (XLA gathers
    them for the similarity matmul), so the loss equals one device's."""
    result = subprocess.run([sys.executable, "-c", SHARDED], env=host_devices_env(4), capture_output=True, text=True,
                            timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["devices"] == 4 and report["shards"] == 4
    np.testing.assert_allclose(report["sharded"], report["single"], rtol=1e-6)
