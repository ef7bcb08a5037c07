"""SimPO, ORPO and GenARM: hand values, identities, masking, jit/grad, and parity with TRL's CPO/ORPO trainers.

Parity drives TRL 1.16's real ``get_batch_loss_metrics`` of ``trl.experimental.cpo.CPOTrainer`` (with
``loss_type="simpo"``) and ``trl.experimental.orpo.ORPOTrainer`` on trainers built with ``object.__new__`` and a
fake model that returns logits the test draws; TRL then runs its own ``concatenated_inputs``,
``get_batch_logps(average_log_prob=True)``, NLL and ``cpo_loss`` / ``odds_ratio_loss``. TRL computes in
float64 from the same float32 logits (ORPO casts to float32 itself), so rtol=1e-6 with atol=1e-6 covers our
float32 arithmetic.
"""

from __future__ import annotations

import functools
import math
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxalign.losses.core import sequence_logps, token_logps
from jaxalign.losses.dpo import dpo_loss
from jaxalign.losses.reference_free import genarm_loss, orpo_loss, simpo_loss
from tests.losses.conftest import PAIR_METRICS as METRICS
from tests.losses.conftest import B, T, V, close, poison

pytestmark = pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")

PROMPT = 2
CHOSEN_LENGTHS = (5, 3, 4)
REJECTED_LENGTHS = (2, 5, 1)


def _span_mask(start, lengths):
    positions = np.arange(T)[None, :]
    lengths = np.asarray(lengths)[:, None]
    return ((positions >= start) & (positions < start + lengths)).astype(np.int64)


def _pair_batch(seed):
    rng = np.random.default_rng(seed)
    lengths = CHOSEN_LENGTHS + REJECTED_LENGTHS
    return {
        "input_ids": rng.integers(0, V, size=(2 * B, T)),
        "completion_mask": _span_mask(PROMPT, lengths),
        "attention_mask": _span_mask(0, np.asarray(lengths) + PROMPT),
        # Scaled down so the average log-probs span both sides of −ln 2 (ORPO's log1mexp branch point).
        "logits": (rng.normal(size=(2 * B, T, V)) * 3).astype(np.float32),
    }


def _trl_batch_loss_metrics(cls, batch, **attributes):
    """TRL's ``get_batch_loss_metrics`` on the pair batch (the model returns the drawn logits)."""
    input_ids = torch.tensor(batch["input_ids"])
    logits = torch.tensor(batch["logits"], dtype=torch.float64)

    def model(ids, attention_mask, use_cache):
        assert torch.equal(ids, input_ids)
        return types.SimpleNamespace(logits=logits)

    trainer = object.__new__(cls)
    trainer.accelerator = types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x)
    trainer.is_encoder_decoder = False
    trainer.aux_loss_enabled = False
    for name, value in attributes.items():
        setattr(trainer, name, value)
    labels = input_ids.masked_fill(torch.tensor(batch["completion_mask"]) == 0, -100)
    attention_mask = torch.tensor(batch["attention_mask"])
    inputs = {}
    for side, rows in (("chosen", slice(0, B)), ("rejected", slice(B, 2 * B))):
        inputs[f"{side}_input_ids"] = input_ids[rows]
        inputs[f"{side}_attention_mask"] = attention_mask[rows]
        inputs[f"{side}_labels"] = labels[rows]
    loss, metrics = trainer.get_batch_loss_metrics(model, inputs)
    return loss.item(), metrics


def _our_inputs(batch, nll_mask=None):
    """Summed log-probs, lengths, and the chosen NLL normalised as TRL does (token mean over the batch)."""
    tokens = token_logps(batch["logits"][:, :-1], batch["input_ids"][:, 1:])
    mask = batch["completion_mask"][:, 1:]
    logps = sequence_logps(tokens, mask)
    lengths = mask.sum(1)
    nll_mask = mask[:B] if nll_mask is None else nll_mask
    chosen_nll = -sequence_logps(tokens[:B], nll_mask) * B / nll_mask.sum()
    return (logps[:B], logps[B:], lengths[:B], lengths[B:]), chosen_nll


def _assert_metrics(metrics, trl_metrics, names):
    for name in names:
        close(metrics[name], trl_metrics[name])


@pytest.mark.parametrize(
    "config",
    [
        {"beta": 2.0, "simpo_gamma": 0.5, "label_smoothing": 0.0, "alpha": 0.0, "cpo_alpha": 0.0},
        {"beta": 0.1, "simpo_gamma": 0.5, "label_smoothing": 0.1, "alpha": 0.0, "cpo_alpha": 1.0},
        {"beta": 2.5, "simpo_gamma": 1.2, "label_smoothing": 0.0, "alpha": 0.25, "cpo_alpha": 0.0},
        {"beta": 1.0, "simpo_gamma": 0.3, "label_smoothing": 0.2, "alpha": -0.5, "cpo_alpha": 0.5},
    ],
)
def test_simpo_matches_trl_cpo_trainer(config):
    from trl.experimental.cpo import CPOTrainer

    batch = _pair_batch(seed=1)
    args, chosen_nll = _our_inputs(batch)
    loss_fn = functools.partial(
        simpo_loss,
        beta=config["beta"],
        gamma=config["simpo_gamma"],
        label_smoothing=config["label_smoothing"],
        alpha=config["alpha"],
        sft_weight=config["cpo_alpha"],
    )
    with_nll = config["cpo_alpha"] != 0.0
    loss, metrics = jax.jit(loss_fn)(*args, chosen_nll if with_nll else None)
    chex.assert_shape(loss, (B,))
    trl_loss, trl_metrics = _trl_batch_loss_metrics(CPOTrainer, batch, loss_type="simpo", pad_token_id=0, **config)
    close(jnp.mean(loss), trl_loss)
    _assert_metrics(metrics, trl_metrics, (*METRICS, "nll_loss") if with_nll else METRICS)


def test_simpo_per_pair_matches_trl_cpo_loss():
    from trl.experimental.cpo import CPOTrainer

    rng = np.random.default_rng(2)
    chosen_avg, rejected_avg = -rng.exponential(size=(2, B)) * 2
    lengths = np.array([3, 1, 7])
    trainer = object.__new__(CPOTrainer)
    trainer.__dict__.update(
        alpha=0.0,
        loss_type="simpo",
        simpo_gamma=0.8,
        beta=2.0,
        label_smoothing=0.05,
        accelerator=types.SimpleNamespace(device=torch.device("cpu")),
    )
    losses, chosen_rewards, rejected_rewards = trainer.cpo_loss(torch.tensor(chosen_avg), torch.tensor(rejected_avg))
    summed = (jnp.asarray(chosen_avg * lengths, jnp.float32), jnp.asarray(rejected_avg * lengths, jnp.float32))
    loss, metrics = simpo_loss(*summed, lengths, lengths, beta=2.0, gamma=0.8, label_smoothing=0.05)
    close(loss, losses.numpy())
    close(metrics["rewards/chosen"], chosen_rewards.mean().item())
    close(metrics["rewards/rejected"], rejected_rewards.mean().item())


def test_simpo_hand_value_and_margin_parameterisations():
    # Averages −3/3 = −1 and −4/2 = −2; β = 2, γ/β = 0.25 (γ = 0.5): z = 2·1 − 0.5 = 1.5,
    # loss = log(1 + e^−1.5) = 0.20141328.
    args = (jnp.array([-3.0]), jnp.array([-4.0]), jnp.array([3]), jnp.array([2]))
    default, metrics = simpo_loss(*args)
    close(default, [0.20141328])
    close(simpo_loss(*args, gamma=0.5)[0], [0.20141328])
    close(simpo_loss(*args, gamma_beta_ratio=0.25)[0], [0.20141328])
    close(metrics["logps/chosen"], -1.0)
    close(metrics["rewards/margins"], 2.0)
    # AlphaPO's reward (1 − e^{−α·p̄})/α tends to p̄ as α → 0.
    close(simpo_loss(*args, alpha=1e-4)[0], [0.20141328], atol=1e-4)
    assert not np.allclose(simpo_loss(*args, alpha=0.5)[0], default)


@pytest.mark.parametrize("loss_fn", [simpo_loss, orpo_loss, genarm_loss])
def test_grad_finite_with_nan_padding_and_jit_equals_eager(loss_fn):
    rng = np.random.default_rng(3)
    mask = _span_mask(0, [4, 1, 6])
    both = np.concatenate([mask, mask])
    tokens = jnp.asarray(poison(-rng.exponential(size=(2 * B, T)), both, np.nan))
    lengths = mask.sum(1)

    def objective(values):
        logps = sequence_logps(values, both)
        loss, _ = loss_fn(logps[:B], logps[B:], lengths, lengths)
        return jnp.mean(loss)

    grads = jax.grad(objective)(tokens)
    assert np.all(np.isfinite(grads))
    np.testing.assert_array_equal(np.asarray(grads)[both == 0], 0.0)
    assert np.any(np.asarray(grads)[both == 1] != 0.0)
    logps = sequence_logps(tokens, both)
    eager, eager_metrics = loss_fn(logps[:B], logps[B:], lengths, lengths)
    jitted, jitted_metrics = jax.jit(loss_fn)(logps[:B], logps[B:], lengths, lengths)
    close(jitted, np.asarray(eager))
    for name, value in eager_metrics.items():
        close(jitted_metrics[name], np.asarray(value))


@pytest.mark.parametrize("loss_fn", [simpo_loss, orpo_loss])
def test_losses_are_length_normalised(loss_fn, rng):
    # Repeating a completion (twice the log-prob over twice the tokens) keeps its average, hence the loss.
    chosen, rejected = -rng.exponential(size=(2, B)) * 4
    lengths = np.array([4, 1, 6])
    loss, _ = loss_fn(chosen, rejected, lengths, lengths + 1)
    doubled, _ = loss_fn(2 * chosen, 2 * rejected, 2 * lengths, 2 * (lengths + 1))
    close(doubled, np.asarray(loss))


def test_simpo_empty_completion_counts_as_one_token():
    # TRL divides by the raw token count (0/0 = NaN); the clamp keeps a fully masked row finite and inert.
    empty = jnp.array([0.0, -2.0])
    lengths = jnp.array([0, 2])
    simpo, _ = simpo_loss(empty, jnp.array([-3.0, -4.0]), lengths, jnp.array([3, 2]))
    assert np.all(np.isfinite(simpo))
    # Length 0 and length 1 give the same average (the sum itself).
    close(simpo[0], np.asarray(simpo_loss(jnp.array([0.0]), jnp.array([-3.0]), jnp.array([1]), jnp.array([3]))[0][0]))


# Three valid pairs around two padded slots, as a jitted step pads a batch to a static size.
PAIR_MASK = np.array([True, False, True, False, True])


def _pad(values, garbage):
    out = np.full(PAIR_MASK.shape, garbage, np.float32)
    out[PAIR_MASK] = values
    return jnp.asarray(out)


@pytest.mark.parametrize("loss_fn", [simpo_loss, orpo_loss])
def test_masked_pairs_equal_the_unpadded_batch(loss_fn):
    # Masked slots hold NaN/inf in every input: valid slots equal the unpadded batch, masked slots give 0,
    # metrics ignore them, and no garbage reaches a gradient.
    rng = np.random.default_rng(6)
    chosen, rejected = -rng.exponential(size=(2, B)) * 4
    chosen_lengths, rejected_lengths = np.array([4, 1, 6]), np.array([2, 5, 3])
    nll = rng.exponential(size=B)
    kwargs = {"sft_weight": 0.7} if loss_fn is simpo_loss else {}
    plain, plain_metrics = loss_fn(chosen, rejected, chosen_lengths, rejected_lengths, nll, **kwargs)

    def padded(policy):
        lengths = (_pad(chosen_lengths, np.nan), _pad(rejected_lengths, np.inf))
        return loss_fn(policy[0], policy[1], *lengths, _pad(nll, np.nan), jnp.asarray(PAIR_MASK), **kwargs)

    policy = jnp.stack([_pad(chosen, np.nan), _pad(rejected, -np.inf)])
    loss, metrics = padded(policy)
    chex.assert_shape(loss, (PAIR_MASK.size,))
    close(np.asarray(loss)[PAIR_MASK], np.asarray(plain))
    np.testing.assert_array_equal(np.asarray(loss)[~PAIR_MASK], 0.0)
    assert metrics.keys() == plain_metrics.keys()
    for name, expected in plain_metrics.items():
        close(metrics[name], np.asarray(expected))
    jitted, jitted_metrics = jax.jit(padded)(policy)
    close(jitted, np.asarray(loss))
    for name, value in metrics.items():
        close(jitted_metrics[name], np.asarray(value))
    grads = jax.grad(lambda x: jnp.sum(padded(x)[0]))(policy)
    assert np.all(np.isfinite(grads))
    np.testing.assert_array_equal(np.asarray(grads)[:, ~PAIR_MASK], 0.0)
    assert np.all(np.asarray(grads)[:, PAIR_MASK] != 0.0)


@pytest.mark.parametrize("loss_fn", [simpo_loss, orpo_loss, genarm_loss])
def test_empty_batch_gives_zero_metrics(loss_fn):
    # B = 0 (or every pair masked) must log 0, not the NaN of a mean over nothing.
    kwargs = {"sft_weight": 1.0} if loss_fn is simpo_loss else {}
    empty = jnp.zeros(0)
    nll = None if loss_fn is genarm_loss else empty  # GenARM has no NLL term
    loss, metrics = loss_fn(empty, empty, empty, empty, nll, **kwargs)
    chex.assert_shape(loss, (0,))
    assert set(METRICS) | ({"nll_loss"} if nll is not None else set()) <= metrics.keys()
    for name, value in metrics.items():
        assert value == 0.0, name
    garbage = jnp.full(B, jnp.nan)
    loss, metrics = loss_fn(*(garbage,) * 4, None if nll is None else garbage, jnp.zeros(B, bool), **kwargs)
    np.testing.assert_array_equal(loss, np.zeros(B))
    for name, value in metrics.items():
        assert value == 0.0, name


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gamma": 0.5, "gamma_beta_ratio": 0.2}, "not both"),
        ({"beta": 0.0}, "beta"),
        ({"label_smoothing": 0.7}, "label_smoothing"),
        ({"sft_weight": 1.0}, "NLL"),
    ],
)
def test_simpo_rejects_bad_configuration(kwargs, match):
    x = jnp.zeros(B)
    with pytest.raises(ValueError, match=match):
        simpo_loss(x, x, x + 1, x + 1, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# ORPO
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_matches_trl_orpo_trainer(beta):
    from trl.experimental.orpo import ORPOTrainer

    batch = _pair_batch(seed=4)
    # TRL's ORPO NLL covers every attended token of the chosen sequence (prompt included).
    args, chosen_nll = _our_inputs(batch, nll_mask=batch["attention_mask"][:B, 1:])
    loss, metrics = jax.jit(functools.partial(orpo_loss, beta=beta))(*args, chosen_nll)
    chex.assert_shape(loss, (B,))
    trl_loss, trl_metrics = _trl_batch_loss_metrics(ORPOTrainer, batch, beta=beta, padding_value=0)
    close(jnp.mean(loss), trl_loss)
    _assert_metrics(metrics, trl_metrics, (*METRICS, "nll_loss", "log_odds_ratio", "log_odds_chosen"))


def test_orpo_per_pair_matches_trl_odds_ratio_loss():
    from trl.experimental.orpo import ORPOTrainer

    # Averages on both sides of −ln 2 and close to 0, where log(1 − eˣ) needs care.
    chosen_avg = np.array([-1e-3, -0.5, -0.7, -2.0, -6.0])
    rejected_avg = np.array([-3.0, -0.69, -1e-2, -0.8, -0.2])
    trainer = object.__new__(ORPOTrainer)
    trainer.__dict__.update(beta=0.2, accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    losses, _, _, ratio, log_odds = trainer.odds_ratio_loss(torch.tensor(chosen_avg), torch.tensor(rejected_avg))
    lengths = np.array([1, 2, 3, 4, 5])
    loss, metrics = orpo_loss(chosen_avg * lengths, rejected_avg * lengths, lengths, lengths, beta=0.2)
    close(loss, -losses.numpy())
    close(metrics["log_odds_ratio"], ratio.item())
    close(metrics["log_odds_chosen"], log_odds.item())


def test_orpo_hand_value_and_gradients():
    # p̄_w = log 0.5 (odds 1), p̄_l = log 0.2 (odds 1/4): log-odds difference log 4,
    # loss = −0.1·log σ(log 4) = −0.1·log 0.8 = 0.022314355.
    loss, metrics = orpo_loss(
        jnp.array([2 * math.log(0.5)]), jnp.array([math.log(0.2)]), jnp.array([2]), jnp.array([1])
    )
    close(loss, [0.022314355])
    close(metrics["log_odds_chosen"], math.log(4.0))
    # Gradients are finite on both branches of log1mexp and match the float64 derivative.
    chosen = jnp.array([-1e-3, -0.5, -0.7, -3.0])
    rejected = jnp.full(4, -1.0)
    ones = jnp.ones(4)
    grads = jax.grad(lambda c: jnp.sum(orpo_loss(c, rejected, ones, ones, beta=1.0)[0]))(chosen)
    x = np.asarray(chosen, np.float64)
    # d/dx of −log σ(x − log(1 − eˣ) − const) = −σ(−d)·(1 + eˣ/(1 − eˣ)), d the log-odds difference.
    d = x - np.log1p(-np.exp(x)) - (-1.0 - math.log1p(-math.exp(-1.0)))
    expected = -(1 / (1 + np.exp(d))) * (1 + np.exp(x) / (1 - np.exp(x)))
    np.testing.assert_allclose(grads, expected, rtol=1e-4)


def test_orpo_pair_with_an_empty_completion_is_dropped():
    # An empty completion's summed log-prob is exactly 0, so p̄ = 0 (certainty, infinite odds): TRL's formula
    # gives loss inf for an empty rejected side and NaN for two empty sides. Such a pair carries no
    # preference: it gets loss 0 and stays out of the metrics, like a masked pair.
    rng = np.random.default_rng(7)
    chosen_lengths = np.array([3, 4, 0, 0, 5])  # pairs 1-3: rejected empty, both empty, chosen empty
    rejected_lengths = np.array([2, 0, 0, 6, 3])
    mask = _span_mask(0, np.concatenate([chosen_lengths, rejected_lengths]))
    tokens = jnp.asarray(poison(-rng.exponential(size=(10, T)), mask, np.nan))
    kept = np.array([0, 4])

    def loss_fn(values):
        logps = sequence_logps(values, mask)
        nll = -sequence_logps(values[:5], mask[:5], average=True)
        return orpo_loss(logps[:5], logps[5:], chosen_lengths, rejected_lengths, nll, beta=0.3)

    loss, metrics = jax.jit(loss_fn)(tokens)
    assert np.all(np.isfinite(loss)) and all(np.isfinite(v) for v in metrics.values())
    np.testing.assert_array_equal(np.asarray(loss)[1:4], 0.0)
    logps = sequence_logps(tokens, mask)
    nll = -sequence_logps(tokens[:5], mask[:5], average=True)
    alone, alone_metrics = orpo_loss(
        logps[kept], logps[5 + kept], chosen_lengths[kept], rejected_lengths[kept], nll[kept], beta=0.3
    )
    close(np.asarray(loss)[kept], np.asarray(alone))
    for name, expected in alone_metrics.items():
        close(metrics[name], np.asarray(expected))
    grads = jax.grad(lambda x: jnp.sum(loss_fn(x)[0]))(tokens)
    assert np.all(np.isfinite(grads))
    np.testing.assert_array_equal(np.asarray(grads)[[1, 2, 3, 6, 7, 8]], 0.0)


def test_orpo_certainty_has_finite_odds():
    # p̄_w = log 0.5 (log-odds 0) against a rejected completion of probability 1 (p̄_l = 0, which float32
    # log-probs reach): 1 − P(y_l) is floored at 1 − e^(−1e-6), so log odds(y_l) = −log(−expm1(−1e-6))
    # = 13.815511 and loss = −0.3·log σ(−13.815511) = 0.3·13.815512 = 4.1446536 (TRL: inf).
    two = jnp.array([2, 2])
    loss, metrics = orpo_loss(jnp.array([2 * math.log(0.5), 0.0]), jnp.array([0.0, -1.0]), two, two, beta=0.3)
    close(loss[0], 4.1446536)
    # A certain *chosen* completion has infinite odds in TRL, whose gradient is 0·inf = NaN.
    assert np.all(np.isfinite(loss)) and all(np.isfinite(v) for v in metrics.values())
    grads = jax.grad(lambda x: jnp.sum(orpo_loss(x[0], x[1], two, two, beta=0.3)[0]))(
        jnp.array([[2 * math.log(0.5), 0.0], [0.0, -1.0]])
    )
    assert np.all(np.isfinite(grads))
    # Below the floor (p̄ ≤ −1e-6) the log-odds are exact: p̄ − log(1 − e^p̄) at p̄ = −2e-6 is 13.122362.
    _, metrics = orpo_loss(jnp.array([-2e-6]), jnp.array([math.log(0.5)]), jnp.array([1]), jnp.array([1]))
    close(metrics["log_odds_chosen"], -2e-6 - math.log(-math.expm1(-2e-6)), atol=1e-5)


def test_orpo_rejects_bad_beta():
    x = jnp.zeros(B) - 1
    with pytest.raises(ValueError, match="beta"):
        orpo_loss(x, x, x, x, beta=0.0)


def test_genarm_hand_value_and_dpo_identity():
    # Summed log-probs −3 and −5, β_r = 0.5: z = 0.5·2 = 1, loss = log(1 + e^−1) = 0.31326169; no length
    # normalisation (the lengths only feed the average-log-prob metrics).
    loss, metrics = genarm_loss(jnp.array([-3.0]), jnp.array([-5.0]), jnp.array([3]), jnp.array([10]), beta=0.5)
    close(loss, [0.31326169])
    close(metrics["rewards/chosen"], -1.5)
    close(metrics["rewards/margins"], 1.0)
    close(metrics["logps/rejected"], -0.5)
    # DPO's sigmoid loss with a reference that gives every response log-prob 0 (TRL's reference_free=True).
    rng = np.random.default_rng(11)
    chosen, rejected = jnp.asarray(-rng.exponential(size=(2, 5)) * 6, jnp.float32)
    lengths = jnp.arange(1, 6)
    zeros = jnp.zeros(5)
    dpo, _ = dpo_loss(chosen, rejected, zeros, zeros, beta=0.2)
    close(genarm_loss(chosen, rejected, lengths, lengths, beta=0.2)[0], np.asarray(dpo))


def test_genarm_matches_the_genarm_codes_arm_loss():
    # GenARM's training_openInstruct/open_instruct/arm_utils.py: losses = −logsigmoid(β·(logp_w − logp_l)),
    # chosen_rewards = β·logp_w, in float64 torch.
    rng = np.random.default_rng(12)
    chosen, rejected = -rng.exponential(size=(2, 7)) * 20
    lengths = np.full(7, 9)
    loss, metrics = genarm_loss(chosen, rejected, lengths, lengths, beta=0.1)
    expected = -torch.nn.functional.logsigmoid(0.1 * (torch.tensor(chosen) - torch.tensor(rejected)))
    close(loss, expected.numpy())
    close(metrics["rewards/chosen"], float(0.1 * chosen.mean()))


@pytest.mark.parametrize(("kwargs", "match"), [({"beta": 0.0}, "beta"), ({"chosen_nll": jnp.zeros(1)}, "NLL")])
def test_genarm_rejects_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        genarm_loss(jnp.zeros(1), jnp.zeros(1), jnp.ones(1), jnp.ones(1), **kwargs)
