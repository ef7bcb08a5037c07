"""DPO family and KTO: hand values, identities, masking, jit/grad, and parity with TRL's own loss code.

Parity drives TRL 1.16's real ``DPOTrainer._compute_loss`` / ``KTOTrainer._compute_loss`` on a trainer built
with ``object.__new__`` (only the attributes those methods read are set) and a fake model that plays TRL's
fused LM head: it returns per-token log-probs, entropy, mean logits, top-1 hits and log Σp² of logits that the
test draws, with 0 wherever the label is -100, exactly as ``add_fused_lm_head`` does.

Tolerance: TRL runs in float64 on the same float32 numbers, so the only error is our float32 arithmetic
(sequence sums ≈ -12 carry ~1e-6 absolute rounding, which the small log-ratios inherit): rtol=1e-6 plus
atol=1e-6 holds. The squared losses (IPO/SPPO, values ≈ 25–50 at β = 0.1) amplify that absolute error by
2·|x − 1/(2β)| ≈ 10, so for those the check is relative to the value (rtol=1e-6, atol=1e-5).
"""

from __future__ import annotations

import functools
import math
import types
from collections import defaultdict

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxalign.losses.core import sequence_logps, token_logps
from jaxalign.losses.dpo import (
    DPO_LOSS_TYPES,
    F_DIVERGENCES,
    KTO_LOSS_TYPES,
    dpo_loss,
    kto_loss,
    ld_sequence_logps,
    wpo_weights,
)
from tests.losses.conftest import PAIR_METRICS as METRICS
from tests.losses.conftest import B, T, V, close, poison
from tests.oracles import legacy_trl_method

PROMPT = 2
CHOSEN_LENGTHS = (5, 3, 4)
REJECTED_LENGTHS = (2, 5, 1)
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop")
SQUARED = {"ipo", "sppo_hard"}


def _completion_mask(lengths, prompt=PROMPT, length=T):
    positions = np.arange(length)[None, :]
    lengths = np.asarray(lengths)[:, None]
    return ((positions >= prompt) & (positions < prompt + lengths)).astype(np.int64)


# ----------------------------------------------------------------------------------------------------------
# TRL harness
# ----------------------------------------------------------------------------------------------------------


class FakeFusedLM:
    """A model already patched with TRL's fused LM head: ``model(..., labels=, fused_lm_head=True)``.

    ``table`` maps each batch of input ids (matched by value) to the next-token logits ``[N, T-1, V]``.
    """

    training = True

    def __init__(self, table):
        self.table = table

    def __call__(self, input_ids, labels, fused_lm_head, **_):
        assert fused_lm_head
        (logits,) = [z for ids, z in self.table if torch.equal(ids, input_ids)]
        shift_labels = labels[:, 1:]
        valid = shift_labels != -100
        logp = torch.log_softmax(logits, -1)
        per_token = {
            "log_probs": logp.gather(-1, shift_labels.clamp(min=0)[..., None])[..., 0],
            "entropy": -(logp.exp() * logp).sum(-1),
            "log_sum_sq_probs": torch.logsumexp(2 * logp, -1),
            "mean_logits": logits.mean(-1),
            "is_top1": logits.argmax(-1) == shift_labels,
        }
        return types.SimpleNamespace(**{k: v.masked_fill(~valid, 0) for k, v in per_token.items()})


def _bare_trainer(cls, model, **attributes):
    trainer = object.__new__(cls)
    identity = lambda x: x  # noqa: E731 (single device: gathers are the identity)
    trainer.model = model
    trainer.accelerator = types.SimpleNamespace(
        device=torch.device("cpu"), gather=identity, gather_for_metrics=identity
    )
    trainer.aux_loss_enabled = False
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0
    trainer._tp_size = 1
    for name, value in attributes.items():
        setattr(trainer, name, value)
    return trainer


def _pair_batch(seed):
    """[chosen; rejected] token ids, masks, policy logits and reference sequence log-probs."""
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(0, V, size=(2 * B, T))
    completion_mask = _completion_mask(CHOSEN_LENGTHS + REJECTED_LENGTHS)
    logits = (rng.normal(size=(2 * B, T - 1, V)) * 2).astype(np.float32)
    shift_mask = completion_mask[:, 1:]
    exact = np.take_along_axis(
        torch.log_softmax(torch.tensor(logits, dtype=torch.float64), -1).numpy(), input_ids[:, 1:, None], -1
    )[..., 0]
    # The reference is the policy plus O(1) noise, so log-ratios are O(1) as in training.
    ref = ((exact * shift_mask).sum(1) + rng.normal(size=2 * B)).astype(np.float32)
    return {"input_ids": input_ids, "completion_mask": completion_mask, "logits": logits, "ref": ref}


def _trl_dpo(batch, dtype=torch.float64, **config):
    from trl import DPOTrainer

    input_ids = torch.tensor(batch["input_ids"])
    model = FakeFusedLM([(input_ids, torch.tensor(batch["logits"], dtype=dtype))])
    trainer = _bare_trainer(
        DPOTrainer,
        model,
        args=types.SimpleNamespace(discopop_tau=config.pop("discopop_tau", 0.05)),
        loss_types=config.pop("loss_types"),
        loss_weights=config.pop("loss_weights", None),
        beta=config.pop("beta", 0.1),
        label_smoothing=config.pop("label_smoothing", 0.0),
        f_divergence_type=config.pop("f_divergence_type", "reverse_kl"),
        f_alpha_divergence_coef=config.pop("f_alpha_divergence_coef", 0.5),
        ld_alpha=config.pop("ld_alpha", None),
        use_weighting=config.pop("use_weighting", False),
        precompute_ref_logps=True,
    )
    assert not config, config
    trainer.loss_weights = trainer.loss_weights or [1.0] * len(trainer.loss_types)
    ref = torch.tensor(batch["ref"], dtype=dtype)
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "completion_mask": torch.tensor(batch["completion_mask"]),
        "ref_chosen_logps": ref[:B],
        "ref_rejected_logps": ref[B:],
    }
    loss = trainer._compute_loss(model, inputs, return_outputs=False)
    return loss.item(), {name: values[-1] for name, values in trainer._metrics["train"].items()}


def _our_inputs(batch):
    tokens = token_logps(batch["logits"], batch["input_ids"][:, 1:])
    shift_mask = batch["completion_mask"][:, 1:]
    logps = sequence_logps(tokens, shift_mask)
    lengths = shift_mask.sum(1)
    ref = batch["ref"]
    return (logps[:B], logps[B:], ref[:B], ref[B:]), {"chosen_lengths": lengths[:B], "rejected_lengths": lengths[B:]}


def _assert_matches_trl(batch, ours, trl, *, loss_atol=1e-6):
    loss, metrics = ours
    chex.assert_shape(loss, (B,))
    chex.assert_type(loss, jnp.float32)
    trl_loss, trl_metrics = trl
    close(jnp.mean(loss), trl_loss, atol=loss_atol)
    for name in METRICS:
        close(metrics[name], trl_metrics[name])


def _default_smoothing(loss_type):
    return 1e-3 if loss_type == "exo_pair" else 0.0


@pytest.mark.parametrize("beta", [0.1, 0.7])
@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_every_loss_type_matches_trl_dpo_trainer(loss_type, beta):
    batch = _pair_batch(seed=1)
    args, lengths = _our_inputs(batch)
    smoothing = _default_smoothing(loss_type)
    ours = dpo_loss(*args, **lengths, loss_type=loss_type, beta=beta, label_smoothing=smoothing)
    trl = _trl_dpo(batch, loss_types=[loss_type], beta=beta, label_smoothing=smoothing)
    _assert_matches_trl(batch, ours, trl, loss_atol=1e-5 if loss_type in SQUARED else 1e-6)


@pytest.mark.parametrize(
    ("loss_type", "label_smoothing"),
    [("robust", 0.1), ("robust", 0.3), ("exo_pair", 0.2), ("aot", 0.1), ("aot_unpaired", 0.25)],
)
def test_label_smoothing_matches_trl_dpo_trainer(loss_type, label_smoothing):
    batch = _pair_batch(seed=2)
    args, lengths = _our_inputs(batch)
    ours = dpo_loss(*args, **lengths, loss_type=loss_type, beta=0.3, label_smoothing=label_smoothing)
    trl = _trl_dpo(batch, loss_types=[loss_type], beta=0.3, label_smoothing=label_smoothing)
    _assert_matches_trl(batch, ours, trl)


@pytest.mark.parametrize("f_divergence", [f for f in F_DIVERGENCES if f != "reverse_kl"])
@pytest.mark.parametrize("loss_type", F_DIVERGENCE_LOSS_TYPES)
def test_f_divergences_match_trl_dpo_trainer(loss_type, f_divergence):
    batch = _pair_batch(seed=3)
    args, lengths = _our_inputs(batch)
    smoothing = _default_smoothing(loss_type)
    ours = dpo_loss(
        *args,
        **lengths,
        loss_type=loss_type,
        beta=0.2,
        label_smoothing=smoothing,
        f_divergence=f_divergence,
        f_alpha=0.3,
    )
    # TRL's alpha-divergence clamp table has no float64 entry, so that case runs TRL in float32.
    dtype = torch.float32 if f_divergence == "alpha_divergence" else torch.float64
    trl = _trl_dpo(
        batch,
        dtype,
        loss_types=[loss_type],
        beta=0.2,
        label_smoothing=smoothing,
        f_divergence_type=f_divergence,
        f_alpha_divergence_coef=0.3,
    )
    _assert_matches_trl(batch, ours, trl, loss_atol=1e-5 if loss_type in SQUARED else 1e-6)


def test_discopop_tau_matches_trl_dpo_trainer():
    batch = _pair_batch(seed=4)
    args, _ = _our_inputs(batch)
    ours = dpo_loss(*args, loss_type="discopop", beta=0.5, discopop_tau=0.3)
    _assert_matches_trl(batch, ours, _trl_dpo(batch, loss_types=["discopop"], beta=0.5, discopop_tau=0.3))


def test_weighted_mixture_matches_trl_dpo_trainer():
    # MPO-style: several loss types summed with weights.
    batch = _pair_batch(seed=5)
    args, lengths = _our_inputs(batch)
    kinds, weights = ["sigmoid", "bco_pair", "ipo"], [0.8, 0.2, 0.05]
    ours = dpo_loss(*args, **lengths, loss_type=tuple(kinds), loss_weights=weights)
    _assert_matches_trl(batch, ours, _trl_dpo(batch, loss_types=kinds, loss_weights=weights))


def test_rpo_alpha_matches_trl_sigmoid_plus_sft():
    # TRL 1.16 spells RPO as loss_type=["sigmoid", "sft"]; its "sft" term is the chosen NLL's token mean over
    # the whole batch, which a per-sequence nll_b = B·Σ_t nll_bt / N_tokens reproduces.
    batch = _pair_batch(seed=6)
    args, _ = _our_inputs(batch)
    tokens = token_logps(batch["logits"][:B], batch["input_ids"][:B, 1:])
    mask = batch["completion_mask"][:B, 1:]
    chosen_nll = -sequence_logps(tokens, mask) * B / mask.sum()
    ours = dpo_loss(*args, chosen_nll=chosen_nll, beta=0.3, rpo_alpha=0.7)
    _assert_matches_trl(batch, ours, _trl_dpo(batch, loss_types=["sigmoid", "sft"], loss_weights=[1.0, 0.7], beta=0.3))
    close(ours[1]["nll_loss"], -np.sum(np.asarray(tokens) * mask) / mask.sum())


@pytest.mark.parametrize("kinds", [("sigmoid",), ("ipo", "hinge")])
def test_wpo_weights_match_trl_use_weighting(kinds):
    batch = _pair_batch(seed=7)
    args, lengths = _our_inputs(batch)
    logits, targets, mask = batch["logits"], batch["input_ids"][:, 1:], batch["completion_mask"][:, 1:]
    weights = wpo_weights(logits, targets, mask)
    chex.assert_shape(weights, (2 * B,))
    ours = dpo_loss(*args, **lengths, weights=weights[:B] * weights[B:], loss_type=kinds)
    trl = _trl_dpo(batch, loss_types=list(kinds), use_weighting=True)
    _assert_matches_trl(batch, ours, trl, loss_atol=1e-5 if SQUARED & set(kinds) else 1e-6)


def test_ld_sequence_logps_match_trl_ld_alpha():
    batch = _pair_batch(seed=8)
    tokens = token_logps(batch["logits"], batch["input_ids"][:, 1:])
    mask = batch["completion_mask"][:, 1:]
    chosen, rejected = ld_sequence_logps(tokens[:B], tokens[B:], mask[:B], mask[B:], alpha=0.3)
    ours = dpo_loss(chosen, rejected, batch["ref"][:B], batch["ref"][B:], beta=0.4)
    _assert_matches_trl(batch, ours, _trl_dpo(batch, loss_types=["sigmoid"], beta=0.4, ld_alpha=0.3))


def _legacy_dpo_loss(label_smoothing, beta):
    """TRL 0.11.4 DPOTrainer.dpo_loss, whose 'sigmoid' still applies label smoothing (cDPO)."""
    enum = types.SimpleNamespace
    loss = legacy_trl_method(
        "0.11.4",
        "trl/trainer/dpo_trainer.py",
        "DPOTrainer",
        "dpo_loss",
        extra_globals={
            "Tuple": tuple,
            "FDivergenceType": enum(
                ALPHA_DIVERGENCE=enum(value="alpha_divergence"), JS_DIVERGENCE=enum(value="js_divergence")
            ),
        },
    )
    trainer = types.SimpleNamespace(
        reference_free=False,
        f_divergence_type="reverse_kl",
        loss_type="sigmoid",
        beta=beta,
        label_smoothing=label_smoothing,
        accelerator=types.SimpleNamespace(device=torch.device("cpu")),
    )
    return functools.partial(loss, trainer)


@pytest.mark.parametrize("label_smoothing", [0.1, 0.3, 0.5])
def test_cdpo_label_smoothing_matches_trl_0_11_sigmoid(label_smoothing):
    batch = _pair_batch(seed=9)
    args, _ = _our_inputs(batch)
    ours, metrics = dpo_loss(*args, beta=0.5, label_smoothing=label_smoothing)
    legacy = _legacy_dpo_loss(label_smoothing, beta=0.5)
    losses, chosen_rewards, rejected_rewards = legacy(*(torch.tensor(np.asarray(x), dtype=torch.float64) for x in args))
    close(ours, losses.numpy())
    close(metrics["rewards/chosen"], chosen_rewards.mean().item())
    close(metrics["rewards/rejected"], rejected_rewards.mean().item())


# ----------------------------------------------------------------------------------------------------------
# Hand values and identities
# ----------------------------------------------------------------------------------------------------------

# Every loss at policy == reference (all log-ratios 0, z = 0), β = 0.1, ε = 1e-3 for exo_pair, τ = 0.05.
LN2 = math.log(2.0)
AT_REFERENCE = {
    "sigmoid": LN2,
    "hinge": 1.0,
    "ipo": (1 / (2 * 0.1)) ** 2,
    "exo_pair": -LN2 - 0.5 * math.log(1e-3 * (1 - 1e-3)),
    "nca_pair": 2 * LN2,
    "robust": LN2,
    "bco_pair": 2 * LN2,
    "sppo_hard": 2 * (0.5 / 0.1) ** 2,
    "aot": LN2,
    "aot_unpaired": LN2,
    "apo_zero": 1.0,
    "apo_down": 1.0,
    "discopop": 0.5 * LN2 + 0.5,
    "sigmoid_norm": LN2,
}


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_value_at_policy_equal_reference(loss_type, rng):
    logps = jnp.asarray(rng.normal(size=B) * 10 - 20, jnp.float32)
    lengths = jnp.array([4, 1, 6])
    loss, metrics = dpo_loss(
        logps,
        logps + 1,
        logps,
        logps + 1,
        lengths,
        lengths,
        loss_type=loss_type,
        label_smoothing=_default_smoothing(loss_type),
    )
    close(loss, np.full(B, AT_REFERENCE[loss_type]))
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        close(metrics[name], 0.0)


def test_sigmoid_hand_value():
    # Log-ratios +1 and −1, β = 0.5: z = 0.5·2 = 1, loss = log(1 + e^−1) = 0.31326169.
    # cDPO ε = 0.1: −0.9·log σ(1) − 0.1·log σ(−1) = softplus(−1) + 0.1·1 = 0.41326169.
    args = (jnp.array([-1.0]), jnp.array([-3.0]), jnp.array([-2.0]), jnp.array([-2.0]))
    loss, metrics = dpo_loss(*args, beta=0.5)
    close(loss, [0.31326169])
    close(dpo_loss(*args, beta=0.5, label_smoothing=0.1)[0], [0.41326169])
    close(metrics["rewards/chosen"], 0.5)
    close(metrics["rewards/rejected"], -0.5)
    close(metrics["rewards/margins"], 1.0)
    close(metrics["rewards/accuracies"], 1.0)


def test_ipo_and_sigmoid_norm_are_length_normalised():
    # Chosen log-ratio 2 over 4 tokens (0.5), rejected −1 over 2 tokens (−0.5): Δ = 1.
    # IPO, β = 0.25: (1 − 1/(2·0.25))² = 1. sigmoid_norm: −log σ(0.25) = 0.57593942.
    args = (jnp.array([-8.0]), jnp.array([-5.0]), jnp.array([-10.0]), jnp.array([-4.0]))
    lengths = {"chosen_lengths": jnp.array([4]), "rejected_lengths": jnp.array([2])}
    close(dpo_loss(*args, **lengths, loss_type="ipo", beta=0.25)[0], [1.0])
    close(dpo_loss(*args, **lengths, loss_type="sigmoid_norm", beta=0.25)[0], [0.57593942])
    # An empty completion counts as length 1 (TRL's clamp), never a division by zero.
    empty = {"chosen_lengths": jnp.array([0]), "rejected_lengths": jnp.array([0])}
    close(dpo_loss(*args, **empty, loss_type="ipo", beta=0.25)[0], [(3.0 - 2.0) ** 2])


def test_label_smoothing_symmetry():
    # L_ε(z) − L_ε(−z) = −(1 − 2ε)·z for the cDPO loss; at ε = ½ it is symmetric: swapping chosen and
    # rejected leaves it unchanged (log(2·cosh(z/2))).
    rng = np.random.default_rng(10)
    chosen, rejected, ref_chosen, ref_rejected = (jnp.asarray(rng.normal(size=B) * 3, jnp.float32) for _ in range(4))
    for epsilon in (0.0, 0.2, 0.5):
        forward, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.7, label_smoothing=epsilon)
        swapped, _ = dpo_loss(rejected, chosen, ref_rejected, ref_chosen, beta=0.7, label_smoothing=epsilon)
        z = 0.7 * ((chosen - ref_chosen) - (rejected - ref_rejected))
        close(forward - swapped, -(1 - 2 * epsilon) * z, atol=1e-5)
    close(forward, np.log(2 * np.cosh(np.asarray(z, np.float64) / 2)))


def test_aot_matches_numpy_loop():
    # AOT compares the sorted policy margins with the sorted reference margins (a 1-D optimal transport).
    rng = np.random.default_rng(11)
    chosen, rejected, ref_chosen, ref_rejected = (rng.normal(size=5) * 3 for _ in range(4))
    beta, epsilon = 0.4, 0.1

    def smoothed(z):
        return -(1 - epsilon) * math.log(1 / (1 + math.exp(-z))) - epsilon * math.log(1 / (1 + math.exp(z)))

    policy = sorted(c - r for c, r in zip(chosen, rejected, strict=True))
    reference = sorted(c - r for c, r in zip(ref_chosen, ref_rejected, strict=True))
    expected = [smoothed(beta * (p - q)) for p, q in zip(policy, reference, strict=True)]
    args = tuple(jnp.asarray(x, jnp.float32) for x in (chosen, rejected, ref_chosen, ref_rejected))
    close(dpo_loss(*args, loss_type="aot", beta=beta, label_smoothing=epsilon)[0], expected, atol=1e-5)
    chosen_ratio = sorted(chosen - ref_chosen)
    rejected_ratio = sorted(rejected - ref_rejected)
    expected = [smoothed(beta * (c - r)) for c, r in zip(chosen_ratio, rejected_ratio, strict=True)]
    close(dpo_loss(*args, loss_type="aot_unpaired", beta=beta, label_smoothing=epsilon)[0], expected, atol=1e-5)


def test_discopop_is_finite_where_trl_overflows():
    # z = −200: TRL's e^{−z}·σ(z/τ) is inf·0 = NaN in float32; the exact limit is −log σ(z)·1 = 200.
    loss, _ = dpo_loss(jnp.array([-2000.0]), jnp.array([0.0]), jnp.array([0.0]), jnp.array([0.0]), loss_type="discopop")
    close(loss, [200.0], atol=1e-4)
    assert np.isfinite(
        jax.grad(lambda c: dpo_loss(c, jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), loss_type="discopop")[0].sum())(
            jnp.array([-2000.0])
        )
    ).all()


# ----------------------------------------------------------------------------------------------------------
# Masks, jit, gradients
# ----------------------------------------------------------------------------------------------------------


def _poisoned_tokens(seed):
    rng = np.random.default_rng(seed)
    mask = _completion_mask(CHOSEN_LENGTHS + REJECTED_LENGTHS)[:, 1:]
    tokens = poison(-rng.exponential(size=(2 * B, T - 1)) * 2, mask, np.nan)
    return jnp.asarray(tokens), mask


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_grad_finite_with_nan_padding_and_jit_equals_eager(loss_type):
    tokens, mask = _poisoned_tokens(seed=12)
    ref = jnp.asarray(np.random.default_rng(13).normal(size=2 * B) - 8, jnp.float32)
    lengths = mask.sum(1)
    loss_fn = functools.partial(dpo_loss, loss_type=loss_type, beta=0.3, label_smoothing=_default_smoothing(loss_type))

    def objective(token_values):
        logps = sequence_logps(token_values, mask)
        loss, _ = loss_fn(logps[:B], logps[B:], ref[:B], ref[B:], lengths[:B], lengths[B:])
        return jnp.mean(loss)

    grads = jax.grad(objective)(tokens)
    chex.assert_shape(grads, (2 * B, T - 1))
    assert np.all(np.isfinite(grads))
    np.testing.assert_array_equal(np.asarray(grads)[mask == 0], 0.0)
    assert np.any(np.asarray(grads)[mask == 1] != 0.0)
    logps = sequence_logps(tokens, mask)
    args = (logps[:B], logps[B:], ref[:B], ref[B:], lengths[:B], lengths[B:])
    eager, eager_metrics = loss_fn(*args)
    jitted, jitted_metrics = jax.jit(loss_fn)(*args)
    close(jitted, np.asarray(eager))
    for name in METRICS:
        close(jitted_metrics[name], np.asarray(eager_metrics[name]))


def test_masked_equals_sliced():
    # Padding (with NaN) changes nothing: the loss equals that of the unpadded completions.
    tokens, mask = _poisoned_tokens(seed=14)
    ref = jnp.asarray(np.random.default_rng(15).normal(size=2 * B) - 8, jnp.float32)
    logps = sequence_logps(tokens, mask)
    lengths = mask.sum(1)
    padded, _ = dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], lengths[:B], lengths[B:], loss_type="ipo")
    for b in range(B):
        chosen = jnp.sum(tokens[b][mask[b] == 1])
        rejected = jnp.sum(tokens[B + b][mask[B + b] == 1])
        alone, _ = dpo_loss(
            chosen[None],
            rejected[None],
            ref[b : b + 1],
            ref[B + b : B + b + 1],
            jnp.array([CHOSEN_LENGTHS[b]]),
            jnp.array([REJECTED_LENGTHS[b]]),
            loss_type="ipo",
        )
        close(padded[b], alone[0])


# Three valid pairs around two padded slots, as a jitted step pads a batch to a static size.
PAIR_MASK = np.array([True, False, True, False, True])


def _pad(values, garbage):
    out = np.full(PAIR_MASK.shape, garbage, np.float32)
    out[PAIR_MASK] = values
    return jnp.asarray(out)


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_masked_pairs_equal_the_unpadded_batch(loss_type):
    # Masked slots hold NaN/inf in every input (policy, reference, lengths, NLL, weights): the valid slots must
    # equal the unpadded batch, masked slots give 0, metrics ignore them, and no garbage reaches a gradient.
    rng = np.random.default_rng(17)
    chosen, rejected, ref_chosen, ref_rejected = (rng.normal(size=B) * 3 - 10 for _ in range(4))
    chosen_lengths, rejected_lengths = np.array([4, 1, 6]), np.array([2, 5, 3])
    nll = rng.exponential(size=B)
    weights = rng.uniform(0.5, 1.5, size=B) if loss_type not in ("aot", "aot_unpaired") else None
    config = {"loss_type": loss_type, "beta": 0.3, "label_smoothing": _default_smoothing(loss_type), "rpo_alpha": 0.5}
    plain, plain_metrics = dpo_loss(
        chosen, rejected, ref_chosen, ref_rejected, chosen_lengths, rejected_lengths, nll, weights, **config
    )

    def padded(policy):
        return dpo_loss(
            policy[0],
            policy[1],
            _pad(ref_chosen, np.inf),
            _pad(ref_rejected, -np.inf),
            _pad(chosen_lengths, np.nan),
            _pad(rejected_lengths, 0),
            _pad(nll, np.nan),
            None if weights is None else _pad(weights, np.inf),
            jnp.asarray(PAIR_MASK),
            **config,
        )

    policy = jnp.stack([_pad(chosen, np.nan), _pad(rejected, np.inf)])
    loss, metrics = padded(policy)
    chex.assert_shape(loss, (PAIR_MASK.size,))
    # aot*: the k-th valid slot holds the k-th sorted valid pair, exactly as entry k of the unpadded batch.
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
    assert np.any(np.asarray(grads)[:, PAIR_MASK] != 0.0)


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_empty_batch_gives_zero_metrics(loss_type):
    # B = 0 (or every pair masked) must log 0, not the NaN of a mean over nothing.
    config = {"loss_type": loss_type, "label_smoothing": _default_smoothing(loss_type), "rpo_alpha": 0.5}
    empty = jnp.zeros(0)
    loss, metrics = dpo_loss(empty, empty, empty, empty, empty, empty, empty, **config)
    chex.assert_shape(loss, (0,))
    assert "rewards/accuracies" in metrics and "nll_loss" in metrics
    for name, value in metrics.items():
        assert value == 0.0, name
    garbage = jnp.full(B, jnp.nan)
    loss, metrics = dpo_loss(*(garbage,) * 7, None, jnp.zeros(B, bool), **config)
    np.testing.assert_array_equal(loss, np.zeros(B))
    for name, value in metrics.items():
        assert value == 0.0, name


def test_reference_log_probs_carry_no_gradient(rng):
    # The reference is a constant of the objective (TRL scores it under no_grad), even when it shares the
    # policy's parameters; the policy side does get a gradient.
    chosen, rejected, ref_chosen, ref_rejected = (jnp.asarray(rng.normal(size=B) - 5, jnp.float32) for _ in range(4))
    grads = jax.grad(lambda *x: jnp.sum(dpo_loss(*x)[0]), argnums=(0, 1, 2, 3))(
        chosen, rejected, ref_chosen, ref_rejected
    )
    assert np.all(np.asarray(grads[0]) != 0) and np.all(np.asarray(grads[1]) != 0)
    np.testing.assert_array_equal(grads[2], 0.0)
    np.testing.assert_array_equal(grads[3], 0.0)
    kto_grads = jax.grad(lambda *x: jnp.sum(kto_loss(*x, chosen, ref_chosen)[0]), argnums=(0, 2, 3))(
        chosen, rejected, ref_chosen, ref_rejected
    )
    assert np.all(np.asarray(kto_grads[0]) != 0)
    np.testing.assert_array_equal(kto_grads[1], 0.0)
    np.testing.assert_array_equal(kto_grads[2], 0.0)


def test_bf16_inputs_computed_in_float32(rng):
    logps = jnp.asarray(rng.normal(size=(4, B)) - 5, jnp.bfloat16)
    loss, metrics = dpo_loss(*logps)
    chex.assert_type(loss, jnp.float32)
    chex.assert_type(metrics["rewards/margins"], jnp.float32)


def test_ld_sequence_logps_limits_and_garbage():
    tokens, mask = _poisoned_tokens(seed=16)
    plain = sequence_logps(tokens, mask)
    full = ld_sequence_logps(tokens[:B], tokens[B:], mask[:B], mask[B:], alpha=1.0)
    close(jnp.concatenate(full), np.asarray(plain), atol=1e-5)
    chosen, rejected = jax.jit(functools.partial(ld_sequence_logps, alpha=0.0))(
        tokens[:B], tokens[B:], mask[:B], mask[B:]
    )
    chex.assert_shape(chosen, (B,))
    # α = 0 keeps the first min(|y_w|, |y_l|) completion tokens of each response.
    for b in range(B):
        shared = min(CHOSEN_LENGTHS[b], REJECTED_LENGTHS[b])
        close(chosen[b], np.sum(np.asarray(tokens[b])[mask[b] == 1][:shared]), atol=1e-5)
        close(rejected[b], np.sum(np.asarray(tokens[B + b])[mask[B + b] == 1][:shared]), atol=1e-5)
    grads = jax.grad(lambda x: sum(jnp.sum(v) for v in ld_sequence_logps(x[:B], x[B:], mask[:B], mask[B:], alpha=0.5)))(
        tokens
    )
    assert np.all(np.isfinite(grads))
    np.testing.assert_array_equal(np.asarray(grads)[mask == 0], 0.0)


def test_wpo_weight_of_uniform_policy_is_one_and_has_no_gradient(rng):
    # Uniform p = 1/V: log p = log Σ p² = −log V, so the aligned log-prob is 0 and the weight is 1.
    targets = rng.integers(0, V, size=(B, T))
    mask = _completion_mask([3, 5, 0])
    close(jax.jit(wpo_weights)(jnp.zeros((B, T, V)), targets, mask), np.ones(B))
    logits = jnp.asarray(rng.normal(size=(B, T, V)), jnp.float32)
    np.testing.assert_array_equal(jax.grad(lambda z: wpo_weights(z, targets, mask).sum())(logits), 0.0)
    # Garbage logits in padded positions do not reach the weight.
    poisoned = poison(np.zeros((B, T, V)), mask[..., None], np.inf)
    close(wpo_weights(poisoned, targets, mask), np.ones(B))


def test_wpo_weights_range_up_to_half_of_one_plus_sqrt_v(rng):
    # Per token ρ = p(y)/Σ_v p_v² ≤ (1 + √V)/2, reached at p(y) = 1/√V with the other V − 1 tokens sharing the
    # rest evenly. V = 11: p = 0.30151134, others 0.06984887, Σp² = 0.13969773, ρ = 2.1583124 — above 1.
    peak = 1 / math.sqrt(V)
    probs = np.full(V, (1 - peak) / (V - 1))
    probs[0] = peak
    logits = jnp.asarray(np.broadcast_to(np.log(probs), (B, T, V)), jnp.float32)
    bound = (1 + math.sqrt(V)) / 2
    close(wpo_weights(logits, jnp.zeros((B, T), int)), np.full(B, 2.1583124))
    close(bound, 2.1583124)
    # Greedy tokens weigh ≥ 1 (Σp² ≤ p_max·Σp), random ones may weigh less; none exceeds the bound.
    logits = jnp.asarray(rng.normal(size=(13, T, V)) * 2, jnp.float32)
    greedy = wpo_weights(logits, jnp.argmax(logits, -1))
    sampled = wpo_weights(logits, jnp.asarray(rng.integers(0, V, size=(13, T))))
    assert np.all(np.asarray(greedy) > 1.0) and np.all(np.asarray(greedy) <= bound)
    assert np.all(np.asarray(sampled) > 0.0) and np.all(np.asarray(sampled) <= bound)
    # On-policy tokens weigh 1 on average: Σ_y p(y)·ρ(y) = Σ_y p(y)²/Σ_v p_v² = 1.
    position = jnp.broadcast_to(logits[0, :1], (V, 1, V))
    per_target = wpo_weights(position, jnp.arange(V)[:, None])
    close(jnp.sum(jax.nn.softmax(logits[0, 0]) * per_target), 1.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss_type": "dpo"}, "unknown loss_type"),
        ({"loss_type": ()}, "empty"),
        ({"loss_type": "ipo"}, "chosen_lengths"),
        ({"loss_type": ("sigmoid", "sigmoid_norm")}, "chosen_lengths"),
        ({"loss_type": "exo_pair"}, "exo_pair"),
        ({"loss_type": "robust", "label_smoothing": 0.5}, "robust"),
        ({"loss_type": "hinge", "label_smoothing": 0.1}, "no effect"),
        ({"label_smoothing": 0.6}, r"\[0, 0.5\]"),
        ({"beta": 0.0}, "beta"),
        ({"loss_type": "nca_pair", "f_divergence": "forward_kl"}, "only defined"),
        ({"f_divergence": "kl"}, "unknown f_divergence"),
        ({"loss_type": ("sigmoid", "hinge"), "loss_weights": (1.0,)}, "loss_weights"),
        ({"rpo_alpha": 0.5}, "RPO"),
        ({"loss_type": "aot", "weights": jnp.ones(B)}, "aot"),
        ({"loss_type": "discopop", "discopop_tau": 0.0}, "discopop_tau"),
    ],
)
def test_rejects_bad_configuration(kwargs, match):
    logps = jnp.zeros(B)
    with pytest.raises(ValueError, match=match):
        dpo_loss(logps, logps, logps, logps, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# KTO
# ----------------------------------------------------------------------------------------------------------

KTO_N = 5


def _kto_batch(seed, labels):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, T - PROMPT + 1, size=KTO_N)
    kl_lengths = np.roll(lengths, 1)
    batch = {
        "label": np.asarray(labels, bool),
        "input_ids": rng.integers(0, V, size=(KTO_N, T)),
        "completion_mask": _completion_mask(lengths),
        "KL_input_ids": rng.integers(0, V, size=(KTO_N, T)),
        "KL_completion_mask": _completion_mask(kl_lengths),
        "logits": (rng.normal(size=(KTO_N, T - 1, V)) * 2).astype(np.float32),
        "KL_logits": (rng.normal(size=(KTO_N, T - 1, V)) * 2).astype(np.float32),
    }
    for key, ids, mask, logits in (
        ("ref_logps", "input_ids", "completion_mask", "logits"),
        ("ref_KL_logps", "KL_input_ids", "KL_completion_mask", "KL_logits"),
    ):
        policy = np.asarray(sequence_logps(token_logps(batch[logits], batch[ids][:, 1:]), batch[mask][:, 1:]))
        batch[key] = (policy + rng.normal(size=KTO_N) - 0.3).astype(np.float32)
    return batch


def _trl_kto(batch, *, loss_type, beta, desirable_weight, undesirable_weight):
    from trl.trainer.kto_trainer import KTOTrainer

    tensors = {k: torch.tensor(v) for k, v in batch.items()}
    model = FakeFusedLM(
        [
            (tensors["input_ids"], tensors["logits"].double()),
            (tensors["KL_input_ids"], tensors["KL_logits"].double()),
        ]
    )
    trainer = _bare_trainer(
        KTOTrainer,
        model,
        calculate_KL=loss_type == "kto",
        precompute_ref_logps=True,
        loss_type=loss_type,
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
    )
    inputs = {k: tensors[k] for k in ("label", "input_ids", "completion_mask", "KL_input_ids", "KL_completion_mask")}
    inputs["attention_mask"] = torch.ones_like(tensors["input_ids"])
    inputs["KL_attention_mask"] = torch.ones_like(tensors["KL_input_ids"])
    inputs["ref_logps"] = tensors["ref_logps"].double()
    inputs["ref_KL_logps"] = tensors["ref_KL_logps"].double()
    loss = trainer._compute_loss(model, inputs, return_outputs=False)
    return loss.item(), {name: values[-1] for name, values in trainer._metrics["train"].items()}


def _kto_inputs(batch):
    logps = sequence_logps(token_logps(batch["logits"], batch["input_ids"][:, 1:]), batch["completion_mask"][:, 1:])
    kl = sequence_logps(
        token_logps(batch["KL_logits"], batch["KL_input_ids"][:, 1:]), batch["KL_completion_mask"][:, 1:]
    )
    desirable = batch["label"]
    ref = batch["ref_logps"]
    return (logps[desirable], logps[~desirable], ref[desirable], ref[~desirable], kl, batch["ref_KL_logps"])


@pytest.mark.parametrize("loss_type", KTO_LOSS_TYPES)
@pytest.mark.parametrize("labels", [(1, 0, 1, 1, 0), (0, 0, 0, 0, 0), (1, 1, 1, 1, 0)])
def test_kto_matches_trl_kto_trainer(loss_type, labels):
    batch = _kto_batch(seed=sum(labels) + 20, labels=labels)
    config = {"beta": 0.3, "desirable_weight": 1.3, "undesirable_weight": 0.7}
    loss_fn = functools.partial(kto_loss, loss_type=loss_type, **config)
    loss, metrics = jax.jit(loss_fn)(*_kto_inputs(batch))
    chex.assert_shape(loss, (KTO_N,))
    eager, eager_metrics = loss_fn(*_kto_inputs(batch))
    close(loss, np.asarray(eager))
    for name, value in eager_metrics.items():
        close(metrics[name], np.asarray(value))
    trl_loss, trl_metrics = _trl_kto(batch, loss_type=loss_type, **config)
    close(jnp.mean(loss), trl_loss)
    # TRL only logs a side's metrics when that side is present.
    for name, value in trl_metrics.items():
        if name in metrics:
            close(metrics[name], value)
    assert {"kl", "rewards/rejected", "logps/rejected"} <= trl_metrics.keys()


def test_kto_padded_lists_equal_unpadded():
    # A jitted step pads both lists to a fixed size; NaN padding must change neither the loss nor gradients.
    batch = _kto_batch(seed=30, labels=(1, 0, 1, 1, 0))
    chosen, rejected, ref_chosen, ref_rejected, kl, ref_kl = _kto_inputs(batch)
    pad = lambda x: jnp.concatenate([x, jnp.full((KTO_N - x.shape[0],), jnp.nan)])  # noqa: E731
    chosen_mask = jnp.arange(KTO_N) < chosen.shape[0]
    rejected_mask = jnp.arange(KTO_N) < rejected.shape[0]
    config = {"beta": 0.3, "desirable_weight": 1.3, "undesirable_weight": 0.7}
    plain, plain_metrics = kto_loss(chosen, rejected, ref_chosen, ref_rejected, kl, ref_kl, **config)

    def padded_loss(chosen_values):
        loss, metrics = kto_loss(
            chosen_values,
            pad(rejected),
            pad(ref_chosen),
            pad(ref_rejected),
            jnp.concatenate([kl, jnp.full(2, jnp.nan)]),
            jnp.concatenate([ref_kl, jnp.zeros(2)]),
            chosen_mask,
            rejected_mask,
            jnp.arange(KTO_N + 2) < KTO_N,
            **config,
        )
        valid = jnp.concatenate([chosen_mask, rejected_mask])
        return jnp.sum(jnp.where(valid, loss, 0.0)) / jnp.sum(valid), metrics

    (value, metrics), grads = jax.value_and_grad(padded_loss, has_aux=True)(pad(chosen))
    close(value, np.mean(np.asarray(plain)))
    for name, expected in plain_metrics.items():
        close(metrics[name], np.asarray(expected))
    assert np.all(np.isfinite(grads))
    np.testing.assert_array_equal(np.asarray(grads)[chosen.shape[0] :], 0.0)


def test_kto_hand_values_and_clamped_detached_reference_point():
    # c = 2, z₀ = mean(1.0, 0.0) = 0.5, β = 0.5: desirable 1 − σ(0.75) = 0.32082130;
    # undesirable c = −1: 1 − σ(0.5·(0.5 + 1)) = 1 − σ(0.75) as well.
    ones = jnp.ones(1)
    kl_policy, kl_ref = jnp.array([1.0, 0.0]), jnp.zeros(2)
    loss, metrics = kto_loss(3 * ones, ones - 1, ones, ones, kl_policy, kl_ref, beta=0.5)
    close(loss, [0.32082130, 0.32082130])
    close(metrics["kl"], 0.5)
    close(metrics["rewards/margins"], 0.5 * 2 - 0.5 * -1)
    # A negative KL estimate is clamped to 0, and the reference point carries no gradient.
    _, metrics = kto_loss(3 * ones, ones - 1, ones, ones, -kl_policy, kl_ref, beta=0.5)
    close(metrics["kl"], 0.0)
    grad = jax.grad(lambda k: jnp.sum(kto_loss(3 * ones, ones - 1, ones, ones, k, kl_ref, beta=0.5)[0]))(kl_policy)
    np.testing.assert_array_equal(grad, 0.0)


def test_kto_rejects_bad_configuration():
    x = jnp.zeros(2)
    with pytest.raises(ValueError, match="kl_logps"):
        kto_loss(x, x, x, x)
    with pytest.raises(ValueError, match="unknown loss_type"):
        kto_loss(x, x, x, x, x, x, loss_type="bco")
    with pytest.raises(ValueError, match="beta"):
        kto_loss(x, x, x, x, x, x, beta=-1.0)


def test_every_loss_type_has_exactly_one_formula():
    """The dispatch table and the public list of loss types are the same set (a new type needs both)."""
    from jaxalign.losses.dpo import _PAIR_LOSSES, DPO_LOSS_TYPES

    assert set(_PAIR_LOSSES) == set(DPO_LOSS_TYPES)
