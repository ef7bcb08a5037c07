"""Learning-rate schedules against hand-computed values and transformers' schedulers; the optimizer chain."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxalign.train import OptimizerConfig, make_optimizer, make_schedule
from jaxalign.train.optimizer import ClippedOptimizer, weight_decay_mask

TOTAL = 10
# Peak 1, two warm-up steps (rates 0 and 1/2), then 8 decay steps: progress p = (s - 2) / 8.
COS_QUARTER = 0.5 * (1 + math.cos(math.pi / 4))  # p = 1/4
HAND_VALUES = {
    "constant": {0: 0.0, 1: 0.5, 2: 1.0, 6: 1.0, 10: 1.0},
    "linear": {0: 0.0, 1: 0.5, 2: 1.0, 4: 0.75, 6: 0.5, 10: 0.0},
    "cosine": {0: 0.0, 1: 0.5, 2: 1.0, 4: COS_QUARTER, 6: 0.5, 8: 1 - COS_QUARTER, 10: 0.0},
    # Two cycles (2p mod 1): p = 1/4 is half-way down the first, p = 1/2 restarts at the peak.
    "cosine_with_restarts": {0: 0.0, 1: 0.5, 2: 1.0, 3: COS_QUARTER, 4: 0.5, 5: 1 - COS_QUARTER, 6: 1.0, 8: 0.5,
                             10: 0.0},
}


def cycles(kind: str, restarts: int) -> dict[str, int]:
    """``restarts`` for the schedule that has cycles (the others refuse it)."""
    return {"restarts": restarts} if kind == "cosine_with_restarts" else {}


@pytest.mark.parametrize("kind", sorted(HAND_VALUES))
def test_schedule_hand_values(kind):
    schedule = make_schedule(OptimizerConfig(learning_rate=1.0, schedule=kind, warmup_steps=2, **cycles(kind, 2)),
                             TOTAL)
    for step, expected in HAND_VALUES[kind].items():
        assert float(schedule(step)) == pytest.approx(expected, abs=1e-6), (kind, step)


def test_final_learning_rate_and_decay_steps():
    config = OptimizerConfig(learning_rate=1.0, schedule="linear", final_learning_rate=0.2, decay_steps=4)
    schedule = make_schedule(config, TOTAL)
    # No warm-up; decays over 4 steps from 1 to 0.2, then stays there.
    assert [float(schedule(s)) for s in (0, 2, 4, 9)] == pytest.approx([1.0, 0.6, 0.2, 0.2])


def test_schedules_match_transformers():
    import torch
    import transformers
    total, warmup = 23, 5
    theirs = {
        "constant": lambda opt: transformers.get_constant_schedule_with_warmup(opt, warmup),
        "linear": lambda opt: transformers.get_linear_schedule_with_warmup(opt, warmup, total),
        "cosine": lambda opt: transformers.get_cosine_schedule_with_warmup(opt, warmup, total),
        "cosine_with_restarts": lambda opt: transformers.get_cosine_with_hard_restarts_schedule_with_warmup(
            opt, warmup, total, num_cycles=3),
    }
    for kind, build in theirs.items():
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        factor = build(optimizer).lr_lambdas[0]
        ours = make_schedule(OptimizerConfig(learning_rate=1.0, schedule=kind, warmup_steps=warmup, **cycles(kind, 3)),
                             total)
        np.testing.assert_allclose([float(ours(s)) for s in range(total)], [factor(s) for s in range(total)],
                                   atol=1e-6, err_msg=kind)


def transformers_factors(kind: str, warmup: int, total: int, restarts: int) -> list[float]:
    import torch
    import transformers
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    build = {
        "constant": lambda: transformers.get_constant_schedule_with_warmup(optimizer, warmup),
        "linear": lambda: transformers.get_linear_schedule_with_warmup(optimizer, warmup, total),
        "cosine": lambda: transformers.get_cosine_schedule_with_warmup(optimizer, warmup, total),
        "cosine_with_restarts": lambda: transformers.get_cosine_with_hard_restarts_schedule_with_warmup(
            optimizer, warmup, total, num_cycles=restarts),
    }[kind]
    factor = build().lr_lambdas[0]
    return [factor(s) for s in range(total)]


# Run lengths whose restarts fall on steps where XLA's reciprocal multiply makes R·k/D land just below an
# integer (82 with 2 restarts is one), and others.
JIT_CASES = [(kind, warmup, total, 1) for kind in ("constant", "linear", "cosine") for warmup in (0, 3)
             for total in (7, 41, 82, 100)]
JIT_CASES += [("cosine_with_restarts", warmup, total, restarts) for warmup in (0, 3)
              for total in (7, 23, 50, 82, 101, 150) for restarts in (1, 2, 3, 5, 7)]


def test_schedules_under_jit_match_transformers_at_every_step():
    mismatches = []
    for kind, warmup, total, restarts in JIT_CASES:
        schedule = make_schedule(OptimizerConfig(learning_rate=1.0, schedule=kind, warmup_steps=warmup,
                                                 **cycles(kind, restarts)), total)
        ours = np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(total)))
        theirs = np.asarray(transformers_factors(kind, warmup, total, restarts))
        wrong = np.flatnonzero(np.abs(ours - theirs) > 1e-5)
        mismatches += [(kind, warmup, total, restarts, int(s), float(ours[s]), float(theirs[s])) for s in wrong]
    assert not mismatches


@pytest.mark.parametrize(("total", "restarts"), [(82, 2), (101, 5), (150, 7)])
def test_the_optimizer_applies_the_schedule_at_restarts(total, restarts):
    config = OptimizerConfig(name="sgd", learning_rate=1.0, schedule="cosine_with_restarts", restarts=restarts,
                             max_grad_norm=None)
    optimizer = make_optimizer(config, total_steps=total)
    params = jnp.zeros(())
    update = jax.jit(lambda state: optimizer.update(jnp.ones(()), state, params))
    state, applied = optimizer.init(params), []
    for _ in range(total):
        updates, state = update(state)
        applied.append(-float(updates))  # SGD on a unit gradient: the update is minus the rate
    theirs = transformers_factors("cosine_with_restarts", 0, total, restarts)
    np.testing.assert_allclose(applied, theirs, atol=1e-5)
    restart_steps = [total * cycle // restarts for cycle in range(restarts) if total * cycle % restarts == 0]
    assert all(applied[s] == pytest.approx(1.0) for s in restart_steps)


def test_optimizer_clips_the_global_norm_before_the_update():
    optimizer = make_optimizer(OptimizerConfig(name="sgd", learning_rate=1.0, max_grad_norm=1.0), total_steps=1)
    grads = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([4.0])}  # global norm 5
    updates, _ = optimizer.update(grads, optimizer.init(grads), grads)
    np.testing.assert_allclose(updates["a"], [-0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(updates["b"], [-0.8], rtol=1e-6)


def test_adamw_decays_weights_with_the_scheduled_rate():
    config = OptimizerConfig(learning_rate=0.1, weight_decay=0.5, max_grad_norm=None)
    optimizer = make_optimizer(config, total_steps=1)
    params = {"w": jnp.array([2.0])}
    updates, _ = optimizer.update({"w": jnp.zeros(1)}, optimizer.init(params), params)
    # Zero gradient: only the decoupled decay acts, -lr * wd * w.
    np.testing.assert_allclose(optax.apply_updates(params, updates)["w"], [2.0 - 0.1 * 0.5 * 2.0], rtol=1e-6)


@pytest.mark.parametrize("arch", ["llama_biases_untied", "llama_tied_3_layers", "gpt2"])
def test_weight_decay_skips_the_parameters_transformers_trainer_skips(arch, tmp_path):
    """Our mask on the loaded model decays exactly as many weights as ``Trainer.get_decay_parameter_names``
    picks on the transformers model (each tied tensor counted once), and skips exactly the rest."""
    import transformers
    from flax import nnx

    from jaxalign.models import load_hf
    from tests.models.conftest import make_hf_model

    hf_model = make_hf_model(arch)
    hf_model.save_pretrained(tmp_path)
    decayed_names = set(transformers.Trainer.get_decay_parameter_names(None, hf_model))
    unique = {param.data_ptr(): (name, param.numel()) for name, param in hf_model.named_parameters()}
    theirs = {True: 0, False: 0}
    for name, numel in unique.values():
        theirs[name in decayed_names] += numel

    params = nnx.state(load_hf(tmp_path), nnx.Param)
    ours = {True: 0, False: 0}
    for decayed, leaf in zip(jax.tree.leaves(weight_decay_mask(params)), jax.tree.leaves(params)):
        ours[bool(decayed)] += leaf.size
    assert theirs[False] > 0 and ours == theirs


def test_adamw_leaves_biases_and_norm_scales_undecayed_unless_asked():
    params = {"proj": {"kernel": jnp.array([2.0]), "bias": jnp.array([2.0])}, "norm": {"scale": jnp.array([2.0])}}
    zero_grads = jax.tree.map(jnp.zeros_like, params)

    def after_one_step(**options):
        optimizer = make_optimizer(OptimizerConfig(learning_rate=0.1, weight_decay=0.5, max_grad_norm=None,
                                                   **options), total_steps=1)
        updates, _ = optimizer.update(zero_grads, optimizer.init(params), params)
        return optax.apply_updates(params, updates)

    masked = after_one_step()
    np.testing.assert_allclose(masked["proj"]["kernel"], [1.9], rtol=1e-6)
    np.testing.assert_array_equal(masked["proj"]["bias"], [2.0])
    np.testing.assert_array_equal(masked["norm"]["scale"], [2.0])
    everything = after_one_step(decay_biases_and_norms=True)
    assert all(float(leaf[0]) == pytest.approx(1.9) for leaf in jax.tree.leaves(everything))


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_masked_decay_keeps_the_optimizer_state_of_unmasked_decay(name):
    """Checkpoints of runs that decayed every parameter (optax.adamw / add_decayed_weights without a mask)
    restore into the masked optimizer: same state tree. With decay_biases_and_norms the updates are optax's."""
    params = {"proj": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "norm": {"scale": jnp.ones(2)}}
    options = dict(name=name, learning_rate=0.1, weight_decay=0.1, momentum=0.9 if name == "sgd" else 0.0)
    rate = make_schedule(OptimizerConfig(**options), 5)
    unmasked = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(rate, weight_decay=0.1) if name == "adamw" else
                           optax.chain(optax.add_decayed_weights(0.1), optax.sgd(rate, momentum=0.9)))
    ours = make_optimizer(OptimizerConfig(**options), 5)
    assert jax.tree.structure(ours.init(params)) == jax.tree.structure(unmasked.init(params))
    everything = make_optimizer(OptimizerConfig(**options, decay_biases_and_norms=True), 5)
    grads = jax.tree.map(lambda p: 0.3 * p, params)
    theirs, mine = unmasked.init(params), everything.init(params)
    for _ in range(3):
        expected, theirs = unmasked.update(grads, theirs, params)
        got, mine = everything.update(grads, mine, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, expected)


def test_clipping_matches_optax_and_reuses_a_given_norm():
    """make_optimizer's clipping is optax's chain(clip_by_global_norm, ...) (the state, and the numbers up to
    float rounding: it multiplies by max_norm / norm); given ``grad_norm`` (as TrainStep passes it) it clips
    with that norm and does not pass it on."""
    grads = {"a": jnp.array([3.0, 4.0]), "b": {"c": jnp.array([[12.0]])}}  # global norm 13
    config = OptimizerConfig(name="sgd", learning_rate=1.0, max_grad_norm=1.0)
    ours = make_optimizer(config, total_steps=1)
    # make_optimizer's chain before ClippedOptimizer (no decay: identity): checkpoints of either restore
    theirs = optax.chain(optax.clip_by_global_norm(1.0),
                         optax.chain(optax.identity(), optax.sgd(make_schedule(config, 1))))
    assert isinstance(ours, ClippedOptimizer)
    assert jax.tree.structure(ours.init(grads)) == jax.tree.structure(theirs.init(grads))
    expected, _ = theirs.update(grads, theirs.init(grads), grads)
    for extra in ({}, {"grad_norm": jnp.float32(13.0)}):
        got, _ = ours.update(grads, ours.init(grads), grads, **extra)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, expected)
    halved, _ = ours.update(grads, ours.init(grads), grads, grad_norm=jnp.float32(26.0))
    np.testing.assert_allclose(halved["a"], -np.array([3.0, 4.0]) / 26.0, rtol=1e-6)
    below, _ = ours.update(grads, ours.init(grads), grads, grad_norm=jnp.float32(0.5))  # under max_norm: unclipped
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, -b, rtol=1e-6), below, grads)


def test_only_make_optimizers_own_clipping_is_given_the_norm():
    """Wrapped (here in MultiSteps, which forwards extra arguments to what it wraps), the optimizer sees another
    tree than the step's gradients; TrainStep gives the norm to ClippedOptimizer only."""
    from jaxalign.train import TrainStep
    from tests.train.tiny import BATCH, make_batch, sft_objective, tiny_model

    config = OptimizerConfig(name="sgd", learning_rate=0.5, max_grad_norm=1e-3)
    wrapped = optax.MultiSteps(make_optimizer(config, total_steps=4), every_k_schedule=1).gradient_transformation()
    assert not isinstance(wrapped, ClippedOptimizer)
    batch = make_batch(np.random.default_rng(0), BATCH)
    results = []
    for optimizer in (make_optimizer(config, total_steps=4), wrapped):
        step = TrainStep(sft_objective, tiny_model(), optimizer)
        state, metrics = step(step.init(seed=0), batch)
        results.append((state.params, float(metrics["update_ratio"])))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), results[0][0], results[1][0])
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-5)
